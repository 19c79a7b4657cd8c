"""sigtrap.py REPORT: SIGTRAP handled by the root and ignored by a child.

ferry's remote calls end on int3, which forces a SIGTRAP; the kernel
resets the disposition of a forced signal that is blocked or ignored.
The check (SIGUSR2, see selfcheck): the root's handler still runs on
SIGTRAP, and the child still ignores it.
"""
import os
import signal
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
trapped = []
signal.signal(signal.SIGTRAP, lambda s, f: trapped.append(s))
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTRAP, signal.SIG_IGN)
    while True:
        signal.pause()


def sigign(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    return 0


def verify():
    os.kill(os.getpid(), signal.SIGTRAP)
    if not trapped:
        return "the SIGTRAP handler did not run"
    if not sigign(child) & (1 << (signal.SIGTRAP - 1)):
        return "the child no longer ignores SIGTRAP"
    os.kill(child, signal.SIGTRAP)
    if sigign(child) == 0 and not os.path.exists("/proc/%d" % child):
        return "SIGTRAP killed the child"
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"pids": str(child)})

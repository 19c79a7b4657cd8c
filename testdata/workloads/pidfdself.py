"""pidfdself.py REPORT: a pidfd of the process itself, across C/R.

The check (SIGUSR2, see selfcheck): the descriptor is still a pidfd of
this very process (its fdinfo names our PID) and signals through it
reach us.
"""
import os
import signal
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
fd = os.pidfd_open(os.getpid())


def verify():
    info = dict(l.split(":\t", 1) for l in open("/proc/self/fdinfo/%d" % fd).read().splitlines() if ":\t" in l)
    if os.readlink("/proc/self/fd/%d" % fd) != "anon_inode:[pidfd]":
        return "not a pidfd"
    if info.get("Pid", "").strip() != str(os.getpid()):
        return "a pidfd of process %s" % info.get("Pid")
    signal.pidfd_send_signal(fd, 0)
    return "ok"


selfcheck.run(report, token, verify)

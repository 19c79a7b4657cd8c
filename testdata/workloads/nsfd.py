"""nsfd.py REPORT: descriptors of the process's own namespace files.

It opens /proc/self/ns/net and /proc/self/ns/uts. The check (SIGUSR2, see
selfcheck): each descriptor still names the process's own namespace of
that kind.
"""
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
fds = {kind: os.open("/proc/self/ns/" + kind, os.O_RDONLY) for kind in ("net", "uts")}


def verify():
    for kind, fd in fds.items():
        got, want = os.readlink("/proc/self/fd/%d" % fd), os.readlink("/proc/self/ns/" + kind)
        if got != want:
            return "%s: the descriptor names %s, the process is in %s" % (kind, got, want)
    return "ok"


selfcheck.run(report, token, verify)

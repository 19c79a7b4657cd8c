"""cgns.py REPORT: a cgroup namespace of its own.

PID 1 of new PID and cgroup namespaces (unshare --cgroup --pid --fork),
started in cgroups the test made: its cgroup namespace is rooted there.
The check (SIGUSR2, see selfcheck): /proc/self/cgroup shows "/" in every
hierarchy (it is in its namespace's root cgroups), and it is PID 1.
"""
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
os.setsid()


def verify():
    lines = open("/proc/self/cgroup").read().split()
    if any(not l.endswith(":/") for l in lines):
        return "cgroups %s: not the namespace's root" % lines
    if os.getpid() != 1:
        return "PID %d" % os.getpid()
    return "ok"


selfcheck.run(report, token, verify)

"""timens.py REPORT: a time namespace of its own, with clock offsets.

PID 1 of new PID and time namespaces whose monotonic clock is a day ahead
of the host's and its boot time two days (unshare --time --monotonic 86400
--boottime 172800). The check (SIGUSR2, see selfcheck): the offsets are
still those, less the time the tree spent dumped (the restore moves them
so that its clocks go on from where they were: less than a minute here),
and CLOCK_MONOTONIC did not go back since the start.
"""
import os
import sys
import time

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
os.setsid()
start = time.clock_gettime(time.CLOCK_MONOTONIC)


def verify():
    offsets = {l.split()[0]: int(l.split()[1]) for l in open("/proc/self/timens_offsets")}
    if not 86400 - 60 <= offsets.get("monotonic", 0) <= 86400 or not 172800 - 60 <= offsets.get("boottime", 0) <= 172800:
        return "offsets %s" % offsets
    if time.clock_gettime(time.CLOCK_MONOTONIC) < start:
        return "CLOCK_MONOTONIC went back"
    return "ok"


selfcheck.run(report, token, verify)

"""sched.py REPORT: per-thread scheduling that must survive C/R.

The main thread runs SCHED_BATCH at nice 7; a second thread SCHED_RR at
real-time priority 5 with reset-on-fork, and nice -3 (kept for when it
leaves SCHED_RR). The report (see selfcheck) gives each thread's
policy/priority/nice as the kernel says them (sched=); the check
(SIGUSR2) compares them with what was set.
"""
import os
import sys
import threading
import time

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
os.setpriority(os.PRIO_PROCESS, 0, 7)
tids = [threading.get_native_id()]


def rt():
    os.setpriority(os.PRIO_PROCESS, 0, -3)
    os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(5))
    tids.append(threading.get_native_id())
    while True:
        time.sleep(0.05)


threading.Thread(target=rt, daemon=True).start()
while len(tids) < 2:
    time.sleep(0.01)
want = ["%d/0/7" % os.SCHED_BATCH, "%d/5/-3" % (os.SCHED_RR | os.SCHED_RESET_ON_FORK)]


def got():
    return ["%d/%d/%d" % (os.sched_getscheduler(t), os.sched_getparam(t).sched_priority,
                          os.getpriority(os.PRIO_PROCESS, t)) for t in tids]


def verify():
    g = got()
    return "ok" if g == want else "scheduling %s, want %s" % (",".join(g), ",".join(want))


selfcheck.run(report, token, verify, lambda checked: {"sched": ",".join(got())})

"""deadproccwd.py REPORT: a working directory in the /proc of a process
that is gone, across C/R.

The check (SIGUSR2, see selfcheck): getcwd still fails (ENOENT: the
directory is gone) and /proc/self/cwd can still be read.
"""
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
pid = os.fork()
if pid == 0:
    os.read(os.pipe()[0], 1)  # waits until killed
    os._exit(0)
os.chdir("/proc/%d" % pid)
os.kill(pid, 9)
os.waitpid(pid, 0)


def verify():
    try:
        return "getcwd answers %s" % os.getcwd()
    except FileNotFoundError:
        pass
    os.readlink("/proc/self/cwd")
    return "ok"


selfcheck.run(report, token, verify)

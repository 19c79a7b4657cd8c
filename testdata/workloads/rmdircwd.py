"""rmdircwd.py REPORT: a removed working directory, also open, across C/R.

In REPORT's directory it makes a directory named by a random token (kept
only in memory), enters it, opens it, and removes it. The check (SIGUSR2,
see selfcheck): the working directory and the descriptor are still that
removed directory, and still the same one. A directory inside another,
both removed, is open too, and still reads as such.
"""
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
d = os.path.join(os.path.dirname(os.path.abspath(report)), "dir-" + token)
os.mkdir(d)
os.chdir(d)
fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
os.rmdir(d)
outer = os.path.join(os.path.dirname(os.path.abspath(report)), "outer-" + token)
inner = os.path.join(outer, "inner")
os.makedirs(inner)
fd2 = os.open(inner, os.O_RDONLY | os.O_DIRECTORY)
os.rmdir(inner)
os.rmdir(outer)


def verify():
    want = d + " (deleted)"
    for name, got in (("cwd", os.readlink("/proc/self/cwd")), ("fd", os.readlink("/proc/self/fd/%d" % fd))):
        if got != want:
            return "%s is %r, want %r" % (name, got, want)
    if os.fstat(fd).st_ino != os.stat(".").st_ino:
        return "the working directory and the descriptor are two directories"
    if os.readlink("/proc/self/fd/%d" % fd2) != inner + " (deleted)":
        return "the inner directory's descriptor is %r" % os.readlink("/proc/self/fd/%d" % fd2)
    if os.path.exists(outer):
        return "the outer directory is back"
    return "ok"


selfcheck.run(report, token, verify)

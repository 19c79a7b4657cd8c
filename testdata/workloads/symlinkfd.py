"""symlinkfd.py REPORT: a descriptor of a symbolic link itself, across C/R.

In REPORT's directory it makes a file and a symbolic link to it named by
a random token (kept only in memory), and opens the link with
O_PATH|O_NOFOLLOW; a second link, opened the same way, is removed. The
check (SIGUSR2, see selfcheck): each descriptor is still its link (lstat
type, its target read through it), the second one removed.
"""
import os
import stat
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
d = os.path.dirname(os.path.abspath(report))
target = os.path.join(d, "target")
open(target, "w").close()
link = os.path.join(d, "link-" + token)
os.symlink(target, link)
fd = os.open(link, os.O_PATH | os.O_NOFOLLOW)
gone = os.path.join(d, "gone-" + token)
os.symlink(target, gone)
fd2 = os.open(gone, os.O_PATH | os.O_NOFOLLOW)
os.unlink(gone)


def verify():
    if os.readlink("/proc/self/fd/%d" % fd) != link:
        return "the descriptor names %s" % os.readlink("/proc/self/fd/%d" % fd)
    if not stat.S_ISLNK(os.fstat(fd).st_mode):
        return "the descriptor is not a symbolic link"
    if os.readlink("", dir_fd=fd) != target:
        return "the link reads %r" % os.readlink("", dir_fd=fd)
    if os.readlink("/proc/self/fd/%d" % fd2) != gone + " (deleted)":
        return "the removed link's descriptor names %s" % os.readlink("/proc/self/fd/%d" % fd2)
    if os.readlink("", dir_fd=fd2) != target or os.path.lexists(gone):
        return "the removed link is not as it was"
    return "ok"


selfcheck.run(report, token, verify)

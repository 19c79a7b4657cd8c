"""tmpfile.py DIR REPORT: a file made with O_TMPFILE (never named), across
C/R.

The check (SIGUSR2, see selfcheck): the descriptor still reads what was
written (at its offset), is still writable and still has no name.
"""
import os
import sys

import selfcheck

d, report = sys.argv[1], sys.argv[-1]
token = os.urandom(8).hex()
fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
os.write(fd, token.encode() * 100)
os.lseek(fd, 16, os.SEEK_SET)


def verify():
    if os.lseek(fd, 0, os.SEEK_CUR) != 16:
        return "offset %d" % os.lseek(fd, 0, os.SEEK_CUR)
    if os.pread(fd, 16, 0) != token.encode():
        return "contents differ"
    if os.fstat(fd).st_nlink != 0:
        return "it has a name now (%d links)" % os.fstat(fd).st_nlink
    os.pwrite(fd, b"x", 0)
    if os.pread(fd, 1, 0) != b"x":
        return "not writable"
    return "ok"


selfcheck.run(report, token, verify)

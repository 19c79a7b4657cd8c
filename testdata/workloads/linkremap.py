"""linkremap.py REPORT: a file open by a removed name that lives on under
another (a hard link), across C/R.

In REPORT's directory it writes a file, links it to "other", opens it by
its first name and removes that name. The check (SIGUSR2, see
selfcheck): the descriptor is still the file named "other": what it
writes reads back through that name.
"""
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
d = os.path.dirname(os.path.abspath(report))
first, other = os.path.join(d, "first"), os.path.join(d, "other")
with open(first, "w") as f:
    f.write("before")
os.link(first, other)
fd = os.open(first, os.O_RDWR)
os.unlink(first)


def verify():
    if os.fstat(fd).st_ino != os.stat(other).st_ino:
        return "the descriptor is another file than %s" % other
    os.pwrite(fd, token.encode(), 0)
    with open(other) as f:
        if f.read(len(token)) != token:
            return "what the descriptor writes does not reach %s" % other
    return "ok"


selfcheck.run(report, token, verify)

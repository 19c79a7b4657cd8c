"""inotifyrm.py DIR REPORT: an inotify watch on a file removed since (and
still open), across C/R.

The check (SIGUSR2, see selfcheck): closing the file (open for writing)
is reported on its watch (IN_CLOSE_WRITE), so the watch is still on the
very file the process has open.
"""
import ctypes
import os
import select
import struct
import sys

import selfcheck

IN_CLOSE_WRITE, IN_NONBLOCK = 0x8, 0o4000
libc = ctypes.CDLL(None, use_errno=True)
d, report = sys.argv[1], sys.argv[-1]
token = os.urandom(8).hex()
path = os.path.join(d, "watched")
f = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
os.write(f, token.encode())
ino = libc.inotify_init1(IN_NONBLOCK)
wd = libc.inotify_add_watch(ino, path.encode(), IN_CLOSE_WRITE)
os.unlink(path)


def verify():
    try:
        while os.read(ino, 4096):  # what queued meanwhile
            pass
    except BlockingIOError:
        pass
    os.close(f)
    if not select.select([ino], [], [], 2)[0]:
        return "closing the file was not reported"
    buf = os.read(ino, 4096)
    while buf:
        w, mask, _, n = struct.unpack("iIII", buf[:16])
        if w == wd and mask & IN_CLOSE_WRITE:
            return "ok"
        buf = buf[16 + n:]
    return "no IN_CLOSE_WRITE on watch %d" % wd


selfcheck.run(report, token, verify)

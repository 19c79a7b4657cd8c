"""fanotify.py DIR REPORT: a fanotify group across C/R.

A group (FAN_CLASS_NOTIF, nonblocking) marking DIR/watched for opens and
close-after-write, with an ignored mask (FAN_MARK_IGNORED_SURV_MODIFY) on
DIR/quiet, and the mount of DIR marked for close-after-write too. The check
(SIGUSR2, see selfcheck): fdinfo lists the same marks as before the dump,
and opening DIR/watched is reported through the group.
"""
import ctypes
import os
import struct
import sys

import selfcheck

FAN_CLASS_NOTIF, FAN_NONBLOCK = 0x0, 0x2
FAN_MARK_ADD, FAN_MARK_MOUNT, FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORED_SURV_MODIFY = 0x1, 0x10, 0x20, 0x40
FAN_OPEN, FAN_CLOSE_WRITE, FAN_MODIFY = 0x20, 0x8, 0x2
AT_FDCWD = -100
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]

d, report = sys.argv[1], sys.argv[-1]
token = os.urandom(8).hex()
watched, quiet = os.path.join(d, "watched"), os.path.join(d, "quiet")
for p in (watched, quiet):
    open(p, "w").close()
fd = libc.fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK, os.O_RDONLY)


def mark(flags, mask, path):
    if libc.fanotify_mark(fd, FAN_MARK_ADD | flags, mask, AT_FDCWD, path.encode()) != 0:
        raise OSError(ctypes.get_errno(), "fanotify_mark " + path)


mark(0, FAN_OPEN | FAN_CLOSE_WRITE, watched)
mark(FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY, FAN_MODIFY, quiet)
mark(FAN_MARK_MOUNT, FAN_CLOSE_WRITE, d)


def marks():
    lines = [l.split() for l in open("/proc/self/fdinfo/%d" % fd) if l.startswith("fanotify ")]
    # Without inode numbers and handles (the files are the same; their
    # handles are too) nor mount ids (the mount is the same).
    return sorted(" ".join(w for w in l if w.split(":")[0] in ("flags", "event-flags", "mflags", "mask", "ignored_mask"))
                  for l in lines)


before = marks()


def verify():
    got = marks()
    if got != before:
        return "marks %s, were %s" % (got, before)
    try:
        while os.read(fd, 4096):  # drop what queued meanwhile
            pass
    except BlockingIOError:
        pass
    os.close(os.open(watched, os.O_RDONLY))
    try:
        ev = os.read(fd, 4096)
    except BlockingIOError:
        return "opening the watched file was not reported"
    _, _, _, _, mask, efd, _ = struct.unpack("IBBHQii", ev[:24])
    if efd >= 0:
        os.close(efd)
    if not mask & FAN_OPEN:
        return "event mask %#x" % mask
    return "ok"


selfcheck.run(report, token, verify)

"""locks.py DIR REPORT: holds file locks that must survive checkpoint/restore.

A POSIX write lock on bytes 5-14 of DIR/posix, a shared flock on DIR/flock,
an OFD write lock on all of DIR/ofd and a read lease on DIR/lease (the
report's lease= is F_GETLEASE: 0 for a read lease, 2 for none). A random token lives only in
memory; on SIGUSR1 it writes a report (key=value lines, atomic rename).
"""
import fcntl
import os
import signal
import struct
import sys
import time

F_OFD_SETLK = 37
d, report = sys.argv[1], sys.argv[2]
token = os.urandom(8).hex()
posix = open(os.path.join(d, "posix"), "w")
flk = open(os.path.join(d, "flock"), "w")
ofd = os.open(os.path.join(d, "ofd"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(posix, fcntl.LOCK_EX, 10, 5)
fcntl.flock(flk, fcntl.LOCK_SH)
fcntl.fcntl(ofd, F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
open(os.path.join(d, "lease"), "w").close()
lease = os.open(os.path.join(d, "lease"), os.O_RDONLY)
fcntl.fcntl(lease, fcntl.F_SETLEASE, fcntl.F_RDLCK)
counter = 0
want = True


def on_usr1(signum, frame):
    global want
    want = True


signal.signal(signal.SIGUSR1, on_usr1)
seq = 0
while True:
    counter += 1
    if want:
        want = False
        seq += 1
        with open(report + ".tmp", "w") as f:
            f.write("status=ok\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\nlease=%d\n" % (
                os.getpid(), token, counter, seq, fcntl.fcntl(lease, fcntl.F_GETLEASE)))
        os.rename(report + ".tmp", report)
    time.sleep(0.01)

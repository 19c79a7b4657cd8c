"""leasebreak.py DIR REPORT: holds two leases that are being broken.

DIR/a: a read lease, broken by an open for writing (breaking to none);
DIR/b: a write lease, broken by an open for reading (breaking to a read
lease). Both opens were O_NONBLOCK: they failed and left the breaks under
way. The lease-break signal is SIGIO; the report counts the SIGIOs seen
(sigio=, 2 after the setup) and gives F_GETLEASE of each (lease_a=,
lease_b=: 0 read, 1 write, 2 none), with a random token kept only in
memory. On SIGUSR2 it completes both breaks (a released, b downgraded).
On SIGUSR1 it writes the report (key=value lines, atomic rename).
"""
import errno
import fcntl
import os
import signal
import sys
import time

d, report = sys.argv[1], sys.argv[2]
token = os.urandom(8).hex()
sigio = 0
want = True
finish = False


def on_sigio(signum, frame):
    global sigio
    sigio += 1


def on_usr1(signum, frame):
    global want
    want = True


def on_usr2(signum, frame):
    global finish
    finish = True


signal.signal(signal.SIGIO, on_sigio)
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, on_usr2)
F_SETSIG = 10


def leased(name, mode, lease, breaker):
    path = os.path.join(d, name)
    open(path, "w").close()
    fd = os.open(path, mode)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, lease)
    fcntl.fcntl(fd, F_SETSIG, signal.SIGIO)
    try:
        os.close(os.open(path, breaker | os.O_NONBLOCK))
        sys.exit("the open did not conflict with the lease on " + name)
    except OSError as e:
        if e.errno != errno.EWOULDBLOCK:
            raise
    return fd


a = leased("a", os.O_RDONLY, fcntl.F_RDLCK, os.O_WRONLY)
b = leased("b", os.O_WRONLY, fcntl.F_WRLCK, os.O_RDONLY)
seq = counter = 0
while True:
    counter += 1
    if finish:
        finish = False
        fcntl.fcntl(a, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        fcntl.fcntl(b, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        want = True
    if want:
        want = False
        seq += 1
        with open(report + ".tmp", "w") as f:
            f.write("status=ok\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\nsigio=%d\nlease_a=%d\nlease_b=%d\n" % (
                os.getpid(), token, counter, seq, sigio, fcntl.fcntl(a, fcntl.F_GETLEASE), fcntl.fcntl(b, fcntl.F_GETLEASE)))
        os.rename(report + ".tmp", report)
    time.sleep(0.01)

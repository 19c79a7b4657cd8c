"""leasebreak.py DIR REPORT: holds two leases that are being broken.

DIR/a: a read lease, broken by an open for writing (breaking to none);
DIR/b: a write lease, broken by an open for reading (breaking to a read
lease). Both opens were O_NONBLOCK: they failed and left the breaks under
way. The lease-break signal is SIGIO; the report (see selfcheck) counts
the SIGIOs seen (sigio=, 2 after the setup) and gives F_GETLEASE of each
(lease_a=, lease_b=: 0 read, 1 write, 2 none). The check (SIGUSR2)
completes both breaks by releasing the leases (b cannot take the read
lease it is broken to: its own description is open for writing, and the
kernel refuses a read lease to a file open for writing, EAGAIN).
"""
import errno
import fcntl
import os
import signal
import sys

import selfcheck

d, report = sys.argv[1], sys.argv[-1]
token = os.urandom(8).hex()
sigio = 0


def on_sigio(signum, frame):
    global sigio
    sigio += 1


signal.signal(signal.SIGIO, on_sigio)
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


def finish():
    fcntl.fcntl(a, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    fcntl.fcntl(b, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return "ok"


selfcheck.run(report, token, finish, lambda checked: {
    "sigio": sigio, "lease_a": fcntl.fcntl(a, fcntl.F_GETLEASE), "lease_b": fcntl.fcntl(b, fcntl.F_GETLEASE)})

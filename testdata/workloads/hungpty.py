"""hungpty.py REPORT: pty slaves whose master is closed (hung up), across
C/R.

The check (SIGUSR2, see selfcheck): both slaves are still terminals that
are hung up (their settings cannot be read: EIO), and one pty still (two
fds, one description each, of the same tty).
"""
import os
import sys
import termios

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
master, s1 = os.openpty()
s2 = os.open(os.ttyname(s1), os.O_RDWR | os.O_NOCTTY)
os.close(master)


def verify():
    for fd in (s1, s2):
        try:
            termios.tcgetattr(fd)
            return "fd %d is not hung up" % fd
        except termios.error as e:
            if e.args[0] != 5:  # EIO
                return "fd %d: %s" % (fd, e)
    if os.fstat(s1).st_rdev != os.fstat(s2).st_rdev:
        return "the two slaves are of different ptys"
    return "ok"


selfcheck.run(report, token, verify)

"""ptyqueue.py REPORT: what waits in a pty's queues, across C/R.

A pty pair held by the process (a session leader), the slave its
controlling terminal, also open as /dev/tty: two lines written to the
master wait to be read from the slave (in canonical mode, echo on), with
the start of a third line after them, and a line written to the slave
waits to be read from the master (after the echo of the input). The check
(SIGUSR2, see selfcheck): the slave reads the two lines, then the third
once the master ends it, the master reads the echo and the output, as
they were, and what is written to /dev/tty reaches the master.
"""
import fcntl
import os
import select
import sys
import termios
import time

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
master, slave = os.openpty()
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
devtty = os.open("/dev/tty", os.O_RDWR)
os.write(master, b"first " + token.encode() + b"\nsecond\npart")
time.sleep(0.2)  # the line discipline echoes the input from a work queue
os.write(slave, b"output\n")
echo_and_out = b"first " + token.encode() + b"\r\nsecond\r\npartoutput\r\nial\r\n"


def read_all(fd, want):
    got = b""
    while len(got) < len(want) and select.select([fd], [], [], 2)[0]:
        got += os.read(fd, 4096)
    return got


def verify():
    for want in (b"first " + token.encode() + b"\n", b"second\n"):
        got = os.read(slave, 4096) if select.select([slave], [], [], 2)[0] else b""
        if got != want:
            return "the slave reads %r, want %r" % (got, want)
    os.write(master, b"ial\n")
    got = os.read(slave, 4096) if select.select([slave], [], [], 2)[0] else b""
    if got != b"partial\n":
        return "the slave reads %r once the third line ends, want 'partial\\n'" % got
    got = read_all(master, echo_and_out)
    if got != echo_and_out:
        return "the master reads %r, want %r" % (got, echo_and_out)
    if os.readlink("/proc/self/fd/%d" % devtty) != "/dev/tty":
        return "fd %d is %s, not /dev/tty" % (devtty, os.readlink("/proc/self/fd/%d" % devtty))
    os.write(devtty, b"via /dev/tty\n")
    got = read_all(master, b"via /dev/tty\r\n")
    if got != b"via /dev/tty\r\n":
        return "/dev/tty does not reach the pty: the master reads %r" % got
    return "ok"


selfcheck.run(report, token, verify)

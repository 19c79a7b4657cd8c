"""epollflight.py REPORT: an epoll in flight over SCM_RIGHTS, across C/R.

An epoll watching one end of a datagram socket pair is sent through that
pair, twice, and closed. The check (SIGUSR2, see selfcheck): received
back, it is still an epoll watching that socket (it reports it readable
while messages wait there).
"""
import os
import select
import socket
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
ep = select.epoll()
ep.register(b.fileno(), select.EPOLLIN)
for _ in range(2):
    socket.send_fds(a, [token.encode()], [ep.fileno()])
ep.close()


def verify():
    msg, fds, _, _ = socket.recv_fds(b, 64, 1)
    if msg != token.encode() or len(fds) != 1:
        return "received %r with %d fds" % (msg, len(fds))
    if os.readlink("/proc/self/fd/%d" % fds[0]) != "anon_inode:[eventpoll]":
        return "received %s, not an epoll" % os.readlink("/proc/self/fd/%d" % fds[0])
    got = select.epoll.fromfd(fds[0]).poll(1)
    if [fd for fd, _ in got] != [b.fileno()]:
        return "the epoll reports %s, want the socket %d readable" % (got, b.fileno())
    return "ok"


selfcheck.run(report, token, verify)

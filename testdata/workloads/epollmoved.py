"""epollmoved.py REPORT: an epoll registration whose number was closed.

A pipe's read end is registered with epoll through a duplicate that is
then closed: the registration stays (its file is still open under the
first descriptor), but its number holds nothing. The check (SIGUSR2, see
selfcheck): a write to the pipe wakes the epoll, reporting that number.
"""
import os
import select
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
r, w = os.pipe()
dup = os.dup(r)
ep = select.epoll()
ep.register(dup, select.EPOLLIN)
os.close(dup)


def verify():
    os.write(w, b"x")
    events = ep.poll(5)
    os.read(r, 1)
    if [fd for fd, _ in events] != [dup]:
        return "epoll reported %r, want [%d]" % (events, dup)
    return "ok"


selfcheck.run(report, token, verify)

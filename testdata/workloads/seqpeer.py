"""seqpeer.py REPORT: a seqpacket socket whose peer closed, across C/R.

A unix seqpacket pair; the peer sends two records derived from a random
token (kept only in memory) and closes. The check (SIGUSR2, see
selfcheck): the remaining end reads both records, then the end.
"""
import os
import socket
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
records = [("first " + token).encode(), ("second " + token).encode()]
for r in records:
    b.send(r)
b.close()


def verify():
    a.settimeout(5)
    for want in records + [b""]:
        got = a.recv(256)
        if got != want:
            return "read %r, want %r" % (got, want)
    return "ok"


selfcheck.run(report, token, verify)

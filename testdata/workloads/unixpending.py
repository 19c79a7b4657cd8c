"""unixpending.py DIR REPORT: a unix listener with connections waiting to
be accepted, across C/R.

Two clients connect to a listener bound in DIR and are not accepted; the
second then closes. The check (SIGUSR2, see selfcheck): the first client
can still send, the listener accepts its connection first (with what it
sent), then the second one, whose client is gone (end of file).
"""
import os
import socket
import sys

import selfcheck

d, report = sys.argv[1], sys.argv[-1]
token = os.urandom(8).hex()
path = os.path.join(d, "listen.sock")
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(path)
ls.listen(8)
c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c1.connect(path)
c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c2.connect(path)
c2.close()


def verify():
    c1.sendall(token.encode())
    ls.settimeout(2)
    a1, _ = ls.accept()
    a1.settimeout(2)
    if a1.recv(64) != token.encode():
        return "the first pending connection is not the first client's"
    a2, _ = ls.accept()
    a2.settimeout(2)
    if a2.recv(64) != b"":
        return "the second pending connection's client is not gone"
    return "ok"


selfcheck.run(report, token, verify)

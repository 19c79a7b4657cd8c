"""unixpending.py DIR REPORT: a unix listener with connections waiting to
be accepted, across C/R.

A first client connects and is accepted (the accepted end shows the
listener's name). Two more connect and are not accepted; the last then
closes. The check (SIGUSR2, see selfcheck): the accepted connection still
carries data both ways; the second client can still send, the listener
accepts its connection first (with what it sent), then the third one,
whose client is gone (end of file).
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
c0 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c0.connect(path)
a0, _ = ls.accept()
c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c1.connect(path)
c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c2.connect(path)
c2.close()


def verify():
    c0.sendall(b"ping")
    a0.settimeout(2)
    if a0.recv(64) != b"ping":
        return "the accepted connection lost its client"
    a0.sendall(b"pong")
    c0.settimeout(2)
    if c0.recv(64) != b"pong":
        return "the client lost its accepted connection"
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

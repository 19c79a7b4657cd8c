"""unixrel.py REPORT: a unix listener bound to a relative name, across C/R.

It works in REPORT's directory and binds a listener to "rel.sock" there,
by that relative name. The check (SIGUSR2, see selfcheck): the name is
still "rel.sock", and a connection to it, by the relative name, is
accepted and carries a random token kept only in memory.
"""
import os
import socket
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
os.chdir(os.path.dirname(os.path.abspath(report)))
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind("rel.sock")
lst.listen(4)


def verify():
    if lst.getsockname() != "rel.sock":
        return "bound to %r" % lst.getsockname()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect("rel.sock")
    s, _ = lst.accept()
    s.sendall(token.encode())
    if c.recv(64) != token.encode():
        return "wrong token"
    return "ok"


selfcheck.run(report, token, verify)

"""dgrambound.py DIR REPORT: a bound datagram socket with messages from a
sender that is gone, across C/R.

The check (SIGUSR2, see selfcheck): the two queued messages are still
there, in order, and a new sender can still reach the socket by its name.
"""
import os
import socket
import sys

import selfcheck

d, report = sys.argv[1], sys.argv[-1]
token = os.urandom(8).hex()
path = os.path.join(d, "bound.sock")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(path)
snd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
snd.connect(path)
snd.send(b"first " + token.encode())
snd.send(b"second")
snd.close()


def verify():
    srv.settimeout(2)
    for want in (b"first " + token.encode(), b"second"):
        got = srv.recv(64)
        if got != want:
            return "queued %r, want %r" % (got, want)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        c.connect(path)
        c.send(b"new")
    except OSError as e:
        return "a new sender cannot reach %s: %s" % (path, e)
    finally:
        c.close()
    if srv.recv(64) != b"new":
        return "the new message did not arrive"
    return "ok"


selfcheck.run(report, token, verify)

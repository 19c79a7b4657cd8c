"""dgrambound.py DIR REPORT: named datagram sockets across C/R.

A bound socket with messages from a sender that is gone; a client
connected to another bound socket, with a message queued there; and a
socket bound and connected to its own name.

The check (SIGUSR2, see selfcheck): the two queued messages are still
there, in order, and a new sender can still reach the socket by its name;
the client's message is still queued on the server, and the client is
still connected to it; the self-connected socket hears itself.
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
srv2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv2.bind(os.path.join(d, "srv2.sock"))
cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
cli.connect(os.path.join(d, "srv2.sock"))
cli.send(b"queued")
selfc = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
selfc.bind(os.path.join(d, "self.sock"))
selfc.connect(os.path.join(d, "self.sock"))


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
    srv2.settimeout(2)
    if srv2.recv(64) != b"queued":
        return "the client's queued message is gone"
    if cli.getpeername() != os.path.join(d, "srv2.sock"):
        return "the client is connected to %r" % cli.getpeername()
    cli.send(b"again")
    if srv2.recv(64) != b"again":
        return "the client does not reach its server"
    selfc.settimeout(2)
    selfc.send(b"echo")
    if selfc.recv(64) != b"echo":
        return "the self-connected socket does not hear itself"
    return "ok"


selfcheck.run(report, token, verify)

"""udpshut.py REPORT: a UDP socket shut down for writing, across C/R.

Two connected UDP sockets on 127.0.0.1; the first shut down writing. A
random token lives only in memory. The check (SIGUSR2, see selfcheck):
the first still cannot send (EPIPE), and still receives what the second
sends it.
"""
import os
import socket
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a.bind(("127.0.0.1", 0))
b.bind(("127.0.0.1", 0))
a.connect(b.getsockname())
b.connect(a.getsockname())
a.shutdown(socket.SHUT_WR)


def verify():
    try:
        a.send(b"x")
        return "the shut-down socket sends"
    except BrokenPipeError:
        pass
    b.send(token.encode())
    a.settimeout(5)
    if a.recv(64) != token.encode():
        return "wrong datagram"
    return "ok"


selfcheck.run(report, token, verify)

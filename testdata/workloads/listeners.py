"""listeners.py REPORT: TCP listeners across C/R.

Two listeners share a port through SO_REUSEPORT, and the first turns the
option off once bound (so the restore must bind both with it and set it
back). A connection to that port waits, never accepted, in a listener's
queue (dump --skip-in-flight leaves it behind). A random token lives only
in memory. SIGUSR1 writes a report (key=value, atomic rename); the first
SIGUSR2 checks, in the next report: "check=ok" when SO_REUSEPORT is off
on the first listener and on on the second, and a new connection to the
port is accepted and answered.
"""
import os
import select
import socket
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()


def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s


l1 = listener(0)
port = l1.getsockname()[1]
l2 = listener(port)
l1.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
pending = socket.create_connection(("127.0.0.1", port))  # never accepted




def verify():
    if l1.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0:
        return "SO_REUSEPORT is on on the first listener"
    if l2.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 1:
        return "SO_REUSEPORT is off on the second listener"
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    ready, _, _ = select.select([l1, l2], [], [], 5)
    if not ready:
        return "no listener accepts a new connection"
    s, _ = ready[0].accept()
    s.sendall(token.encode())
    c.settimeout(5)
    if c.recv(64) != token.encode():
        return "wrong answer"
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"port": port})

"""prefork.py REPORT: a pre-forking server, across C/R.

The master listens on 127.0.0.1 and forks four workers that accept on
that one listening socket; a worker answers each connection with its PID
and a token it drew at start, then rests 200 ms (so that connections
made together spread over the workers). The report names the port and
the workers (port=, pids=). The check (SIGUSR2, see selfcheck): four
connections made together are answered by the four workers, each with
the token it had before (restored, not re-run).
"""
import os
import signal
import socket
import sys
import time

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
N = 4
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
port = ls.getsockname()[1]
r, w = os.pipe()
workers = []
for _ in range(N):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        mine = os.urandom(8).hex()
        os.write(w, ("%d %s\n" % (os.getpid(), mine)).encode())
        while True:
            c, _ = ls.accept()
            c.sendall(("%d %s\n" % (os.getpid(), mine)).encode())
            c.close()
            time.sleep(0.2)
    workers.append(pid)
known = {}
buf = b""
while len(known) < N:
    buf += os.read(r, 256)
    for line in buf.split(b"\n")[:-1]:
        p, t = line.split()
        known[int(p)] = t.decode()
    buf = buf[buf.rfind(b"\n") + 1:]


def verify():
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(N)]
    seen = {}
    for c in conns:
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(64)
            if not chunk:
                break
            data += chunk
        c.close()
        p, t = data.split()
        seen[int(p)] = t.decode()
    if sorted(seen) != sorted(known):
        return "answered by %s, workers %s" % (sorted(seen), sorted(known))
    for p, t in seen.items():
        if known[p] != t:
            return "worker %d has another token: it was re-run" % p
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"port": port, "pids": ",".join(map(str, workers))})

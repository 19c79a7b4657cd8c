"""peerclosed.py [closed] REPORT: a TCP connection whose peer closed, across C/R.

Both ends live in this process, on 127.0.0.1. The client sends a line
derived from a random token (kept only in memory) and shuts down writing;
the server reads nothing yet, so its end sits in close-wait with the line
and the peer's FIN queued. On SIGUSR1 it writes a report (key=value
lines, atomic rename; "server_state" is the server end's TCP state, 8 for
close-wait). The first SIGUSR2 makes the server read the line and then the
end of the stream, answer, and close; the client must read the answer and
then the end: "check=ok" in the next report, or the reason.

With "closed" (a restore with --tcp-close) the check is instead that both
ends came back closed: TCP state 7, reads see the end of the stream,
writes fail with EPIPE.
"""
import os
import socket
import sys
import time

import selfcheck

report = sys.argv[-1]
expect_closed = sys.argv[1:-1] == ["closed"]
token = os.urandom(8).hex()
line = ("line-before-fin " + token + "\n").encode()
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(1)
cli = socket.create_connection(lst.getsockname())
srv, _ = lst.accept()
cli.sendall(line)
cli.shutdown(socket.SHUT_WR)
time.sleep(0.1)




def state(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def read_to_end(s):
    s.settimeout(10)
    got = b""
    while True:
        b = s.recv(4096)
        if not b:
            return got
        got += b


def verify_closed():
    for name, s in (("server", srv), ("client", cli)):
        if state(s) != 7:
            return "%s end in TCP state %d, want 7 (closed)" % (name, state(s))
        if s.recv(16, socket.MSG_DONTWAIT) != b"":
            return "%s end reads data" % name
        try:
            s.send(b"x", socket.MSG_DONTWAIT)
            return "%s end still writes" % name
        except BrokenPipeError:
            pass
    return "ok"


def verify():
    if expect_closed:
        return verify_closed()
    got = read_to_end(srv)
    if got != line:
        return "server read %r, want %r" % (got, line)
    srv.sendall(b"answer " + token.encode())
    srv.close()
    got = read_to_end(cli)
    if got != b"answer " + token.encode():
        return "client read %r" % got
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"server_state": 0 if checked else state(srv)})

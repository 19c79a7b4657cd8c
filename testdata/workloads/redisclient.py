#!/usr/bin/env python3
"""A redis client that checks every answer, for the migration tests.

    redisclient.py HOST PORT KEYS STOPFILE REPORT

It loads KEYS keys (key:N = value:N) over one connection, writes "ready"
to REPORT, then issues commands on that same connection until STOPFILE
exists: INCR of a counter, SET and GET of a fresh key, each answer
checked. Then it reads every key back and writes its findings to REPORT
as JSON: ops, errors (with the first few), the longest wait for an
answer, whether every key and the counter are as written. A connection
that breaks is an error and ends the run: the point is that the one
connection survives.
"""
import json
import os
import socket
import sys
import time


class Conn:
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port), timeout=60)
        self.buf = b""

    def send(self, *cmds):
        out = []
        for c in cmds:
            out.append(b"*%d\r\n" % len(c))
            for a in c:
                a = a if isinstance(a, bytes) else str(a).encode()
                out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.s.sendall(b"".join(out))

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        l, self.buf = self.buf.split(b"\r\n", 1)
        return l

    def reply(self):
        l = self.line()
        kind, rest = l[:1], l[1:]
        if kind in (b"+", b":"):
            return rest.decode()
        if kind == b"-":
            raise RuntimeError("redis error: " + rest.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.s.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("connection closed by the server")
                self.buf += chunk
            v, self.buf = self.buf[:n], self.buf[n + 2:]
            return v.decode()
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError("unexpected reply %r" % l)


def main():
    host, port, keys, stopfile, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    c = Conn(host, port)
    batch = 1000
    for i in range(0, keys, batch):
        n = min(batch, keys - i)
        c.send(*[("SET", "key:%d" % k, "value:%d" % k) for k in range(i, i + n)])
        for _ in range(n):
            c.reply()
    with open(report + ".tmp", "w") as f:
        f.write("ready\n")
    os.rename(report + ".tmp", report)

    ops, errors, longest, counter = 0, [], 0.0, 0
    broken = False
    while not os.path.exists(stopfile):
        try:
            t0 = time.monotonic()
            c.send(("INCR", "counter"))
            got = int(c.reply())
            counter += 1
            if got != counter:
                errors.append("INCR counter: %d, want %d" % (got, counter))
            c.send(("SET", "op:%d" % ops, ops), ("GET", "op:%d" % ops))
            if c.reply() != "OK":
                errors.append("SET op:%d failed" % ops)
            if c.reply() != str(ops):
                errors.append("GET op:%d: wrong value" % ops)
            longest = max(longest, time.monotonic() - t0)
            ops += 1
        except Exception as e:  # the connection broke: that is the failure
            errors.append("op %d: %s" % (ops, e))
            broken = True
            break
        time.sleep(0.002)

    missing = -1
    if not broken:
        missing = 0
        try:
            for i in range(0, keys, batch):
                n = min(batch, keys - i)
                c.send(("MGET",) + tuple("key:%d" % k for k in range(i, i + n)))
                vals = c.reply()
                missing += sum(1 for k, v in zip(range(i, i + n), vals) if v != "value:%d" % k)
            c.send(("GET", "counter"))
            if int(c.reply()) != counter:
                errors.append("counter is not %d at the end" % counter)
        except Exception as e:
            errors.append("reading the keys back: %s" % e)
    with open(report + ".tmp", "w") as f:
        json.dump({"ops": ops, "errors": len(errors), "first_errors": errors[:5], "longest_wait_ms": longest * 1000,
                   "missing_keys": missing, "keys": keys}, f)
    os.rename(report + ".tmp", report)


if __name__ == "__main__":
    main()

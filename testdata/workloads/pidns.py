"""pidns.py [uts] REPORT: the init of a PID namespace of its own, with a tree.

Run as PID 1 of a new PID namespace (unshare --pid --fork), it makes a
session of its own and forks A,
which makes a session and forks B; and Z, which exits with status 7 and is
left a zombie. A and B answer requests through pipes with what they see:
their PID, parent, session and group. No /proc: the namespace shares
ferry's.

With "uts" (in a UTS namespace of its own too) it sets the host and
domain names, and the check wants them the same.

The report names A, B and Z as the namespace sees them (inner=; never PIDs
to signal from outside). The check (SIGUSR2, see selfcheck): the root is
still PID 1, A and B answer with the same PIDs, parents, sessions and
groups, Z is still a zombie with status 7.
"""
import ctypes
import os
import select
import signal
import socket
import struct
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
if os.getpid() != 1:
    sys.exit("pidns.py must be the init of its PID namespace")
os.setsid()  # as a container's init is
names = None
if "uts" in sys.argv[1:-1]:
    names = ("pidns-" + token[:8], "dom-" + token[8:])
    socket.sethostname(names[0])
    ctypes.CDLL(None).setdomainname(names[1].encode(), len(names[1]))


def answerer(req, ans):
    while True:
        os.read(req, 1)
        os.write(ans, struct.pack("4i", os.getpid(), os.getppid(), os.getsid(0), os.getpgid(0)))


a_req, a_ans, b_req, b_ans = os.pipe(), os.pipe(), os.pipe(), os.pipe()
a = os.fork()
if a == 0:
    os.setsid()
    if os.fork() == 0:
        answerer(b_req[0], b_ans[1])
    answerer(a_req[0], a_ans[1])
z = os.fork()
if z == 0:
    os._exit(7)


def ask(req, ans):
    os.write(req[1], b"?")
    if not select.select([ans[0]], [], [], 5)[0]:
        return None
    return struct.unpack("4i", os.read(ans[0], 16))


ask(a_req, a_ans)  # A is up
b_seen = ask(b_req, b_ans)
b = b_seen[0]
want = {"A": (a, 1, a, a), "B": (b, a, a, a)}


def verify():
    if os.getpid() != 1:
        return "the root is PID %d, not 1" % os.getpid()
    if names:
        got = (socket.gethostname(), open("/proc/sys/kernel/domainname").read().strip())
        if got != names:
            return "host and domain names %s, want %s" % (got, names)
    for name, req, ans in (("A", a_req, a_ans), ("B", b_req, b_ans)):
        got = ask(req, ans)
        if got != want[name]:
            return "%s sees (pid, parent, session, group) %s, want %s" % (name, got, want[name])
    info = os.waitid(os.P_PID, z, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_status != 7:
        return "Z is not a zombie with status 7: %s" % (info,)
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"inner": "%d,%d,%d" % (a, b, z)})

"""tree2.py REPORT: children whose state the dump must carry over.

The root forks:
  S  stopped by SIGTSTP (and not continued), in a group of its own;
  P  with a parent-death signal (SIGUSR2), which it reports on request
     through a pipe;
  Q  which forks C and then makes a session of its own (C stays in the
     root's session: a session neither C's own nor its parent's);
  D  which exits and is reaped at once.
The root holds a pidfd of P, a pidfd of D (a pidfd of a dead process by
then), /proc/P/stat open, and a pipe whose SIGIO goes to P as SIGURG
(O_ASYNC, F_SETOWN, F_SETSIG).

The report names S, P, Q and C (pids=, for the test to end them). The check
(SIGUSR2, see selfcheck): S is still stopped, and by SIGTSTP; P's
parent-death signal is SIGUSR2; the pidfd of P is P's and reaches it;
the pidfd of D still names a dead process; /proc/P/stat is still P's;
the pipe's owner, signal and O_ASYNC are as set; Q and C are in their
sessions.
"""
import ctypes
import fcntl
import os
import select
import signal
import struct
import sys

import selfcheck

PR_GET_PDEATHSIG, PR_SET_PDEATHSIG = 2, 1
libc = ctypes.CDLL(None, use_errno=True)
report = sys.argv[-1]
token = os.urandom(8).hex()

# In a group of its own: SIGTSTP does not stop a process of an orphaned
# group (the root's is one: its parent is in another session).
s = os.fork()
if s == 0:
    os.setpgid(0, 0)
    while True:
        signal.pause()
os.setpgid(s, s)
os.kill(s, signal.SIGTSTP)
os.waitid(os.P_PID, s, os.WSTOPPED | os.WNOWAIT)

req_r, req_w = os.pipe()
ans_r, ans_w = os.pipe()
p = os.fork()
if p == 0:
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR2))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    os.write(ans_w, b"r")
    while True:
        os.read(req_r, 1)
        v = ctypes.c_int(0)
        libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(v))
        os.write(ans_w, struct.pack("i", v.value))
os.read(ans_r, 1)

# Q forks C, then makes a session of its own: C stays in the root's.
q_r, q_w = os.pipe()
q = os.fork()
if q == 0:
    c = os.fork()
    if c == 0:
        while True:
            signal.pause()
    os.setsid()
    os.write(q_w, struct.pack("i", c))
    while True:
        signal.pause()
(c,) = struct.unpack("i", os.read(q_r, 4))

d = os.fork()
if d == 0:
    os._exit(0)
p_fd = os.pidfd_open(p)
d_fd = os.pidfd_open(d)
os.waitpid(d, 0)
stat_fd = os.open("/proc/%d/stat" % p, os.O_RDONLY)
F_SETSIG, F_GETSIG = 10, 11
io_r, io_w = os.pipe()
fcntl.fcntl(io_r, fcntl.F_SETOWN, p)
fcntl.fcntl(io_r, F_SETSIG, int(signal.SIGURG))
fcntl.fcntl(io_r, fcntl.F_SETFL, fcntl.fcntl(io_r, fcntl.F_GETFL) | os.O_ASYNC)


def pidfd_pid(fd):
    for line in open("/proc/self/fdinfo/%d" % fd):
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return None


def verify():
    st = open("/proc/%d/stat" % s).read()
    if st[st.rindex(")") + 2] != "T":
        return "S (%d) is not stopped" % s
    info = os.waitid(os.P_PID, s, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_status != signal.SIGTSTP:
        return "S was stopped by %s, not SIGTSTP" % (info and info.si_status)
    os.write(req_w, b"?")
    if not select.select([ans_r], [], [], 5)[0]:
        return "P did not answer"
    (sig,) = struct.unpack("i", os.read(ans_r, 4))
    if sig != signal.SIGUSR2:
        return "P's parent-death signal is %d" % sig
    if pidfd_pid(p_fd) != p:
        return "the pidfd of P names %s" % pidfd_pid(p_fd)
    signal.pidfd_send_signal(p_fd, 0)
    if pidfd_pid(d_fd) != -1:
        return "the pidfd of the dead D names %s" % pidfd_pid(d_fd)
    try:
        signal.pidfd_send_signal(d_fd, 0)
        return "the pidfd of the dead D reaches a process"
    except ProcessLookupError:
        pass
    if fcntl.fcntl(io_r, fcntl.F_GETOWN) != p or fcntl.fcntl(io_r, F_GETSIG) != signal.SIGURG:
        return "the pipe's owner is %d, signal %d" % (fcntl.fcntl(io_r, fcntl.F_GETOWN), fcntl.fcntl(io_r, F_GETSIG))
    if not fcntl.fcntl(io_r, fcntl.F_GETFL) & os.O_ASYNC:
        return "the pipe lost O_ASYNC"
    if os.getsid(q) != q or os.getsid(c) != os.getsid(0):
        return "Q's session %d (want %d), C's %d (want the root's %d)" % (os.getsid(q), q, os.getsid(c), os.getsid(0))
    if not os.pread(stat_fd, 64, 0).startswith(b"%d (" % p):
        return "/proc/P/stat reads %r" % os.pread(stat_fd, 64, 0)
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"pids": "%d,%d,%d,%d" % (s, p, q, c)})

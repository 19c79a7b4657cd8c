"""tree.py [nopty] REPORT: a process tree that checks itself across C/R.

The root (a session leader) forks:
  A  the leader of its own process group, with a grandchild G in that
     group; A answers the root's requests through two pipes and shared
     anonymous memory, and writes to a file whose open description
     (and so its offset) it shares with the root;
  B  the leader of a session of its own, whose controlling terminal is a
     pty the root holds the master of (B keeps no fd of it; not with
     "nopty": two hosts on one machine share /dev/pts);
  Z  a child that exits with status 7 and is never reaped (a zombie).

The report names them (pids=A,G,B,Z, for the test to end them) and
counts the checks done (checks=). The
check (SIGUSR2, see selfcheck): every process has its PID, parent, group
and session; Z is still a zombie with status 7; A answers a request with
the token it drew at start (so it was restored, not re-run), through
memory the two still share and through the pipes; and A's write moved
the root's file offset.
"""
import mmap
import os
import select
import signal
import struct
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
shm = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
up_r, up_w = os.pipe()
down_r, down_w = os.pipe()
log = open(report + ".log", "w+b", buffering=0)

a = os.fork()
if a == 0:
    os.setpgid(0, 0)
    g = os.fork()
    if g == 0:
        while True:
            signal.pause()
    mine = os.urandom(8)
    os.write(up_w, mine + struct.pack("q", g))
    while True:
        os.read(down_r, 1)
        (v,) = struct.unpack("q", shm[0:8])
        shm[8:16] = struct.pack("q", v + 1)
        shm[16:24] = mine
        log.write(b"x")
        os.write(up_w, b"k")

pts = None
if "nopty" not in sys.argv[1:-1]:
    master, slave = os.openpty()
    pts = os.ttyname(slave)
    os.close(slave)
b = os.fork()
if b == 0:
    os.setsid()
    if pts:
        os.close(os.open(pts, os.O_RDWR))  # opening it makes it B's terminal
    while True:
        signal.pause()

z = os.fork()
if z == 0:
    os._exit(7)

hello = os.read(up_r, 16)
a_token, (g,) = hello[:8], struct.unpack("q", hello[8:])
a_fds = sorted(os.listdir("/proc/%d/fd" % a), key=int)
# Z is a zombie once waitid sees it exited (without reaping it).
os.waitid(os.P_PID, z, os.WEXITED | os.WNOWAIT)


def stat(pid):
    s = open("/proc/%d/stat" % pid).read()
    f = s[s.rindex(")") + 2:].split()
    return {"state": f[0], "ppid": int(f[1]), "pgid": int(f[2]), "sid": int(f[3]), "tty": int(f[4])}


def verify():
    me = os.getpid()
    want = {
        a: ("ppid", me, "pgid", a, "sid", me),
        g: ("ppid", a, "pgid", a, "sid", me),
        b: ("ppid", me, "pgid", b, "sid", b),
        z: ("ppid", me, "pgid", me, "sid", me),
    }
    for pid, w in want.items():
        st = stat(pid)
        for k, v in zip(w[::2], w[1::2]):
            if st[k] != v:
                return "process %d: %s %d, want %d" % (pid, k, st[k], v)
    if pts and stat(b)["tty"] != os.stat(pts).st_rdev:
        return "B's controlling terminal is %#x, not %s" % (stat(b)["tty"], pts)
    if os.getsid(0) != me:
        return "the root is not a session leader"
    fds = sorted(os.listdir("/proc/%d/fd" % a), key=int)
    if fds != a_fds:
        return "A's fds are %s, were %s" % (fds, a_fds)
    if stat(z)["state"] != "Z":
        return "%d is no longer a zombie" % z
    info = os.waitid(os.P_PID, z, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_status != 7:
        return "zombie %d: %s" % (z, info)
    off = os.lseek(log.fileno(), 0, os.SEEK_CUR)
    v = struct.unpack("q", os.urandom(8))[0] >> 1
    shm[0:8] = struct.pack("q", v)
    os.write(down_w, b"?")
    if not select.select([up_r], [], [], 5)[0]:
        return "A did not answer"
    os.read(up_r, 1)
    if struct.unpack("q", shm[8:16])[0] != v + 1:
        return "A's answer is not in the shared memory"
    if shm[16:24] != a_token:
        return "A has another token: it was re-run"
    if os.lseek(log.fileno(), 0, os.SEEK_CUR) != off + 1:
        return "the file offset is no longer shared with A"
    return "ok"


checks = [0]  # verifies done, for a caller checking more than once


def counted():
    try:
        return verify()
    finally:
        checks[0] += 1


selfcheck.run(report, token, counted, lambda checked: {"pids": "%d,%d,%d,%d" % (a, g, b, z), "checks": checks[0]})

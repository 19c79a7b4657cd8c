"""tree3.py REPORT: sessions and groups whose leaders are dead or far away.

The root is a child subreaper, so orphans of the tree stay in it:
  L  makes a session and forks A; A forks B; B forks D; then B and A
     make sessions of their own: D stays in L's session, two sessions up.
  L also forks G, which makes a group and forks M; G exits: M (a child
     of the root now) is in L's session and in G's group, whose leader is
     dead.
  X  makes a session and forks Y and W; W makes a group and forks Z;
     X and W exit: Y and Z (children of the root now) are in X's session,
     whose leader is dead, and Z is in W's group, whose leader is dead.
  Q  forks K, which makes a session and forks N, which forks O; N exits:
     O (a child of the root now) is in K's session, which no child of
     the root is in.
The root reaps X, G and W; K reaps N.

The report names the live processes (pids=, for the test to end them).
The check (SIGUSR2, see selfcheck): every process has its parent, session
and group as before, and no helper the restore used is left (X, G and W
exist no more, and N neither).
"""
import ctypes
import os
import signal
import struct
import sys

import selfcheck

PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
report = sys.argv[-1]
token = os.urandom(8).hex()
info_r, info_w = os.pipe()


def tell(tag, *pids):
    pids = (pids + (0, 0))[:2]
    os.write(info_w, struct.pack("3i", ord(tag), *pids))


def hear(*tags):
    """Reads messages (several processes write) until every tag is in."""
    got = {}
    while not all(t in got for t in tags):
        tag, p1, p2 = struct.unpack("3i", os.read(info_r, 12))
        got[chr(tag)] = (p1, p2)
    return got


def sleep_forever():
    while True:
        signal.pause()


def fork(child):
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    return pid


def l_main():
    os.setsid()

    def a_main():
        def b_main():
            d = fork(sleep_forever)
            os.setsid()
            tell("B", os.getpid(), d)
            sleep_forever()

        fork(b_main)
        # A makes its session after B made its own (the root says when).
        os.read(sync_r, 1)
        os.setsid()
        tell("A", os.getpid())
        sleep_forever()

    fork(a_main)

    def g_main():
        os.setpgid(0, 0)
        tell("M", fork(sleep_forever))

    g = fork(g_main)
    os.waitpid(g, 0)
    tell("L", os.getpid(), g)
    sleep_forever()


def x_main():
    os.setsid()
    y = fork(sleep_forever)

    def w_main():
        os.setpgid(0, 0)
        tell("Z", fork(sleep_forever), os.getpid())

    w = fork(w_main)
    os.waitpid(w, 0)
    tell("Y", y)


def q_main():
    def k_main():
        os.setsid()

        def n_main():
            tell("O", fork(sleep_forever))

        n = fork(n_main)
        os.waitpid(n, 0)
        tell("K", os.getpid(), n)
        sleep_forever()

    fork(k_main)
    sleep_forever()


sync_r, sync_w = os.pipe()
fork(l_main)
got = hear("L", "M", "B")
(l, g), (m, _), (b, d) = got["L"], got["M"], got["B"]
os.write(sync_w, b"!")
(a, _) = hear("A")["A"]
x = fork(x_main)
got = hear("Z", "Y")
(z, w), (y, _) = got["Z"], got["Y"]
os.waitpid(x, 0)
q = fork(q_main)
got = hear("K", "O")
(k, n), (o, _) = got["K"], got["O"]
me = os.getpid()
want = {
    # pid: (parent, session, group)
    l: (me, l, l), a: (l, a, a), b: (a, b, b), d: (b, l, l),
    m: (me, l, g), y: (me, x, x), z: (me, x, w),
    q: (me, me, me), k: (q, k, k), o: (me, k, k),
}


def ppid(pid):
    st = open("/proc/%d/stat" % pid).read()
    return int(st[st.rindex(")") + 2:].split()[1])


def verify():
    for pid, (par, sid, pgid) in want.items():
        got = (ppid(pid), os.getsid(pid), os.getpgid(pid))
        if got != (par, sid, pgid):
            return "process %d: parent, session, group %s, want %s" % (pid, got, (par, sid, pgid))
    for dead in (g, x, w, n):
        if os.path.exists("/proc/%d" % dead):
            return "process %d (a dead leader) exists" % dead
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"pids": ",".join(str(p) for p in want)})

"""ipcns.py REPORT: SysV objects of an IPC namespace of its own.

Run in an IPC namespace of its own (unshare --ipc). It makes: segment A
(a key, mode 0640, 64 KiB) attached, holding the token; segment B (a key,
0600, 8 KiB) not attached, holding the token at offset 100; segment C
(private) attached and removed (IPC_RMID), holding the token at 4096; a
queue (a key, 0620) with three messages of types 1, 5 and 2; a set of
three semaphores (a key, 0600) at 7, 0 and 42.

The check (SIGUSR2, see selfcheck): /proc/sysvipc shows the same ids,
keys, modes and sizes (C removed), each segment holds its token (A and C
where they are mapped), the queue gives its messages in order, and the
semaphores have their values.
"""
import ctypes
import os
import sys

import selfcheck

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
IPC_CREAT, IPC_RMID, IPC_NOWAIT, SHM_DEST, GETALL, SETALL = 0o1000, 0, 0o4000, 0o1000, 13, 17
report = sys.argv[-1]
token = os.urandom(8).hex().encode()
base = int.from_bytes(os.urandom(2), "little") * 16 + 1
ka, kb, kq, ks = base, base + 1, base + 2, base + 3


def check(v, what):
    if v == -1 or v is None:
        raise OSError(ctypes.get_errno(), what)
    return v


a = check(libc.shmget(ka, 65536, IPC_CREAT | 0o640), "shmget A")
b = check(libc.shmget(kb, 8192, IPC_CREAT | 0o600), "shmget B")
c = check(libc.shmget(0, 8192, IPC_CREAT | 0o600), "shmget C")
a_at = check(libc.shmat(a, None, 0), "shmat A")
ctypes.memmove(a_at, token, len(token))
b_at = check(libc.shmat(b, None, 0), "shmat B")
ctypes.memmove(b_at + 100, token, len(token))
libc.shmdt(ctypes.c_void_p(b_at))
c_at = check(libc.shmat(c, None, 0), "shmat C")
ctypes.memmove(c_at + 4096, token, len(token))
libc.shmctl(c, IPC_RMID, None)

q = check(libc.msgget(kq, IPC_CREAT | 0o620), "msgget")
msgs = [(1, b"one-" + token), (5, b"five"), (2, b"two")]


class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 64)]


for t, d in msgs:
    m = Msg(t, d)
    check(libc.msgsnd(q, ctypes.byref(m), len(d), 0), "msgsnd")
s = check(libc.semget(ks, 3, IPC_CREAT | 0o600), "semget")
vals = (ctypes.c_ushort * 3)(7, 0, 42)
check(libc.semctl(s, 0, SETALL, vals), "semctl SETALL")


def listing(kind):
    out = {}
    for line in list(open("/proc/sysvipc/" + kind))[1:]:
        f = line.split()
        out[int(f[1])] = (int(f[0]), int(f[2], 8), int(f[3]))
    return out


def mapped(addr):
    for line in open("/proc/self/maps"):
        f = line.split()
        if int(f[0].split("-")[0], 16) == addr:
            return int(f[4])
    return None


def verify():
    shm = listing("shm")
    if shm.get(a) != (ka, 0o640, 65536) or shm.get(b) != (kb, 0o600, 8192):
        return "segments %s, want A %d and B %d as made" % (shm, a, b)
    if c not in shm or shm[c][0] != 0 or not shm[c][1] & SHM_DEST:
        return "segment C (%d) is %s, want removed" % (c, shm.get(c))
    if mapped(a_at) != a or mapped(c_at) != c:
        return "A and C are mapped as %s and %s" % (mapped(a_at), mapped(c_at))
    if ctypes.string_at(a_at, len(token)) != token or ctypes.string_at(c_at + 4096, len(token)) != token:
        return "A or C lost the token"
    at = libc.shmat(b, None, 0)
    got = ctypes.string_at(at + 100, len(token))
    libc.shmdt(ctypes.c_void_p(at))
    if got != token:
        return "B holds %r" % got
    if listing("msg").get(q, (None,))[0] != kq or listing("sem").get(s, (None,))[0] != ks:
        return "queue or semaphores: %s %s" % (listing("msg"), listing("sem"))
    for t, d in msgs:
        m = Msg()
        n = libc.msgrcv(q, ctypes.byref(m), 64, 0, IPC_NOWAIT)
        if n < 0 or (m.mtype, m.mtext[:n]) != (t, d):
            return "the queue gives (%d, %r), want (%d, %r)" % (m.mtype, m.mtext[:max(n, 0)], t, d)
    got = (ctypes.c_ushort * 3)()
    libc.semctl(s, 0, GETALL, got)
    if list(got) != [7, 0, 42]:
        return "semaphores %s" % list(got)
    return "ok"


selfcheck.run(report, token.decode(), verify)

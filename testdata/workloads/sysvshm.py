"""sysvshm.py REPORT: SysV shared memory across C/R.

A segment with a key (64 KiB, mode 0640) attached by the root and
inherited by a child, holding a token; and a second one, removed
(IPC_RMID) while attached, holding the token too. The report names the
segments (shmid=, removed=, key=) and the child (pids=). The check
(SIGUSR2, see selfcheck): the mappings are still those segments (their
inode in /proc/self/maps is the segment's id), they still hold the token,
what the root writes in the first the child reads, and
/proc/sysvipc/shm shows the first with its key, mode and size, the second
removed (key 0, SHM_DEST).
"""
import ctypes
import os
import select
import sys

import selfcheck

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
IPC_PRIVATE, IPC_CREAT = 0, 0o1000
SIZE = 64 << 10
report = sys.argv[-1]
token = os.urandom(8).hex().encode()
key = int.from_bytes(os.urandom(3), "little") + 1
shmid = libc.shmget(key, SIZE, IPC_CREAT | 0o640)
addr = libc.shmat(shmid, None, 0)
mem = (ctypes.c_char * SIZE).from_address(addr)
mem[0:len(token)] = token
IPC_RMID, SHM_DEST = 0, 0o1000
removed = libc.shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0o600)
raddr = libc.shmat(removed, None, 0)
rmem = (ctypes.c_char * 8192).from_address(raddr)
rmem[4096:4096 + len(token)] = token
libc.shmctl(removed, IPC_RMID, None)
req_r, req_w = os.pipe()
ans_r, ans_w = os.pipe()
child = os.fork()
if child == 0:
    while True:
        os.read(req_r, 1)
        os.write(ans_w, mem[100:108])


def segments():
    """/proc/sysvipc/shm: shmid -> (key, perms, size)."""
    out = {}
    for line in list(open("/proc/sysvipc/shm"))[1:]:
        f = line.split()
        out[int(f[1])] = (int(f[0]), int(f[2], 8), int(f[3]))
    return out


def verify():
    for at, seg in ((addr, shmid), (raddr, removed)):
        for line in open("/proc/self/maps"):
            f = line.split()
            if int(f[0].split("-")[0], 16) == at:
                if int(f[4]) != seg:
                    return "the mapping at %#x is inode %s, not segment %d" % (at, f[4], seg)
                break
        else:
            return "segment %d is not mapped" % seg
    if mem[0:len(token)] != token:
        return "the segment lost its contents"
    if rmem[4096:4096 + len(token)] != token:
        return "the removed segment lost its contents"
    segs = segments()
    if segs.get(shmid) != (key, 0o640, SIZE):
        return "segment %d is %s, want key %d, mode 0640, %d bytes" % (shmid, segs.get(shmid), key, SIZE)
    if removed not in segs or segs[removed][0] != 0 or not segs[removed][1] & SHM_DEST:
        return "segment %d is %s, want removed" % (removed, segs.get(removed))
    v = os.urandom(8)
    mem[100:108] = v
    os.write(req_w, b"?")
    if not select.select([ans_r], [], [], 5)[0]:
        return "the child did not answer"
    if os.read(ans_r, 8) != v:
        return "the child does not see the root's write"
    return "ok"


selfcheck.run(report, token.decode(), verify, lambda checked: {"pids": str(child), "shmid": shmid, "removed": removed})

"""sysvshm.py REPORT: SysV shared memory across C/R.

A private segment (64 KiB) attached by the root and inherited by a child,
holding a token. The report names the segment (shmid=) and the child
(pids=). The check (SIGUSR2, see selfcheck): the mapping is still that
segment (its inode in /proc/self/maps is the segment's id), it still
holds the token, and what the root writes in it the child reads.
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
shmid = libc.shmget(IPC_PRIVATE, SIZE, IPC_CREAT | 0o600)
addr = libc.shmat(shmid, None, 0)
mem = (ctypes.c_char * SIZE).from_address(addr)
mem[0:len(token)] = token
req_r, req_w = os.pipe()
ans_r, ans_w = os.pipe()
child = os.fork()
if child == 0:
    while True:
        os.read(req_r, 1)
        os.write(ans_w, mem[100:108])


def verify():
    for line in open("/proc/self/maps"):
        f = line.split()
        if int(f[0].split("-")[0], 16) == addr:
            if int(f[4]) != shmid:
                return "the mapping is inode %s, not segment %d" % (f[4], shmid)
            break
    else:
        return "the segment is not mapped"
    if mem[0:len(token)] != token:
        return "the segment lost its contents"
    v = os.urandom(8)
    mem[100:108] = v
    os.write(req_w, b"?")
    if not select.select([ans_r], [], [], 5)[0]:
        return "the child did not answer"
    if os.read(ans_r, 8) != v:
        return "the child does not see the root's write"
    return "ok"


selfcheck.run(report, token.decode(), verify, lambda checked: {"pids": str(child), "shmid": shmid})

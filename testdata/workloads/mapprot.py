"""mapprot.py REPORT: a shared file mapping made writable by mprotect.

In REPORT's directory it opens a file for writing, maps two pages of it
shared and read-only, makes the second writable with mprotect, and closes
the file. The check (SIGUSR2, see selfcheck): the second page takes a
write (the token, kept only in memory, reaches the file), and the first
can still be made writable (the file behind it is open for writing).
"""
import ctypes
import mmap
import os
import sys

import selfcheck

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
report = sys.argv[-1]
token = os.urandom(8).hex()
P = mmap.PAGESIZE
path = os.path.join(os.path.dirname(os.path.abspath(report)), "mapped")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 2 * P)
addr = libc.mmap(None, 2 * P, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
if libc.mprotect(addr + P, P, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
    sys.exit("mprotect: errno %d" % ctypes.get_errno())
os.close(fd)


def verify():
    ctypes.memmove(addr + P, token.encode(), len(token))
    with open(path, "rb") as f:
        f.seek(P)
        if f.read(len(token)) != token.encode():
            return "the write did not reach the file"
    if libc.mprotect(addr, P, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        return "mprotect of the first page: errno %d" % ctypes.get_errno()
    return "ok"


selfcheck.run(report, token, verify)

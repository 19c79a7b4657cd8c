"""guard.py REPORT: guard regions (MADV_GUARD_INSTALL) across C/R.

Eight pages, the third and fourth made guard pages, the others holding a
token. The check (SIGUSR2, see selfcheck): the other pages still hold
it, and touching a guard page still faults (in a child, which dies of
SIGSEGV) while touching another page does not.
"""
import ctypes
import mmap
import os
import resource
import signal
import sys

import selfcheck

MADV_GUARD_INSTALL = 102
report = sys.argv[-1]
token = os.urandom(8).hex().encode()
P = mmap.PAGESIZE
m = mmap.mmap(-1, 8 * P)
for i in range(8):
    m[i * P:i * P + len(token)] = token
m.madvise(MADV_GUARD_INSTALL, 2 * P, 2 * P)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))


def touch(page):
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        ctypes.memset(base + page * P, 1, 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def verify():
    for i in (0, 1, 4, 5, 6, 7):
        if m[i * P:i * P + len(token)] != token:
            return "page %d lost its contents" % i
    for i in (2, 3):
        st = touch(i)
        if not os.WIFSIGNALED(st) or os.WTERMSIG(st) != signal.SIGSEGV:
            return "guard page %d did not fault (status %#x)" % (i, st)
    if touch(5) != 0:
        return "a plain page faulted"
    return "ok"


selfcheck.run(report, token.decode(), verify)

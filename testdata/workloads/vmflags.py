"""vmflags.py REPORT: memory areas' flags and advice, across C/R.

Three anonymous areas: one locked (MAP_LOCKED) and advised sequential,
one advised random and not to be dumped in a core, one droppable
(MAP_DROPPABLE); each holds a random token (kept only in memory). The
check (SIGUSR2, see selfcheck): each area has its flags again in smaps
(lo sr; rr dd; dp) and its token (but the droppable one, whose pages the
kernel may drop).
"""
import ctypes
import mmap
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex().encode()
MAP_LOCKED, MAP_DROPPABLE = 0x2000, 0x08
SIZE = 4 * mmap.PAGESIZE
areas = []
for flags, advice, want in (
        (mmap.MAP_PRIVATE | MAP_LOCKED, [mmap.MADV_SEQUENTIAL], {"lo", "sr"}),
        (mmap.MAP_PRIVATE, [mmap.MADV_RANDOM, mmap.MADV_DONTDUMP], {"rr", "dd"}),
        (MAP_DROPPABLE, [], {"dp"})):
    m = mmap.mmap(-1, SIZE, flags=flags | mmap.MAP_ANONYMOUS)
    for a in advice:
        m.madvise(a)
    m[:len(token)] = token
    areas.append((m, ctypes.addressof(ctypes.c_char.from_buffer(m)), want))


def vmflags(addr):
    cur = None
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0] and not line.startswith("VmFlags"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            cur = lo <= addr < hi
        elif line.startswith("VmFlags:") and cur:
            return set(line.split()[1:])
    return set()


def verify():
    for m, addr, want in areas:
        have = vmflags(addr)
        if not want <= have:
            return "area %#x has flags %s, lacks %s" % (addr, sorted(have), sorted(want - have))
        if "dp" not in want and m[:len(token)] != token:  # droppable may be dropped
            return "area %#x lost its token" % addr
    return "ok"


selfcheck.run(report, token.decode(), verify)

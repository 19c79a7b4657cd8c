"""memfd.py REPORT: a memfd across C/R.

A memfd holding a small script ("#!/bin/true"), at an offset, with
O_APPEND, a shared mapping of it and seals against shrinking and growing.
The check (SIGUSR2, see selfcheck): it is still a memfd of the same name
(not a file on disk), with its contents, offset, flags, mode and seals; a
write through the mapping shows through the fd; and it can still be executed
(a memfd restored as an open for writing could not: "text file busy").
"""
import fcntl
import mmap
import os
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
SCRIPT = b"#!/bin/true\n"
fd = os.memfd_create("ferry-test", os.MFD_ALLOW_SEALING)
os.write(fd, SCRIPT + b"#" * (4096 - len(SCRIPT)))
os.fchmod(fd, 0o751)
m = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED)
os.lseek(fd, 100, os.SEEK_SET)
fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)


def verify():
    if os.readlink("/proc/self/fd/%d" % fd) != "/memfd:ferry-test (deleted)":
        return "the fd is %s" % os.readlink("/proc/self/fd/%d" % fd)
    if os.lseek(fd, 0, os.SEEK_CUR) != 100:
        return "offset %d" % os.lseek(fd, 0, os.SEEK_CUR)
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        return "O_APPEND lost"
    if os.fstat(fd).st_mode & 0o7777 != 0o751:
        return "mode %o" % (os.fstat(fd).st_mode & 0o7777)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
        return "seals %#x" % seals
    if m[:len(SCRIPT)] != SCRIPT:
        return "contents %r" % m[:len(SCRIPT)]
    m[4000:4001] = b"!"
    if os.pread(fd, 1, 4000) != b"!":
        return "the mapping is not the memfd"
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/proc/self/fd/%d" % fd, ["memfd-script"])
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return "executing it: status %#x" % status
    return "ok"


selfcheck.run(report, token, verify)

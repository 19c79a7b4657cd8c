"""ghostattr.py REPORT: a deleted file's mode, time and holes, across C/R.

In REPORT's directory it writes a file holding a random token (kept only
in memory) at its start and again 8 MiB in, with a hole between, sets its
mode to 06604 (set-id bits included) and its modification time, keeps it
open and unlinks it. The check (SIGUSR2, see selfcheck): same contents,
mode and modification time, and the hole is still a hole. The file is
also open by a second name (a hard link, unlinked too): both descriptors
must still be the one file.
"""
import os
import stat
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
MODE, MTIME = 0o6604, 1234567890
path = os.path.join(os.path.dirname(os.path.abspath(report)), "ghost")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
FAR = 8 << 20
os.write(fd, token.encode())
os.pwrite(fd, token.encode(), FAR)
os.utime(fd, (MTIME, MTIME))
os.fchmod(fd, MODE)
os.link(path, path + "-2")
fd2 = os.open(path + "-2", os.O_RDWR)
os.unlink(path)
os.unlink(path + "-2")


def verify():
    st = os.fstat(fd)
    if stat.S_IMODE(st.st_mode) != MODE:
        return "mode %o, want %o" % (stat.S_IMODE(st.st_mode), MODE)
    if int(st.st_mtime) != MTIME:
        return "modification time %d, want %d" % (st.st_mtime, MTIME)
    n = len(token)
    if os.pread(fd, n, 0) != token.encode() or os.pread(fd, n, FAR) != token.encode():
        return "contents differ"
    if os.pread(fd, 16, FAR // 2) != bytes(16):
        return "the gap is not zeros"
    if os.lseek(fd, 0, os.SEEK_HOLE) >= FAR:
        return "the hole was filled"
    os.pwrite(fd, b"Z", 100)
    if os.pread(fd2, 1, 100) != b"Z" or os.fstat(fd).st_ino != os.fstat(fd2).st_ino:
        return "the two names are two files"
    return "ok"


selfcheck.run(report, token, verify)

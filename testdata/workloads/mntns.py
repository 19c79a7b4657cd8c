"""mntns.py DIR REPORT: mounts of a mount namespace of its own.

PID 1 of new PID and mount namespaces (unshare --pid --fork --mount
--mount-proc: its own /proc). It mounts a tmpfs at DIR/t (size=4m,
mode=0750) holding a file with the token, a directory with a file and a
symlink, keeps the file open, a file it deleted, a FIFO (with data
queued) and a directory it removed (open), and its working directory in
the tmpfs, and
binds DIR/src (which the test made, with a file) at DIR/b read-only, and
mounts an overlay at DIR/ov with DIR/src below and its upper layer in the
tmpfs, where it adds a file and removes DIR/src's.

The check (SIGUSR2, see selfcheck): /proc is its namespace's (it is PID
1 there); the tmpfs is mounted with its options and holds its files; the
open file reads the token, and so does the deleted one, still deleted
(no name, its old path shown); the removed FIFO holds its data and the
removed directory is one, both with their modes and no name; the working directory is the tmpfs; the bind
mount shows DIR/src's file and is read-only; the overlay shows the file
it added, not the one it removed.
"""
import ctypes
import os
import sys

import selfcheck

report, top = sys.argv[-1], sys.argv[-2]
token = os.urandom(8).hex()
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_RDONLY, MS_REMOUNT = 4096, 1, 32
os.setsid()


def mount(src, dst, fstype, flags, data):
    if libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None) != 0:
        raise OSError(ctypes.get_errno(), "mount " + dst)


t, b = os.path.join(top, "t"), os.path.join(top, "b")
os.makedirs(t, exist_ok=True)
os.makedirs(b, exist_ok=True)
mount("tmpfs", t, "tmpfs", 0, "size=4m,mode=0750")
with open(os.path.join(t, "a.txt"), "w") as f:
    f.write(token)
os.mkdir(os.path.join(t, "d"))
with open(os.path.join(t, "d", "f"), "w") as f:
    f.write("inner")
os.symlink("d/f", os.path.join(t, "l"))
held = open(os.path.join(t, "a.txt"))
# A file of the tmpfs, open and deleted: its contents only in the images.
gone = open(os.path.join(t, "gone.txt"), "w+")
gone.write("gone " + token)
gone.flush()
os.unlink(os.path.join(t, "gone.txt"))
# And a FIFO and a directory of the tmpfs, open and removed.
os.mkfifo(os.path.join(t, "fifo"), 0o640)
fifo = os.open(os.path.join(t, "fifo"), os.O_RDWR | os.O_NONBLOCK)
os.write(fifo, b"queued " + token.encode())
os.unlink(os.path.join(t, "fifo"))
os.mkdir(os.path.join(t, "gone.d"), 0o711)
gone_dir = os.open(os.path.join(t, "gone.d"), os.O_RDONLY | os.O_DIRECTORY)
os.rmdir(os.path.join(t, "gone.d"))
os.chdir(t)
mount(os.path.join(top, "src"), b, None, MS_BIND, None)
mount("none", b, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
# An overlay: DIR/src below, its upper layer in the tmpfs; a file added
# (in the upper layer) and DIR/src's file removed (a whiteout there).
ov = os.path.join(top, "ov")
os.makedirs(ov, exist_ok=True)
for d in ("up", "wk"):
    os.mkdir(os.path.join(t, d))
mount("overlay", ov, "overlay", 0, "lowerdir=%s,upperdir=%s,workdir=%s" % (os.path.join(top, "src"), os.path.join(t, "up"), os.path.join(t, "wk")))
with open(os.path.join(ov, "new.txt"), "w") as f:
    f.write("over " + token)
os.unlink(os.path.join(ov, "file"))


def verify():
    if os.getpid() != 1 or not open("/proc/self/stat").read().startswith("1 ("):
        return "/proc is not the namespace's"
    mounts = {l.split()[4]: l for l in open("/proc/self/mountinfo")}
    if t not in mounts or "size=4096k" not in mounts[t] or "mode=750" not in mounts[t]:
        return "tmpfs at %s: %s" % (t, mounts.get(t))
    if os.stat(t).st_mode & 0o777 != 0o750:
        return "tmpfs mode %o" % os.stat(t).st_mode
    if open(os.path.join(t, "a.txt")).read() != token or open(os.path.join(t, "l")).read() != "inner":
        return "the tmpfs lost its files"
    held.seek(0)
    if held.read() != token:
        return "the open file reads otherwise"
    gone.seek(0)
    if gone.read() != "gone " + token or os.fstat(gone.fileno()).st_nlink != 0:
        return "the deleted file reads otherwise, or has a name"
    if os.readlink("/proc/self/fd/%d" % gone.fileno()) != os.path.join(t, "gone.txt") + " (deleted)":
        return "the deleted file is %s" % os.readlink("/proc/self/fd/%d" % gone.fileno())
    if os.path.exists(os.path.join(t, "gone.txt")):
        return "the deleted file's stand-in stayed"
    import stat
    st = os.fstat(fifo)
    if not stat.S_ISFIFO(st.st_mode) or st.st_mode & 0o777 != 0o640 or st.st_nlink != 0:
        return "the removed FIFO is %o, %d links" % (st.st_mode, st.st_nlink)
    if os.read(fifo, 100) != b"queued " + token.encode():
        return "the removed FIFO lost its data"
    os.write(fifo, b"queued " + token.encode())
    st = os.fstat(gone_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o777 != 0o711 or st.st_nlink != 0:
        return "the removed directory is %o, %d links" % (st.st_mode, st.st_nlink)
    if os.path.exists(os.path.join(t, "fifo")) or any(n.startswith(("fifo", "gone.d")) for n in os.listdir(t)):
        return "stand-ins stayed: %s" % os.listdir(t)
    if ov not in mounts or " overlay " not in mounts[ov]:
        return "overlay at %s: %s" % (ov, mounts.get(ov))
    if open(os.path.join(ov, "new.txt")).read() != "over " + token or os.path.exists(os.path.join(ov, "file")):
        return "the overlay shows otherwise: %s" % os.listdir(ov)
    if os.getcwd() != t:
        return "cwd is %s" % os.getcwd()
    if b not in mounts or " ro," not in mounts[b] and not mounts[b].split()[5].startswith("ro"):
        return "bind at %s: %s" % (b, mounts.get(b))
    if open(os.path.join(b, "file")).read() != "from src":
        return "the bind mount shows otherwise"
    return "ok"


selfcheck.run(report, token, verify)

"""mntroot.py ROOT REPORT: a mount namespace with a root of its own.

PID 1 of new PID and mount namespaces. Into the empty directory ROOT it
binds the host's /usr, /lib, /lib64 and /etc read-only (the host's
merged-/usr symlinks made again; python's own tree too when it is not
under /usr) and /dev (stdio goes to /dev/null), mounts a proc and a tmpfs at /tmp
(holding a file with the token), binds REPORT's directory at the same
path, then pivots into ROOT, as a container's runtime does.

The check (SIGUSR2, see selfcheck): / is ROOT's (its entries as made),
/proc is its namespace's, /tmp holds the token, /usr is read-only, and
the working directory is /tmp; the overlay it mounted at /tmp/ov (after the
pivot: /etc below, its upper layer in /tmp) shows /etc and its own file.
"""
import ctypes
import os
import sys

import selfcheck  # before the pivot: the workloads' directory is not in the new root

report, root = sys.argv[-1], sys.argv[-2]
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_RDONLY, MS_REMOUNT, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 1, 32, 16384, 1 << 18, 2
SYS_PIVOT_ROOT = 155


def check(v, what):
    if v != 0:
        raise OSError(ctypes.get_errno(), what)


def mount(src, dst, fstype, flags, data=None):
    check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), "mount " + dst)


token = os.urandom(8).hex()
os.setsid()
mount("none", "/", None, MS_REC | MS_PRIVATE)
mount(root, root, None, MS_BIND)
made = {"proc", "tmp"}
for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc"):
    host = "/" + d
    if os.path.islink(host):
        os.symlink(os.readlink(host), os.path.join(root, d))
        made.add(d)
    elif os.path.isdir(host):
        os.mkdir(os.path.join(root, d))
        mount(host, os.path.join(root, d), None, MS_BIND | MS_REC)
        mount("none", os.path.join(root, d), None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        made.add(d)
# A python outside /usr (pyenv) needs its own tree, bound where it is.
prefix = os.path.realpath(sys.base_prefix)
if not prefix.startswith("/usr/"):
    os.makedirs(root + prefix)
    mount(prefix, root + prefix, None, MS_BIND | MS_REC)
    mount("none", root + prefix, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    made.add(prefix.split("/")[1])
# The host's /dev too; stdio on /dev/null (the test's log file is not in
# the new root).
os.mkdir(os.path.join(root, "dev"))
mount("/dev", os.path.join(root, "dev"), None, MS_BIND | MS_REC)
made.add("dev")
null = os.open(os.path.join(root, "dev", "null"), os.O_RDWR)  # seen as /dev/null once pivoted
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.close(null)
for d in ("proc", "tmp"):
    os.mkdir(os.path.join(root, d))
mount("proc", os.path.join(root, "proc"), "proc", 0)
mount("tmpfs", os.path.join(root, "tmp"), "tmpfs", 0, "size=1m")
rep = os.path.dirname(report)
os.makedirs(root + rep)
mount(rep, root + rep, None, MS_BIND)
made.add(rep.split("/")[1])
with open(os.path.join(root, "tmp", "t"), "w") as f:
    f.write(token)
os.chdir(root)
check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
check(libc.umount2(b".", MNT_DETACH), "umount old root")
os.chdir("/tmp")
# An overlay made inside the new root: /etc below, its upper layer in /tmp.
for d in ("up", "wk", "ov"):
    os.mkdir("/tmp/" + d)
mount("overlay", "/tmp/ov", "overlay", 0, "lowerdir=/etc,upperdir=/tmp/up,workdir=/tmp/wk")
with open("/tmp/ov/ferry-" + token, "w") as f:
    f.write(token)


def verify():
    if sorted(os.listdir("/")) != sorted(made):
        return "/ holds %s, want %s" % (sorted(os.listdir("/")), sorted(made))
    if os.getpid() != 1 or not open("/proc/self/stat").read().startswith("1 ("):
        return "/proc is not the namespace's"
    if open("/tmp/t").read() != token:
        return "/tmp lost its file"
    if os.getcwd() != "/tmp":
        return "cwd is %s" % os.getcwd()
    if os.statvfs("/usr").f_flag & 1 == 0:
        return "/usr is writable"
    if open("/tmp/ov/ferry-" + token).read() != token or not os.path.exists("/tmp/ov/passwd"):
        return "the overlay shows %s" % os.listdir("/tmp/ov")[:5]
    return "ok"


selfcheck.run(report, token, verify)

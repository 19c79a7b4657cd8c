"""userns.py REPORT: a tree in a user namespace of its own.

Started by root, it forks L, which makes new user, PID, mount, UTS, IPC
and network namespaces (unshare), the user namespace mapping uids and
gids 0-65535 to the host's 100000 onward (written by the first process,
as newuidmap would: a rootless container's maps) and its mounts private;
L becomes the namespace's root (setresuid 0) and forks the workload,
PID 1 of the new PID namespace. The report's directory is opened to the
host's uid 100000 first.

The workload forks W, which drops to uid 1000, gid 1000 and groups 1000
and 1001 (setgroups, setresgid, setresuid), starts a second thread and
answers through a pipe with the IDs, groups and effective capabilities
it sees. The report gives W's PID in the namespace (w=).

The check (SIGUSR2, see selfcheck): the maps read as before; the root
still has every capability in the namespace and uses them on the
namespaces that belong to it: it names its host, mounts a tmpfs in its
mount namespace and brings its loopback up; W answers as before.
"""
import ctypes
import os
import select
import socket
import subprocess
import sys
import threading
import time

import selfcheck

report = sys.argv[-1]
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


def launch():
    top = os.path.dirname(report)
    for d in (top, os.path.dirname(top)):
        os.chmod(d, 0o777)
    ready, mapped = os.pipe(), os.pipe()
    child = os.fork()
    if child:
        os.read(ready[0], 1)
        for f in ("uid_map", "gid_map"):
            with open("/proc/%d/%s" % (child, f), "w") as m:
                m.write("0 100000 65536\n")
        os.write(mapped[1], b"x")
        os.waitpid(child, 0)
        sys.exit(0)
    flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        sys.exit("unshare: errno %d" % ctypes.get_errno())
    os.write(ready[1], b"x")
    os.read(mapped[0], 1)
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        sys.exit("make the mounts private: errno %d" % ctypes.get_errno())
    init = os.fork()
    if init:
        # Its PID as this PID namespace sees it, for the tests to find it.
        with open(report + ".init", "w") as f:
            f.write(str(init))
        os.waitpid(init, 0)
        sys.exit(0)


launch()
token = os.urandom(8).hex()
if os.getpid() != 1 or os.getuid() != 0:
    sys.exit("userns.py must be the init of its PID namespace and root in its user namespace")
os.setsid()
# A tmpfs of its own (the user namespace's), holding a file it deleted and
# keeps open.
tm = os.path.join(os.path.dirname(report), "tm")
os.makedirs(tm, exist_ok=True)
if libc.mount(b"tmpfs", tm.encode(), b"tmpfs", 0, b"size=1m") != 0:
    sys.exit("mount a tmpfs: errno %d" % ctypes.get_errno())
gone = open(os.path.join(tm, "gone"), "w+")
gone.write("gone " + token)
gone.flush()
os.unlink(os.path.join(tm, "gone"))
maps = (open("/proc/self/uid_map").read(), open("/proc/self/gid_map").read())


def cap_eff():
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)


def answerer(req, ans):
    os.setgroups([1000, 1001])
    os.setresgid(1000, 1000, 1000)
    os.setresuid(1000, 1000, 1000)
    # Made again with its TID: the PID namespace must belong to the
    # user namespace for that.
    threading.Thread(target=time.sleep, args=(1e9,), daemon=True).start()
    while True:
        os.read(req, 1)
        got = "%s %s %s %x" % (os.getresuid(), os.getresgid(), sorted(os.getgroups()), cap_eff())
        os.write(ans, got.encode())


req, ans = os.pipe(), os.pipe()
w = os.fork()
if w == 0:
    answerer(req[0], ans[1])


def ask():
    os.write(req[1], b"?")
    if not select.select([ans[0]], [], [], 5)[0]:
        return None
    return os.read(ans[0], 200).decode()


w_seen = ask()
full = cap_eff()


def verify():
    gone.seek(0)
    if gone.read() != "gone " + token or os.fstat(gone.fileno()).st_nlink != 0:
        return "the deleted file of its tmpfs reads otherwise"
    if (open("/proc/self/uid_map").read(), open("/proc/self/gid_map").read()) != maps:
        return "maps %s, want %s" % (open("/proc/self/uid_map").read(), maps)
    if os.getuid() != 0 or cap_eff() != full:
        return "the root is uid %d with capabilities %x, want 0 and %x" % (os.getuid(), cap_eff(), full)
    got = ask()
    if got != w_seen:
        return "W sees %s, want %s" % (got, w_seen)
    try:
        socket.sethostname("userns-" + token[:8])
    except OSError as e:
        return "sethostname: %s" % e
    if libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None) != 0:
        return "mount a tmpfs: errno %d" % ctypes.get_errno()
    libc.umount2(b"/mnt", 0)
    r = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if r.returncode != 0:
        return "ip link set lo up: %s" % r.stderr.strip()
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"w": w, "wseen": w_seen.replace(" ", "_")})

"""netns.py REPORT: a server in network, PID and UTS namespaces of its own.

PID 1 of its namespaces (unshare --pid --fork --net --uts); the test gives
it a veth "eth0" with 10.99.0.2/24, MTU 1400, and a default route via
10.99.0.1, then asks for a report. It serves on 0.0.0.0:7777: each
connection gets the token. A child (an answering process) keeps it a tree.

The check (SIGUSR2, see selfcheck): lo is up, eth0 has its address, MTU
and state, the default route is there, and the server still serves
itself through eth0's address.
"""
import fcntl
import os
import socket
import struct
import sys
import threading

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
os.setsid()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7777))
srv.listen(16)
if os.fork() == 0:
    while True:
        c, _ = srv.accept()
        c.sendall(token.encode() + b"\n")
        c.close()
SIOCGIFFLAGS, SIOCGIFADDR, SIOCGIFMTU, IFF_UP = 0x8913, 0x8915, 0x8921, 1


def ifreq(name, req):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        return fcntl.ioctl(s, req, struct.pack("16s24x", name.encode()))
    finally:
        s.close()


def verify():
    for name in ("lo", "eth0"):
        if not struct.unpack_from("H", ifreq(name, SIOCGIFFLAGS), 16)[0] & IFF_UP:
            return "%s is down" % name
    addr = socket.inet_ntoa(ifreq("eth0", SIOCGIFADDR)[20:24])
    if addr != "10.99.0.2":
        return "eth0 has %s" % addr
    mtu = struct.unpack_from("i", ifreq("eth0", SIOCGIFMTU), 16)[0]
    if mtu != 1400:
        return "eth0 has MTU %d" % mtu
    routes = [l.split() for l in list(open("/proc/net/route"))[1:]]
    if not any(r[1] == "00000000" and r[2] == "0100630A" for r in routes):
        return "no default route via 10.99.0.1: %s" % routes
    c = socket.create_connection(("10.99.0.2", 7777), timeout=5)
    got = c.recv(64).decode().strip()
    c.close()
    if got != token:
        return "the server answers %r" % got
    return "ok"


selfcheck.run(report, token, verify)

"""tunself.py REPORT: a process with a tun device of its own.

The init of new PID and network namespaces (unshare --pid --fork --net),
it opens /dev/net/tun and attaches it to a new tun device, tun7 (IFF_TUN,
IFF_NO_PI: not persistent, it goes with the descriptor); the test gives
tun7 the address 10.77.0.1/24 and brings it up.

The check (SIGUSR2, see selfcheck): the descriptor is still attached to
tun7 (TUNGETIFF) with the same flags, and the device works: an ICMP echo
request written to it, from 10.77.0.2 to 10.77.0.1 with the token as its
data, comes back as the kernel's echo reply, read from it.
"""
import fcntl
import os
import select
import struct
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
TUNSETIFF, TUNGETIFF = 0x400454CA, 0x800454D2
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
os.setsid()
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", b"tun7", IFF_TUN | IFF_NO_PI))


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo(seq):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x7777, seq) + token.encode()
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0, bytes([10, 77, 0, 2]), bytes([10, 77, 0, 1]))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + icmp


def verify():
    name, flags = struct.unpack("16sH22x", fcntl.ioctl(tun, TUNGETIFF, bytes(40)))
    if name.rstrip(b"\0") != b"tun7" or flags & (IFF_TUN | IFF_NO_PI) != IFF_TUN | IFF_NO_PI:
        return "attached to %s, flags %#x" % (name, flags)
    for seq in range(1, 4):
        os.write(tun, echo(seq))
        while select.select([tun], [], [], 2)[0]:
            pkt = os.read(tun, 2048)
            ihl = (pkt[0] & 15) * 4
            if len(pkt) > ihl + 8 and pkt[9] == 1 and pkt[ihl] == 0 and pkt[ihl + 8:] == token.encode():
                return "ok"
    return "no echo reply through tun7"


selfcheck.run(report, token, verify)

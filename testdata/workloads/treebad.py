"""treebad.py REPORT: a tree whose child holds what ferry cannot dump yet
(a netlink socket).

The child answers each byte the root sends it through a pipe. The report
names it (pids=). The check (SIGUSR2, see selfcheck): the child answers.
"""
import os
import select
import socket
import sys

import selfcheck

report = sys.argv[-1]
token = os.urandom(8).hex()
req_r, req_w = os.pipe()
ans_r, ans_w = os.pipe()
child = os.fork()
if child == 0:
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    os.write(ans_w, b"r")
    while True:
        os.write(ans_w, os.read(req_r, 1))
os.read(ans_r, 1)


def verify():
    os.write(req_w, b"?")
    if not select.select([ans_r], [], [], 5)[0]:
        return "the child did not answer"
    os.read(ans_r, 1)
    return "ok"


selfcheck.run(report, token, verify, lambda checked: {"pids": str(child)})

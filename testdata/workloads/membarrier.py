"""membarrier.py REPORT: membarrier(2) registration, across C/R.

It registers for private expedited membarriers. The check (SIGUSR2, see
selfcheck): the registration is still there (a private expedited barrier
succeeds, where an unregistered process gets EPERM).
"""
import ctypes
import os
import sys

import selfcheck

SYS_membarrier = 324  # x86_64
REGISTER_PRIVATE_EXPEDITED, PRIVATE_EXPEDITED = 16, 8
libc = ctypes.CDLL(None, use_errno=True)
report = sys.argv[-1]
token = os.urandom(8).hex()
if libc.syscall(SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0, 0) != 0:
    sys.exit("membarrier register: errno %d" % ctypes.get_errno())


def verify():
    if libc.syscall(SYS_membarrier, PRIVATE_EXPEDITED, 0, 0) != 0:
        return "private expedited barrier: errno %d (not registered)" % ctypes.get_errno()
    return "ok"


selfcheck.run(report, token, verify)

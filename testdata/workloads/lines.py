"""lines.py OUTFILE REPORT: numbers the lines it writes to OUTFILE.

Opened without O_APPEND, so after a restore the numbering must continue at
the right offset without a gap. Holds a large dict derived from a random
token kept only in memory; on SIGUSR1 verifies it and writes a report
(key=value lines, atomic rename).
"""
import os
import signal
import sys
import time

out_path, report_path = sys.argv[1], sys.argv[2]
token = os.urandom(8).hex()
tokval = int(token, 16)
big = {i: (i * 2654435761) ^ tokval for i in range(200000)}
out = open(out_path, "w")
n = 0
seq = 0
want = False


def on_usr1(signum, frame):
    global want
    want = True


def report():
    global seq
    seq += 1
    ok = len(big) == 200000 and all(big[i] == (i * 2654435761) ^ tokval for i in range(0, 200000, 7))
    pos_ok = out.tell() == os.lseek(out.fileno(), 0, os.SEEK_CUR)
    lines = [
        "status=%s" % ("ok" if ok and pos_ok else "fail"),
        "pid=%d" % os.getpid(),
        "token=%s" % token,
        "counter=%d" % n,
        "pos=%d" % out.tell(),
        "seq=%d" % seq,
    ]
    if not ok:
        lines.append("reason=in-memory structure differs")
    elif not pos_ok:
        lines.append("reason=file offset differs")
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.rename(tmp, report_path)


signal.signal(signal.SIGUSR1, on_usr1)
report()
while True:
    n += 1
    out.write("%d %s\n" % (n, token))
    out.flush()
    time.sleep(0.01)
    if want:
        want = False
        report()

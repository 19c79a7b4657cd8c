"""selfcheck: the report loop the Python workloads share.

run(report, token, verify, fields) loops forever: SIGUSR1 writes a report
(status, pid, token, counter, seq, check, and what fields() returns;
key=value lines, renamed into place), and the first SIGUSR2 runs verify()
once; its answer ("ok" or the reason) is "check" in the next reports.
"""
import os
import signal
import time


def run(report, token, verify, fields=lambda checked: {}):
    state = {"want": True, "check": False}

    def on_sig(signum, frame):
        state["want" if signum == signal.SIGUSR1 else "check"] = True

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, on_sig)
    signal.signal(signal.SIGUSR2, on_sig)
    counter, seq, result = 0, 0, "unchecked"
    while True:
        counter += 1
        if state["check"]:
            state["check"] = False
            try:
                result = verify()
            except Exception as e:
                result = "error: %s" % e
        if state["want"]:
            state["want"] = False
            seq += 1
            extra = fields(result != "unchecked")
            with open(report + ".tmp", "w") as f:
                f.write("status=ok\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\ncheck=%s\n"
                        % (os.getpid(), token, counter, seq, result))
                for k, v in extra.items():
                    f.write("%s=%s\n" % (k, v))
            os.rename(report + ".tmp", report)
        time.sleep(0.01)

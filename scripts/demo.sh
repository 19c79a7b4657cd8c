#!/usr/bin/env bash
# The demo: start a workload that checks its own memory, checkpoint it,
# restore it, and show that the same process continued: same PID, same
# secret token (kept only in its memory), counter going on from where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$PWD/bin/ferry
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
pid=
cleanup() {
	[[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
report() { # ask for a report and wait until its seq changes
	local before after
	before=$(grep -s '^seq=' "$work/report" | cut -d= -f2 || echo 0)
	kill -USR1 "$pid"
	for _ in $(seq 100); do
		after=$(grep -s '^seq=' "$work/report" | cut -d= -f2 || echo 0)
		[[ $after != "$before" ]] && break
		sleep 0.05
	done
	grep -E '^(status|pid|token|counter|thread[0-9]+)=' "$work/report" | tr '\n' ' '; echo
}

say "building the workload (testdata/workloads/memcheck.c)"
gcc -O2 -pthread -mavx2 -Wall -o "$work/memcheck" testdata/workloads/memcheck.c

say "starting it: 64 MiB of patterned memory, 2 worker threads"
setsid "$work/memcheck" -m 64 -t 2 -r "$work/report" </dev/null >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do [[ -s $work/report ]] && break; sleep 0.05; done
sleep 1
report

say "ferry dump -t $pid -D $work/img --display-stats"
mkdir "$work/img"
"$FERRY" dump -t "$pid" -D "$work/img" --display-stats
if kill -0 "$pid" 2>/dev/null; then echo "process still there?"; exit 1; fi
echo "process $pid is gone; images:"
du -sh "$work/img"

say "ferry restore -D $work/img -d --display-stats"
"$FERRY" restore -D "$work/img" -d --display-stats --pidfile "$work/restored.pid"
echo "restored PID: $(cat "$work/restored.pid")"
sleep 1

say "the same process continues (same token, counter went on)"
report
status=$(grep '^status=' "$work/report" | cut -d= -f2)
[[ $status == ok ]] && echo "memory verified: OK" || { echo "verification FAILED"; exit 1; }

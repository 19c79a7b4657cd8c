#!/usr/bin/env bash
# The demo: two local "hosts" (network namespaces joined by a veth pair), and
# a workload that checks its own memory moved from host A to host B while it
# keeps rewriting memory: pre-copy rounds stream its pages to a page server
# on B over mutual TLS, a short final dump sends what changed, and B restores
# the very same process (same PID, same secret token kept only in its memory,
# counters going on), now living in B's network namespace.
#
# Until "migrate --from A --to B PID" exists (issue 5), the script drives the
# same steps with ferry's own commands.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$PWD/bin/ferry
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
A=ferry-demo-a-$$ B=ferry-demo-b-$$
pid=
cleanup() {
	[[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
	ip netns del "$A" 2>/dev/null || true
	ip netns del "$B" 2>/dev/null || true
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
	grep -E '^(status|pid|token|counter|passes)=' "$work/report" | tr '\n' ' '; echo
}
onA() { ip netns exec "$A" "$@"; }
onB() { ip netns exec "$B" "$@"; }

say "two hosts: network namespaces $A (10.77.0.1) and $B (10.77.0.2), joined by a veth pair"
ip netns add "$A"
ip netns add "$B"
ip link add "va$$" netns "$A" type veth peer name "vb$$" netns "$B"
onA ip addr add 10.77.0.1/24 dev "va$$"
onB ip addr add 10.77.0.2/24 dev "vb$$"
for h in "$A" "$B"; do ip netns exec "$h" ip link set lo up; done
onA ip link set "va$$" up
onB ip link set "vb$$" up

say "certificates: ferry certs init, one for each host"
"$FERRY" certs init --dir "$work/pki" >/dev/null
"$FERRY" certs issue --dir "$work/pki" host-a --host 10.77.0.1 >/dev/null
"$FERRY" certs issue --dir "$work/pki" host-b --host 10.77.0.2 >/dev/null
tls() { echo --tls --tls-cacert "$work/pki/ca.crt" --tls-cert "$work/pki/$1.crt" --tls-key "$work/pki/$1.key"; }

say "on host A: a workload with 256 MiB of patterned memory that also rewrites 64 MiB at 20 MiB/s"
gcc -O2 -pthread -mavx2 -Wall -o "$work/memcheck" testdata/workloads/memcheck.c
onA setsid "$work/memcheck" -m 256 -t 2 -C -c 20 -r "$work/report" </dev/null >/dev/null 2>&1 &
for _ in $(seq 200); do [[ -s $work/report ]] && break; sleep 0.05; done
pid=$(grep '^pid=' "$work/report" | cut -d= -f2)
sleep 1
report

# One page-server session per round on B; A's rounds keep their pagemaps to
# know, next round, what B already has.
round() { # round N COMMAND [ARGS...]: run one round from A into B's dir N
	local n=$1; shift
	mkdir -p "$work/a/$n" "$work/b/$n"
	onB "$FERRY" page-server -D "$work/b/$n" --address 10.77.0.2 --port 27000 $(tls host-b) --status-fd 3 3>"$work/ready" &
	local ps=$!
	for _ in $(seq 100); do [[ -s $work/ready ]] && break; sleep 0.02; done
	: >"$work/ready"
	onA "$FERRY" "$@" -t "$pid" -D "$work/a/$n" --page-server --address 10.77.0.2 --port 27000 $(tls host-a) --display-stats |
		grep -E 'Frozen time|pages written|skipped from parent' | sed 's/^/    /'
	wait "$ps"
	# The small images travel too (a real migration sends them on the same
	# connection): whatever B does not have yet.
	for f in "$work/a/$n"/*; do
		[[ -e $work/b/$n/$(basename "$f") ]] || cp "$f" "$work/b/$n/"
	done
}
say "pre-copy round 1, while it runs: every page goes to B"
round 1 pre-dump
say "pre-copy round 2: only what it wrote since round 1"
round 2 pre-dump --prev-images-dir ../1
say "final dump: a short freeze, what changed since round 2, then it is gone from A"
round 3 dump --prev-images-dir ../2
if kill -0 "$pid" 2>/dev/null; then echo "process still on A?"; exit 1; fi
du -sh "$work/b" | sed 's/^/    images on B: /'

say "on host B: ferry restore -D b/3 (its parents b/2 and b/1 hold the earlier rounds)"
onB "$FERRY" restore -D "$work/b/3" -d --pidfile "$work/restored.pid"
echo "    restored PID $(cat "$work/restored.pid"), in network namespace $(readlink /proc/"$pid"/ns/net) (host B's is $(ip netns exec "$B" readlink /proc/self/ns/net))"
sleep 1

say "the same process continues on B: same token, counters went on, memory checked"
report
status=$(grep '^status=' "$work/report" | cut -d= -f2)
[[ $status == ok ]] && echo "memory verified: OK" || { echo "verification FAILED"; exit 1; }

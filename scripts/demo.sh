#!/usr/bin/env bash
# The demo: two local "hosts" — network namespaces joined by a veth pair,
# host B also with a PID namespace of its own — each running a ferry agent,
# and a workload that checks its own memory moved from A to B with
#
#   migrate --from 10.77.0.1 --to 10.77.0.2 PID
#
# while it keeps rewriting memory: pre-copy rounds stream its pages to B
# over mutual TLS (each round only what changed), a short final freeze, and
# B restores the very same process (same PID, same secret token kept only in
# its memory, counters going on), resumed at once while the last pages
# follow on demand; then the migration commits.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$PWD/bin/ferry MIGRATE=$PWD/bin/migrate
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
A=ferry-demo-a-$$ B=ferry-demo-b-$$
pid= agentA= agentB=
cleanup() {
	[[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
	[[ -n $agentA ]] && kill -KILL "$agentA" 2>/dev/null || true
	# B's agent runs under unshare --kill-child: killing unshare ends B's
	# PID namespace, the migrated workload with it.
	[[ -n $agentB ]] && kill -KILL "$agentB" 2>/dev/null || true
	wait 2>/dev/null || true
	ip netns del "$A" 2>/dev/null || true
	ip netns del "$B" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
report() { # ask process $1 for a report and wait until its seq changes
	local before after
	before=$(grep -s '^seq=' "$work/report" | cut -d= -f2 || echo 0)
	kill -USR1 "$1"
	for _ in $(seq 100); do
		after=$(grep -s '^seq=' "$work/report" | cut -d= -f2 || echo 0)
		[[ $after != "$before" ]] && break
		sleep 0.05
	done
	grep -E '^(status|pid|token|counter|passes)=' "$work/report" | tr '\n' ' '; echo
}
onA() { ip netns exec "$A" "$@"; }
onB() { ip netns exec "$B" "$@"; }
waitready() { for _ in $(seq 200); do [[ -s $1 ]] && return; sleep 0.05; done; echo "not ready: $1" >&2; exit 1; }

say "two hosts: network namespaces $A (10.77.0.1) and $B (10.77.0.2, with its own PID namespace), joined by a veth pair"
ip netns add "$A"
ip netns add "$B"
ip link add "va$$" netns "$A" type veth peer name "vb$$" netns "$B"
onA ip addr add 10.77.0.1/24 dev "va$$"
onB ip addr add 10.77.0.2/24 dev "vb$$"
for h in "$A" "$B"; do ip netns exec "$h" ip link set lo up; done
onA ip link set "va$$" up
onB ip link set "vb$$" up

say "certificates: ferry certs init, one for each host's agent and one for the operator"
"$FERRY" certs init --dir "$work/pki" >/dev/null
"$FERRY" certs issue --dir "$work/pki" host-a --host 10.77.0.1 >/dev/null
"$FERRY" certs issue --dir "$work/pki" host-b --host 10.77.0.2 >/dev/null
"$FERRY" certs issue --dir "$work/pki" operator >/dev/null
tls() { echo --tls-cacert "$work/pki/ca.crt" --tls-cert "$work/pki/$1.crt" --tls-key "$work/pki/$1.key"; }

say "agents: ferry agent on each host"
ip netns exec "$A" "$FERRY" agent --listen 10.77.0.1:27100 --state-dir "$work/a" --node-name host-a $(tls host-a) \
	-v3 -o "$work/agent-a.log" --status-fd 3 3>"$work/ready-a" 2>/dev/null &
agentA=$!
ip netns exec "$B" unshare --pid --fork --mount-proc --kill-child "$FERRY" agent --listen 10.77.0.2:27100 --state-dir "$work/b" \
	--node-name host-b $(tls host-b) -v3 -o "$work/agent-b.log" --status-fd 3 3>"$work/ready-b" 2>/dev/null &
agentB=$!
waitready "$work/ready-a"
waitready "$work/ready-b"
echo "    host-a: 10.77.0.1:27100, host-b: 10.77.0.2:27100 (logs in $work)"

say "on host A: a workload with 256 MiB of patterned memory that also rewrites 64 MiB at 20 MiB/s"
gcc -O2 -pthread -mavx2 -Wall -o "$work/memcheck" testdata/workloads/memcheck.c
onA setsid "$work/memcheck" -m 256 -t 2 -C -c 20 -r "$work/report" </dev/null >/dev/null 2>&1 &
waitready "$work/report"
pid=$(grep '^pid=' "$work/report" | cut -d= -f2)
sleep 1
report "$pid"

say "migrate --from 10.77.0.1 --to 10.77.0.2 $pid   (run on host A, as the operator)"
onA "$MIGRATE" --from 10.77.0.1 --to 10.77.0.2 $(tls operator) "$pid"
gone() { [[ ! -e /proc/$1/stat ]] || [[ $(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) == Z ]]; }
for _ in $(seq 100); do gone "$pid" && break; sleep 0.02; done
gone "$pid" || { echo "process still on A?"; exit 1; }

# The migrated process has PID $pid inside B's PID namespace; find it from here.
nsB=$(readlink /proc/"$(pgrep -P "$agentB")"/ns/pid)
here=
for p in /proc/[0-9]*; do
	[[ $(readlink "$p/ns/pid" 2>/dev/null) == "$nsB" ]] || continue
	if grep -qE "^NSpid:.*[[:space:]]$pid\$" "$p/status" 2>/dev/null; then here=${p#/proc/}; fi
done
[[ -n $here ]] || { echo "no PID $pid on host B"; exit 1; }
echo "    on host B: PID $pid in its PID namespace (PID $here from the root), network namespace $(readlink /proc/"$here"/ns/net) (host B's is $(ip netns exec "$B" readlink /proc/self/ns/net))"
sleep 1

say "the same process continues on B: same token, counters went on, memory checked"
report "$here"
status=$(grep '^status=' "$work/report" | cut -d= -f2)
[[ $status == ok ]] && echo "memory verified: OK" || { echo "verification FAILED"; exit 1; }

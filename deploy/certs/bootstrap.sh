#!/usr/bin/env bash
# Bootstrap the certificates of a ferry cluster with "ferry certs":
# a CA, one certificate per agent (or, with --kubernetes, one certificate
# shared by every node), and an "operator" client certificate for migrate.
#
# Agents and migrate authenticate each other with mutual TLS, always. A
# peer checks that the agent's certificate names the address it dialled, so
# every ADDRESS must be what peers dial: the host of the agent's --listen
# (and its --page-address, if that differs).
#
# The script changes nothing outside DIR. With --kubernetes it prints the
# kubectl commands to run; it does not run them.
set -euo pipefail

prog=${0##*/}
ferry=${FERRY:-ferry}
dir=./pki
kubernetes=0
force=0
shared_name=ferry-agent

usage() {
	cat >&2 <<USAGE
usage: $prog [--dir DIR] [--kubernetes] [--force] NAME=ADDRESS[,ADDRESS...]...

Create the CA in DIR (default ./pki) unless DIR already holds one, then:
  without --kubernetes  DIR/NAME.crt and DIR/NAME.key for each NAME=ADDRESS,
                        valid for the ADDRESSes (IP addresses or DNS names)
  with --kubernetes     DIR/$shared_name.crt and DIR/$shared_name.key, one
                        certificate valid for every ADDRESS given, and the
                        kubectl command that puts it in the Secret
                        ferry-agent-certs (namespace ferry-system)
and DIR/operator.crt, DIR/operator.key, the client certificate of migrate.

Existing certificates are kept; --force issues the agents' again (to add a
node's address, say). operator.crt is issued only when missing.
The ferry binary is taken from \$FERRY, else from PATH.

examples:
  $prog --dir /etc/ferry/pki node-a=10.0.0.1 node-b=10.0.0.2,node-b.example
  $prog --dir ./pki --kubernetes n1=10.0.0.11 n2=10.0.0.12 n3=10.0.0.13
USAGE
	exit 2
}

die() {
	echo "$prog: $*" >&2
	exit 1
}

# bad reports a wrong argument, with the usage.
bad() {
	echo "$prog: $*" >&2
	usage
}

pairs=()
while (($# > 0)); do
	case $1 in
	--dir)
		(($# >= 2)) || usage
		dir=$2
		shift 2
		;;
	--dir=*)
		dir=${1#--dir=}
		shift
		;;
	--kubernetes | --k8s)
		kubernetes=1
		shift
		;;
	--force)
		force=1
		shift
		;;
	-h | --help)
		usage
		;;
	--)
		shift
		pairs+=("$@")
		break
		;;
	-*)
		bad "unknown option $1"
		;;
	*)
		pairs+=("$1")
		shift
		;;
	esac
done

((${#pairs[@]} > 0)) || usage
[[ -n $dir ]] || usage

# Check every argument before anything is written.
names=()
addresses=() # one entry per pair: its addresses, comma-separated
for pair in "${pairs[@]}"; do
	[[ $pair == *=* ]] || bad "$pair: not NAME=ADDRESS"
	name=${pair%%=*}
	addr=${pair#*=}
	if [[ -z $name || -z $addr || $name == */* || $name == *\\* ]]; then
		bad "$pair: not NAME=ADDRESS"
	fi
	case $name in
	ca | operator | gossip) # ca.*, gossip.key: the CA's files
		bad "$name: reserved name"
		;;
	esac
	if ((kubernetes)) && [[ $name == "$shared_name" ]]; then
		bad "$name: reserved name with --kubernetes"
	fi
	for seen in ${names[@]+"${names[@]}"}; do
		[[ $seen != "$name" ]] || bad "$name: given twice"
	done
	IFS=, read -r -a list <<<"$addr"
	for a in "${list[@]}"; do
		[[ -n $a && $a != *[[:space:]]* ]] || bad "$pair: empty or malformed address"
	done
	names+=("$name")
	addresses+=("$addr")
done

command -v "$ferry" >/dev/null 2>&1 || die "$ferry: not found (put ferry on PATH or set FERRY=/path/to/ferry)"

umask 077

# The CA: made once. "ferry certs init" refuses a directory that holds one.
if [[ -e $dir/ca.key ]]; then
	echo "$prog: using the existing CA in $dir" >&2
else
	"$ferry" certs init --dir "$dir" >&2
fi

# issue FORCE NAME HOST... issues DIR/NAME.crt and DIR/NAME.key, unless
# they exist and FORCE is 0.
issue() {
	local again=$1 name=$2
	shift 2
	if [[ -e $dir/$name.crt && $again -eq 0 ]]; then
		if [[ $name == operator ]]; then
			echo "$prog: keeping $dir/$name.crt (remove it to issue a new one)" >&2
		else
			echo "$prog: keeping $dir/$name.crt (--force issues it again)" >&2
		fi
		return 0
	fi
	if [[ -e $dir/$name.crt ]]; then
		echo "$prog: issuing $name again; the previous certificate stays valid until it expires unless revoked" >&2
	fi
	local args=()
	for h in "$@"; do
		args+=(--host "$h")
	done
	"$ferry" certs issue --dir "$dir" "$name" ${args[@]+"${args[@]}"} >&2
}

if ((kubernetes)); then
	# A DaemonSet mounts one Secret on every node, so every node gets the
	# same certificate: one certificate valid for all the nodes' addresses
	# (--host repeated). The cost: one key for the whole cluster. A node
	# added later needs this certificate issued again (--force, with every
	# node's address), and revoking it after a leak revokes every node.
	all=()
	for i in "${!names[@]}"; do
		IFS=, read -r -a list <<<"${addresses[$i]}"
		for a in "${list[@]}"; do
			dup=0
			for b in ${all[@]+"${all[@]}"}; do
				[[ $a != "$b" ]] || dup=1
			done
			((dup)) || all+=("$a")
		done
	done
	issue "$force" "$shared_name" "${all[@]}"
else
	for i in "${!names[@]}"; do
		IFS=, read -r -a list <<<"${addresses[$i]}"
		issue "$force" "${names[$i]}" "${list[@]}"
	done
fi

# The operator's client certificate (migrate, ferry nodes). Its host is
# never dialled, so the default one will do.
issue 0 operator

abs=$(cd "$dir" && pwd -P)
manifests=$(cd "$(dirname "${BASH_SOURCE[0]}")/../kubernetes" 2>/dev/null && pwd -P) || manifests=deploy/kubernetes

if ((kubernetes)); then
	q() { printf '%q' "$1"; }
	cat <<CMDS
# Run these against the cluster (the CA key, $abs/ca.key, stays here):
kubectl apply -f $(q "$manifests/namespace.yaml")
kubectl create secret generic ferry-agent-certs -n ferry-system \\
    --from-file=ca.crt=$(q "$abs/ca.crt") \\
    --from-file=tls.crt=$(q "$abs/$shared_name.crt") \\
    --from-file=tls.key=$(q "$abs/$shared_name.key")
# To replace an existing Secret, add "--dry-run=client -o yaml | kubectl apply -f -"
# to the create command. Agents read their certificates when they start.
CMDS
else
	echo "$prog: certificates in $abs:" >&2
	for name in "${names[@]}"; do
		echo "  $name.crt $name.key  -> that host's /etc/ferry/pki (with ca.crt)" >&2
	done
	echo "  operator.crt operator.key  -> the operator (migrate --tls-cert/--tls-key)" >&2
	echo "  ca.key  -> keep here; never copy it to the hosts" >&2
fi

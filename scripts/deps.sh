#!/usr/bin/env bash
# Installs what ferry's build and tests need on a Debian machine, once.
set -euo pipefail
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v python3 >/dev/null || need+=(python3)
command -v redis-server >/dev/null || need+=(redis-server)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null && command -v unshare >/dev/null || need+=(util-linux)
command -v make >/dev/null || need+=(make)
command -v runc >/dev/null || need+=(runc)
command -v busybox >/dev/null || need+=(busybox-static)
command -v nft >/dev/null || need+=(nftables)
command -v iptables-nft-save >/dev/null || need+=(iptables)
if ((${#need[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "deps: need root to install: ${need[*]}" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if ! command -v go >/dev/null; then
	echo "deps: Go is required (https://go.dev/dl); /usr/local/go/bin must be on PATH" >&2
	exit 1
fi
go mod download

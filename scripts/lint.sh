#!/usr/bin/env bash
# Formatting, vet, and project rules (STYLE.md): unsafe only in *_unsafe.go.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$(gofmt -l $(git ls-files '*.go' | grep -v '\.pb\.go$') || true)
if [[ -n $bad ]]; then
	echo "gofmt needed:"; echo "$bad"; exit 1
fi
go vet ./...
unsafe=$(grep -l '"unsafe"' $(git ls-files '*.go' | grep -v '_unsafe\.go$' | grep -v '\.pb\.go$' | grep -v '_unsafe_test\.go$') || true)
if [[ -n $unsafe ]]; then
	echo "unsafe outside *_unsafe.go:"; echo "$unsafe"; exit 1
fi
echo "lint: ok"

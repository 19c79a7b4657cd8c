#!/usr/bin/env bash
# make bench: dump/restore of the C workload at 64 MiB, 1 GiB and 4 GiB on
# tmpfs against a plain write loop (bench/results.json), then live
# migrations between two local hosts at 256 MiB, 1 GiB and 4 GiB, dirty
# rates 0, 10 and 100 MiB/s, every mode and a stop-and-copy baseline
# (bench/migrate.json). BENCH_ONLY=core|migrate runs one of the two;
# BENCH_MIGRATE_SIZES, _DIRTY and _MODES (stop-and-copy,precopy,hybrid,postcopy)
# narrow the migrations.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${BENCH_ONLY:-core} != migrate ]]; then
	go run ./bench -ferry bin/ferry -sizes "${BENCH_SIZES:-64,1024,4096}" -runs "${BENCH_RUNS:-3}" -out bench/results.json
fi
if [[ ${BENCH_ONLY:-migrate} != core ]]; then
	FERRY_BENCH_SIZES="${BENCH_MIGRATE_SIZES:-256,1024,4096}" FERRY_BENCH_DIRTY="${BENCH_MIGRATE_DIRTY:-0,10,100}" \
		FERRY_BENCH_MODES="${BENCH_MIGRATE_MODES:-}" \
		FERRY_BENCH_OUT="$PWD/bench/migrate.json" \
		go test -count=1 -run '^$' -bench Migrate -benchtime 1x -timeout 90m ./e2e
fi

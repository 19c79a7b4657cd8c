#!/usr/bin/env bash
# make bench: dump/restore of the C workload at 64 MiB, 1 GiB and 4 GiB on
# tmpfs against a plain write loop; JSON in bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./bench -ferry bin/ferry -sizes "${BENCH_SIZES:-64,1024,4096}" -runs "${BENCH_RUNS:-3}" -out bench/results.json

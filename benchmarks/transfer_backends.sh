#!/usr/bin/env bash
# KV transfer throughput of every backend (tcp, tcp-staged, shm, nixl, nixl-tcp, mooncake) against the raw-socket
# and memcpy ceilings of the same run, shuffled destination pages, at four sizes (docs/benchmarks.md, issue 24):
# 16 MiB and 256 MiB of 64 KiB pages, and a 2k-token prompt of the 135M shape (30 layers, 3 KV heads, head dim 64)
# and of the 8B shape (32 layers, 8 KV heads, head dim 128), 16-token bf16 pages.
# Usage: PYTHONPATH=. benchmarks/transfer_backends.sh OUT_DIR [REPEAT]
set -euo pipefail
out=${1:?output directory}; repeat=${2:-5}
mkdir -p "$out"
export OMP_NUM_THREADS=1 GLOG_minloglevel=2
run() {
    local name=$1; shift
    echo "== $name (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    nice -n 10 python -m pdserve.cli bench transfer --shuffle --repeat "$repeat" "$@" --output-file "$out/$name.json" \
        2>&1 | grep -v -E '^[IWE][0-9]{4} |NIXL INFO|WARNING: Logging'
}
run 16MiB --layers 8 --pages 32
run 256MiB --layers 8 --pages 512
run 135M-2k --layers 30 --kv-heads 3 --head-dim 64 --pages 128
run 8B-2k --layers 32 --kv-heads 8 --head-dim 128 --pages 128
echo "== done (load average: $(cut -d' ' -f1-3 /proc/loadavg))"

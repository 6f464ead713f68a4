#!/usr/bin/env bash
# Result 4 (docs/benchmarks.md): offline throughput of the pdserve engine vs transformers on this machine.
# tiny: with transformers' generate_batch (~2 min); 100m: without it (--no-continuous, ~5 min;
# generate_batch would take ~11 min more on 2 cores). Run when the machine is otherwise idle.
set -euo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
python -m pdserve.bench.engine_throughput --models tiny --num-prompts 64 --threads 2 --output-file "$out/engine_tiny.json"
python -m pdserve.bench.engine_throughput --models 100m --num-prompts 64 --threads 2 --no-continuous \
  --output-file "$out/engine_100m.json"

#!/usr/bin/env bash
# Offline throughput of the pdserve engine vs transformers on this machine (see docs/benchmarks.md).
set -euo pipefail
python -m pdserve.bench.engine_throughput --models tiny 100m --num-prompts 64 --threads 2 \
  --output-file "${1:-engine_vs_transformers.json}"

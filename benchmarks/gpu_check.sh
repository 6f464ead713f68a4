#!/usr/bin/env bash
# GPU checks of the engine (issue 12). Run on a machine with one CUDA GPU, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# The GPU machine's image lacks some of pdserve's dependencies (msgspec, llguidance, fastapi, ...):
# fetch their wheels beforehand with `bash benchmarks/gpu_wheels.sh` (writes .whl/) and carry .whl;
# this script installs whatever .whl/ holds into /tmp/site first. PYTHON picks the interpreter
# (default python3, the one with torch there).
# 1. identity: greedy token identity vs transformers on CUDA (tiny model and SmolLM2-135M shape, float32;
#    a divergence at a near tie of transformers' own logits is reported, not failed), plus the bf16
#    agreement rate, each with decode CUDA graphs and without (graph vs eager tokens and engine times);
# 2. engine_1b / engine_135m: offline throughput vs transformers generate on the same GPU (a ~1B Llama
#    shape and the 135M shape, bf16, 64 requests); the 1B run also times the engine without CUDA graphs;
# 3. pd_pair: a P/D pair (one prefill, one decode server) on one GPU with the tcp backend, through the
#    router, checked against the same prompts served by one colocated server;
# 4. transfer: tcp transfer throughput between two GPU pools (pages staged through pinned host buffers,
#    bytes checked on arrival) against a raw loopback socket between host buffers, in-order and shuffled.
# Every step runs whatever the others did, under its own timeout; the per-step timeouts add up to
# 12 minutes (a session has 15 minutes of device time, machine start included; expected total on an
# H200 is 4-6 minutes). The last lines are one PASS/FAIL/TIMEOUT line per step; exit status 1 if any
# step did not pass.
set -uo pipefail
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "installing .whl/ failed: steps may not import pdserve"
fi
summary=()
failed=0
started=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.log, record one summary line
  local name=$1 limit=$2
  shift 2
  local begin=$SECONDS
  echo "== $name (timeout ${limit} s)"
  timeout -k 15 "$limit" "$@" 2>&1 | sed -u '/Loading weights\|Writing model shards/d' | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict=PASS
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict=TIMEOUT
  elif [ "$rc" -ne 0 ]; then
    verdict=FAIL
  fi
  [ "$verdict" = PASS ] || failed=1
  summary+=("$(printf '%-8s %-12s rc=%-3s %4d s  %s' "$verdict" "$name" "$rc" $((SECONDS - begin)) "$out/$name.log")")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$py" -c "import pdserve.engine.engine, pdserve.server.app; print('pdserve imports')"
} 2>&1 | tee "$out/gpu.txt"

step identity 240 "$py" benchmarks/gpu_identity.py --device cuda
step engine_1b 210 "$py" -m pdserve.bench.engine_throughput --models 1b --device cuda --dtype bfloat16 \
  --num-prompts 64 --hf-batch-sizes 16 64 --no-continuous --also-eager --output-file "$out/engine_1b.json"
step engine_135m 120 "$py" -m pdserve.bench.engine_throughput --models 135m --device cuda --dtype bfloat16 \
  --num-prompts 64 --hf-batch-sizes 16 64 --no-continuous --output-file "$out/engine_135m.json"
step pd_pair 120 "$py" benchmarks/gpu_pd_pair.py --device cuda
grep -h "captured CUDA graphs\|CUDA graph capture failed" "$out"/*.log || true

step transfer 60 bash -c "\"$py\" -m pdserve.cli bench transfer --device cuda --backend tcp \
  --output-file $out/transfer_cuda_in_order.json && \"$py\" -m pdserve.cli bench transfer --device cuda --backend tcp \
  --shuffle --output-file $out/transfer_cuda_shuffled.json"
echo "== summary ($((SECONDS - started)) s in all)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $failed

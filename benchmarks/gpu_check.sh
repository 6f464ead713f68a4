#!/usr/bin/env bash
# GPU checks of the engine (issue 12). Run on a machine with one CUDA GPU, from the repository root:
#   PYTHONPATH=. bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. greedy token identity vs transformers on CUDA (tiny model and SmolLM2-135M shape, float32),
#    plus the bf16 agreement rate, each with decode CUDA graphs and without (graph vs eager tokens
#    and engine times);
# 2. offline throughput vs transformers generate on the same GPU (135M shape and a ~1B Llama shape, bf16),
#    with CUDA graphs, then the engine of the 1B shape again without them (--disable-cuda-graph);
# 3. a P/D pair (one prefill, one decode server) on one GPU with the tcp backend, through the router,
#    checked against the same prompts served by one colocated server;
# 4. tcp transfer throughput between two GPU pools (pages staged through pinned host buffers, bytes
#    checked on arrival) against a raw loopback socket between host buffers, in-order and shuffled.
set -uo pipefail
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

echo "== 1. greedy identity vs transformers on CUDA"
timeout 900 python benchmarks/gpu_identity.py --device cuda 2>&1 | tee "$out/identity.log" || status=1

echo "== 2. throughput vs transformers generate on the same GPU"
for model in 135m 1b; do
  timeout 1200 python -m pdserve.bench.engine_throughput --models "$model" --device cuda --dtype bfloat16 \
    --num-prompts 64 --hf-batch-sizes 16 64 --no-continuous --output-file "$out/engine_$model.json" \
    2>&1 | grep -v "Loading weights" | tee "$out/engine_$model.log" || status=1
done

timeout 1200 python -m pdserve.bench.engine_throughput --models 1b --device cuda --dtype bfloat16 \
  --num-prompts 64 --hf-batch-sizes 16 --no-continuous --disable-cuda-graph --output-file "$out/engine_1b_eager.json" \
  2>&1 | grep -v "Loading weights" | tee "$out/engine_1b_eager.log" || status=1
grep -h "captured CUDA graphs\|CUDA graph capture failed" "$out"/*.log || true

echo "== 3. P/D pair on one GPU, tcp backend"
timeout 900 python benchmarks/gpu_pd_pair.py --device cuda 2>&1 | tee "$out/pd_pair.log" || status=1

echo "== 4. tcp transfer between GPU pools (host staging)"
for order in in-order shuffled; do
  flag=$([ "$order" = shuffled ] && echo --shuffle)
  timeout 600 python -m pdserve.cli bench transfer --device cuda --backend tcp $flag \
    --output-file "$out/transfer_cuda_$order.json" 2>&1 | tee "$out/transfer_cuda_$order.log" || status=1
done
exit $status

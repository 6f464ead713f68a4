#!/usr/bin/env bash
# GPU checks of the engine (issue 12). Run on a machine with one CUDA GPU, from the repository root:
#   PYTHONPATH=. bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. greedy token identity vs transformers on CUDA (tiny model and SmolLM2-135M shape, float32),
#    plus the bf16 agreement rate;
# 2. offline throughput vs transformers generate on the same GPU (135M shape and a ~1B Llama shape, bf16);
# 3. a P/D pair (one prefill, one decode server) on one GPU with the tcp backend, through the router,
#    checked against the same prompts served by one colocated server.
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

echo "== 3. P/D pair on one GPU, tcp backend"
timeout 900 python benchmarks/gpu_pd_pair.py --device cuda 2>&1 | tee "$out/pd_pair.log" || status=1
exit $status

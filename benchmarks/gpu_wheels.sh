#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels of pdserve's dependencies that the GPU machine's
# image lacks (its python3 is 3.12 with torch, transformers, numpy, scipy, aiohttp, httpx, tokenizers,
# safetensors, jinja2, prometheus_client, tqdm, anyio, click and h11 already; it reaches no network).
# Without them every GPU check dies at `import msgspec`. Run from the repository root:
#   bash benchmarks/gpu_wheels.sh          # writes .whl/ (git-ignored)
# then carry `.whl` to the GPU machine; benchmarks/gpu_check.sh installs whatever .whl/ holds into
# /tmp/site before its first step. Versions are those the CPU test suite runs with.
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" msgspec==0.23.0 llguidance==1.9.1 pyzmq==27.3.0 pydantic_core==2.46.4 \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  uvicorn==0.54.0 typing_extensions==4.16.0 annotated-doc==0.0.7
ls -la "$dest"

#!/usr/bin/env bash
# One GPU session: check the CPU-tested code on the GPU's jax, then benchmark generation.
# Usage: bash benchmarks/gpu.sh OUTPUT_DIR   (run from the repository root; needs no network)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTPUT_DIR}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_ops.py tests/test_cache.py tests/test_model.py \
  tests/test_generate.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
python3 benchmarks/generate.py --preset llama-1b --dtype bfloat16 --random-weights --batch-sizes 1 32 128 \
  --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/generate_llama-1b_gpu.json" \
  --plot "$out/generate_llama-1b_gpu.png" 2>&1 | grep -v "it/s]" | tee "$out/generate.txt"

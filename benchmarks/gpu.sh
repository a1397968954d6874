#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md. Each one runs from a fresh checkout on a machine with jax (CUDA),
# flax and torch installed, with no network (random-weight presets only), from the repository root:
#
#   bash benchmarks/gpu.sh OUT kernels [HEADS ...]
#                                          # <= 10 min: the kernel tests on the GPU, then, where a module with the
#                                          # kernels before a change is saved as benchmarks/kernels_before.py (or
#                                          # $PREVIOUS_KERNELS), both default kernels, decode and prefill, in one run each
#                                          # (tune_kernels.py --ab), 32/8/128 and 9/3/64 heads by default:
#                                          # OUT/pytest_gpu.txt, OUT/kernels_ab_HEADS.{json,txt} (HEADS as 32_8_128)
#   bash benchmarks/gpu.sh OUT attention   # <= 9 min: decode attention at 9 headline shapes (3 head shapes x 8x8192,
#                                          # 32x2048, 128x8192), then prefill and chunked prefill, every peer:
#                                          # OUT/attention.{json,png,txt}, OUT/prefill.{json,png,txt}
#   bash benchmarks/gpu.sh OUT generate [PRESET ...]
#                                          # <= 7 min a preset: batched generation, paged against contiguous, with
#                                          # the kernels and with the reference attention (generate(..., impl=...)),
#                                          # llama-1b and smollm2-135m-random by default:
#                                          # OUT/generate_PRESET_{kernel,reference}.json, OUT/generate_PRESET.png
#   bash benchmarks/gpu.sh OUT engine [PRESET ...]
#                                          # <= 9.5 min a preset: the engine's workloads A and C (benchmarks/engine.py)
#                                          # with the static generate and transformers' continuous batching (64
#                                          # requests, at most 200 s) beside (7 min for llama-1b on an H200),
#                                          # llama-1b by default: OUT/engine_PRESET_AC.{json,png,txt};
#                                          # HF_REQUESTS=0 leaves transformers' peer out
#   bash benchmarks/gpu.sh OUT engine-b [PRESET ...]
#                                          # <= 4 min a preset: workload B, prefix caching on and off:
#                                          # OUT/engine_PRESET_B.{json,png,txt}
#   bash benchmarks/gpu.sh OUT tp-baseline [N ...]
#                                          # <= 8 min: llama-8b (bf16, random weights) decode on N GPUs (1 by default:
#                                          # the single-GPU baseline of the tensor-parallel runs), batch 1, 32 and 128:
#                                          # OUT/generate_llama-8b_tpN.json
#   bash benchmarks/gpu.sh OUT kv-quant    # <= 9.5 min: the 8-bit tests on the GPU (int8 q . k products among them), then
#                                          # the decode kernel's launches on 8-bit pools (tune_kv_quant.py):
#                                          # OUT/pytest_kv_quant_gpu.txt, OUT/tune_kv_quant.{json,txt}
#   bash benchmarks/gpu.sh OUT serve [PRESET ...]
#                                          # <= 9 min a preset: `jaxpaged serve` at Poisson request rates and at
#                                          # saturation, the engine offline beside (benchmarks/serve.py):
#                                          # OUT/serve_PRESET.{json,png,txt}
#
# The times are the sums of the steps' timeouts: each step has its own, so that one running long still
# leaves the others' files (attention.py rewrites its JSON after every shape, so even a step stopped by
# its timeout keeps the shapes it finished). Every run first records the card and the versions
# (OUT/gpu.txt) and ends with a short table. Bandwidths are reported against the card's specified
# bandwidth (benchmarks/ceilings.py), with the XLA copy measured beside it as a peer.
# The runs this script replaced (kernels128, heads64, rows, exp2, packed_ab, ...) are listed by name in
# benchmarks/NOTES.md, where the results they wrote are cited.
set -uo pipefail
usage="usage: bash benchmarks/gpu.sh OUT kernels [HEADS ...] | attention | generate [PRESET ...] | engine [PRESET ...]
       | engine-b [PRESET ...] | tp-baseline [N ...] | kv-quant | serve [PRESET ...]"
out=${1:?$usage}
run=${2:?$usage}
shift 2
mkdir -p "$out"
export PYTHONPATH=.:benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, \
jax.devices())" | tee -a "$out/gpu.txt"
quiet() { grep -v -e Deprecation -e "it/s]"; }  # drop the backend's deprecation notes and progress bars

case "$run" in
kernels)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  heads=("$@")
  [ ${#heads[@]} -gt 0 ] || heads=(32/8/128 9/3/64)
  previous=${PREVIOUS_KERNELS:-benchmarks/kernels_before.py}  # the kernels before a change, as one module
  if [ ! -e "$previous" ]; then
    echo "no $previous: to time a change, save a module with the kernels before it there (tune_kernels.py --previous)"
  fi
  for head in "${heads[@]}"; do  # decode at 9 shapes, prefill at 3; each file's defaults timed twice (tune_kernels.py)
    [ -e "$previous" ] || break
    name=${head//\//_}
    timeout 180 python3 benchmarks/tune_kernels.py --ab --previous "$previous" --part all \
      --heads "$head" --out "$out/kernels_ab_$name.json" 2>&1 | quiet | tee "$out/kernels_ab_$name.txt"
  done
  ;;
attention)
  timeout 330 python3 benchmarks/attention.py --only decode --heads 32/8/128 32/8/64 9/3/64 \
    --shapes 8x8192 32x2048 128x8192 --out-dir "$out" 2>&1 | quiet | tee "$out/attention.txt"
  timeout 200 python3 benchmarks/attention.py --only prefill --out-dir "$out" 2>&1 | quiet | tee "$out/prefill.txt"
  ;;
generate)
  presets=("$@")
  [ ${#presets[@]} -gt 0 ] || presets=(llama-1b smollm2-135m-random)
  for preset in "${presets[@]}"; do
    for impl in kernel reference; do
      timeout 200 python3 benchmarks/generate.py --preset "$preset" --dtype bfloat16 --impl "$impl" \
        --batch-sizes 1 32 128 --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/generate_${preset}_$impl.json" \
        $([ "$impl" = kernel ] && echo --plot "$out/generate_$preset.png") 2>&1 | quiet \
        | tee "$out/generate_${preset}_$impl.txt"
    done
  done
  ;;
engine)
  presets=("$@")
  [ ${#presets[@]} -gt 0 ] || presets=(llama-1b)
  for preset in "${presets[@]}"; do
    timeout 560 python3 benchmarks/engine.py --model "$preset" --workloads A C --hf-requests "${HF_REQUESTS:-64}" --hf-timeout 200 \
      --out "$out/engine_${preset}_AC.json" 2>&1 | quiet | tee "$out/engine_${preset}_AC.txt"
  done
  ;;
engine-b)
  presets=("$@")
  [ ${#presets[@]} -gt 0 ] || presets=(llama-1b)
  for preset in "${presets[@]}"; do
    timeout 240 python3 benchmarks/engine.py --model "$preset" --workloads B --static-group 0 --hf-requests 0 \
      --out "$out/engine_${preset}_B.json" 2>&1 | quiet | tee "$out/engine_${preset}_B.txt"
  done
  ;;
tp-baseline)
  sizes=("$@")
  [ ${#sizes[@]} -gt 0 ] || sizes=(1)
  for n in "${sizes[@]}"; do
    timeout 480 python3 benchmarks/generate.py --preset llama-8b --dtype bfloat16 --impl kernel --tensor-parallel "$n" \
      --batch-sizes 1 32 128 --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/generate_llama-8b_tp$n.json" \
      2>&1 | quiet | tee "$out/generate_llama-8b_tp$n.txt"
  done
  ;;
kv-quant)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kv_quant.py 2>&1 | tail -n 15 \
    | tee "$out/pytest_kv_quant_gpu.txt"
  timeout 360 python3 benchmarks/tune_kv_quant.py --out "$out/tune_kv_quant.json" 2>&1 | quiet | tee "$out/tune_kv_quant.txt"
  ;;
serve)
  presets=("$@")
  [ ${#presets[@]} -gt 0 ] || presets=(llama-1b)
  for preset in "${presets[@]}"; do
    timeout 540 python3 benchmarks/serve.py --model "$preset" --out "$out/serve_$preset.json" 2>&1 | quiet \
      | tee "$out/serve_$preset.txt"
  done
  ;;
*)
  echo "$usage" >&2
  exit 2
  ;;
esac

#!/usr/bin/env bash
# GPU sessions, in parts that each fit one call:
#   bash benchmarks/gpu.sh OUTPUT_DIR kernels    # tests on the GPU's jax, then benchmarks/attention.py
#   bash benchmarks/gpu.sh OUTPUT_DIR kernels128 # the same with only the 32/8/128 heads (heads64 does the others)
#   bash benchmarks/gpu.sh OUTPUT_DIR decode     # kernel tests, then decode attention at 32/8/128 heads
#   bash benchmarks/gpu.sh OUTPUT_DIR generate   # fixed-shape kernel tests, prefill attention, then benchmarks/generate.py:
#                                                # llama-1b, kernels on and off
#   bash benchmarks/gpu.sh OUTPUT_DIR heads64    # decode attention at every size with the llama-1b and SmolLM2 heads
#   bash benchmarks/gpu.sh OUTPUT_DIR rows       # kernel tests, then the row-gather decode variants against the defaults
#   bash benchmarks/gpu.sh OUTPUT_DIR rows2      # the row-gather variants' stages, warps, step and splits, three head shapes
#   bash benchmarks/gpu.sh OUTPUT_DIR tune64     # the row gather at head dim 64: stages, 128-position steps, 2 warps
#   bash benchmarks/gpu.sh OUTPUT_DIR knpd       # the row gather from head-major (KNPD) pools, three head shapes
#   bash benchmarks/gpu.sh OUTPUT_DIR exp2       # prefill tiles and launch order, the decode gathers and splits,
#                                                # against a copy of the kernel file before (benchmarks/kernel_before.py)
#   bash benchmarks/gpu.sh OUTPUT_DIR steps      # one split with 32 KB steps and 7 stages against the defaults
#                                                # (steps2: at 72 to 192 programs, where one split starts to pay;
#                                                # steps3: splits that make 96-128 programs of that kind)
#   bash benchmarks/gpu.sh OUTPUT_DIR tail       # the defaults with only the last step masked, transposed, evict-first
#   bash benchmarks/gpu.sh OUTPUT_DIR jaxpeer    # jax's paged kernel over a wide grid of its launch parameters
#   bash benchmarks/gpu.sh OUTPUT_DIR smollm2    # generation with SmolLM2-135M's shape, random weights, kernels on/off
#   bash benchmarks/gpu.sh OUTPUT_DIR prefill_tiles  # the prefill kernel's tile configurations (tune_kernels.py)
#   bash benchmarks/gpu.sh OUTPUT_DIR prefill    # prefill and chunked prefill against torch, XLA and jax's own kernels
#   bash benchmarks/gpu.sh OUTPUT_DIR prefill_rows  # kernel tests, the prefill kernel against the file before
#                                                # (benchmarks/kernel_before.py) at three head shapes, then prefill
#   bash benchmarks/gpu.sh OUTPUT_DIR prefill_splits  # kernel tests, chunks over a long cached prefix in 1-8
#                                                # splits (tune_kernels.py), then prefill
#   bash benchmarks/gpu.sh OUTPUT_DIR ncu_prefill  # Nsight Compute on the prefill kernel, jax's Pallas flash
#                                                # attention and torch SDPA (8 x 2048, 32/8/128 and 9/3/64 heads)
#   bash benchmarks/gpu.sh OUTPUT_DIR prefill_ab  # the prefill kernel against the file before (kernel_before.py),
#                                                # whole prompts and chunks, three head shapes
#   bash benchmarks/gpu.sh OUTPUT_DIR ncu_sass   # the same two kernels' SASS with executed instructions and stall
#                                                # samples per instruction (CSV), 8 x 2048 at 32/8/128 heads
#   bash benchmarks/gpu.sh OUTPUT_DIR packed     # kernel tests, then decode with 2 or 4 kv heads packed in a program
#                                                # (heads_per_program) against the defaults, 32/8/64 and 32/8/128 heads
#                                                # (packed2: at short contexts and up to 256 sequences)
#   bash benchmarks/gpu.sh OUTPUT_DIR packed_ab  # kernel tests, the new defaults against the file before
#                                                # (benchmarks/kernel_before.py), then attention.py at 128 x 512
#   bash benchmarks/gpu.sh OUTPUT_DIR decode_tables  # decode attention at every size, 32/8/128 heads, no tests
#                                                # (decode_tables64: 32/8/64 heads)
#   bash benchmarks/gpu.sh OUTPUT_DIR linear_ab  # the optimized HLO of a one-row and a two-row projection, then
#                                                # batch-1 generation (llama-1b, SmolLM2 shape) with models/llama.py
#                                                # before (benchmarks/llama_before.py) and now
#   bash benchmarks/gpu.sh OUTPUT_DIR generate_ab  # llama-1b generation at batch 128 with the kernel file before
#                                                # (benchmarks/kernel_before.py), then with the current one
# Run from the repository root; needs no network.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTPUT_DIR kernels|generate|heads64|rows|rows2|tune64|knpd|kernels128|decode|exp2|steps|steps2|steps3|tail|jaxpeer|smollm2|prefill_tiles|prefill|prefill_rows|prefill_splits|ncu_prefill|ncu_sass|prefill_ab|packed|packed2|packed_ab|generate_ab|decode_tables|decode_tables64|linear_ab}
part=${2:?usage: bash benchmarks/gpu.sh OUTPUT_DIR kernels|generate|heads64|rows|rows2|tune64|knpd|kernels128|decode|exp2|steps|steps2|steps3|tail|jaxpeer|smollm2|prefill_tiles|prefill|prefill_rows|prefill_splits|ncu_prefill|ncu_sass|prefill_ab|packed|packed2|packed_ab|generate_ab|decode_tables|decode_tables64|linear_ab}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
if [ "$part" = kernels ]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 330 python3 benchmarks/attention.py --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/attention.txt"
elif [ "$part" = rows ]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 320 python3 benchmarks/tune_kernels.py --part decode --out "$out/tune_rows.json" --variants default \
    rows_transposed_masked_loads_prefetch rows_transposed_masked_loads rows_transposed_masked_loads_stages_5 \
    rows_transposed_masked_loads_128_warps_8 rows_masked_loads 2>&1 | grep -v Deprecation | tee "$out/tune_rows.txt"
elif [ "$part" = rows2 ]; then  # the row-gather kernel's stages, warps, step and splits, at three head shapes
  for heads in 32/8/128 32/8/64 9/3/64; do
    timeout 200 python3 benchmarks/tune_kernels.py --part decode --heads $heads --out "$out/tune_rows2_${heads//\//_}.json" \
      --variants default rows_transposed_masked_loads_stages_5 rows_transposed_masked_loads_stages_7 \
      rows_transposed_masked_loads_stages_9 rows_transposed_masked_loads_stages_5_warps_8 \
      rows_transposed_masked_loads_stages_5_blocks_per_step_2 rows_transposed_masked_loads_stages_5_splits_x2 \
      rows_masked_loads_stages_5 rows_masked_loads_stages_7 2>&1 | grep -v Deprecation | tee "$out/tune_rows2_${heads//\//_}.txt"
  done
elif [ "$part" = tune64 ]; then  # the row gather at head dim 64: steps in flight, step length, warps
  for heads in 32/8/64 9/3/64; do
    timeout 200 python3 benchmarks/tune_kernels.py --part decode --heads $heads --out "$out/tune64_${heads//\//_}.json" \
      --variants default rows_masked_loads_stages_5 rows_transposed_masked_loads_stages_5 rows_masked_loads_stages_7 \
      rows_masked_loads_stages_9 rows_masked_loads_128_stages_5 rows_transposed_masked_loads_128_stages_5 \
      rows_masked_loads_stages_5_warps_2 2>&1 | grep -v Deprecation | tee "$out/tune64_${heads//\//_}.txt"
  done
elif [ "$part" = knpd ]; then  # the row gather from head-major pools, and one split, at the shapes >= 64k
  for heads in 32/8/64 9/3/64 32/8/128; do
    timeout 190 python3 benchmarks/tune_kernels.py --part decode --heads $heads --out "$out/knpd_${heads//\//_}.json" \
      --shapes 8x8192 32x2048 128x512 32x8192 128x2048 128x8192 --variants default rows_knpd rows_knpd_128 \
      rows_knpd_stages_7 rows_knpd_one_split rows_one_split rows_knpd_splits_x2 2>&1 | grep -v Deprecation \
      | tee "$out/knpd_${heads//\//_}.txt"
  done
elif [ "$part" = kernels128 ]; then  # kernel tests, then the head-dim-128 decode sweep, prefill and the KV write
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 370 python3 benchmarks/attention.py --heads 32/8/128 --out-dir "$out" 2>&1 | grep -v Deprecation \
    | tee "$out/attention.txt"
elif [ "$part" = decode ]; then  # kernel tests, then the decode sweep at 32/8/128 heads (heads64: the other two)
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 380 python3 benchmarks/attention.py --heads 32/8/128 --only decode --out-dir "$out" 2>&1 \
    | grep -v Deprecation | tee "$out/attention.txt"
elif [ "$part" = exp2 ]; then  # the base-2 softmax, the prefill launch, the one-step gather and the splits
  timeout 210 python3 benchmarks/tune_kernels.py --part prefill --previous kernel_before --out "$out/tune_prefill.json" \
    2>&1 | grep -v Deprecation | tee "$out/tune_prefill.txt"
  timeout 170 python3 benchmarks/tune_kernels.py --part decode --heads 9/3/64 --previous kernel_before \
    --out "$out/tune_decode_9_3_64.json" --shapes 32x2048 8x8192 8x512 1x2048 \
    --variants default rows blocks splits_x2 splits_x3 2>&1 | grep -v Deprecation | tee "$out/tune_decode_9_3_64.txt"
  for heads in 32/8/64 32/8/128; do
    timeout 85 python3 benchmarks/tune_kernels.py --part decode --heads $heads --previous kernel_before \
      --out "$out/tune_decode_${heads//\//_}.json" --shapes 8x8192 1x2048 --variants default rows blocks \
      2>&1 | grep -v Deprecation | tee "$out/tune_decode_${heads//\//_}.txt"
  done
elif [ "$part" = steps ]; then  # one split per sequence and kv head with 32 KB steps, several in flight
  one='{"num_splits": 1, "num_stages": 7}'
  timeout 190 python3 benchmarks/tune_kernels.py --part decode --heads 9/3/64 --out "$out/steps_9_3_64.json" \
    --shapes 32x512 32x2048 32x8192 128x512 128x2048 128x8192 --variants default \
    --options '{"num_splits": 1, "blocks_per_step": 8, "num_stages": 7}' --options '{"blocks_per_step": 8, "num_stages": 7}' \
    --options '{"num_splits": 1, "blocks_per_step": 8}' --options "$one" 2>&1 | grep -v Deprecation | tee "$out/steps_9_3_64.txt"
  timeout 190 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/64 --out "$out/steps_32_8_64.json" \
    --shapes 8x2048 8x8192 32x512 32x2048 32x8192 128x2048 --variants default \
    --options '{"num_splits": 1, "blocks_per_step": 8, "num_stages": 7}' --options '{"blocks_per_step": 8, "num_stages": 7}' \
    --options '{"num_splits": 1, "blocks_per_step": 8}' --options "$one" 2>&1 | grep -v Deprecation | tee "$out/steps_32_8_64.txt"
  timeout 170 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/128 --out "$out/steps_32_8_128.json" \
    --shapes 8x2048 8x8192 32x2048 32x8192 128x2048 --variants default --options "$one" \
    --options '{"num_splits": 1}' --options '{"num_stages": 7}' 2>&1 | grep -v Deprecation | tee "$out/steps_32_8_128.txt"
elif [ "$part" = steps2 ]; then  # the same between 64 and 256 programs (without splits): where one split starts to pay
  deep='{"num_splits": 1, "blocks_per_step": 8, "num_stages": 7}'
  for heads in 9/3/64 32/8/64 32/8/128; do
    case $heads in 9/3/64) shapes="24x2048 24x8192 48x2048 64x512 64x2048";; *) shapes="12x2048 16x512 16x2048 16x8192";; esac
    [ $heads = 32/8/128 ] && deep='{"num_splits": 1, "num_stages": 7}'
    timeout 150 python3 benchmarks/tune_kernels.py --part decode --heads $heads --out "$out/steps2_${heads//\//_}.json" \
      --shapes $shapes --variants default splits_1 --options "$deep" 2>&1 | grep -v Deprecation \
      | tee "$out/steps2_${heads//\//_}.txt"
  done
elif [ "$part" = steps3 ]; then  # split so that 96-132 programs run, with 32 KB steps and 7 stages, where fewer would
  t=benchmarks/tune_kernels.py
  timeout 100 python3 $t --part decode --heads 32/8/64 --out "$out/steps3_32_8_64_b8.json" --shapes 8x8192 8x2048 \
    --variants default --options '{"num_splits": 2, "blocks_per_step": 8, "num_stages": 7}' 2>&1 | grep -v Deprecation
  timeout 100 python3 $t --part decode --heads 32/8/64 --out "$out/steps3_32_8_64_b1.json" --shapes 1x8192 \
    --variants default --options '{"num_splits": 12, "blocks_per_step": 8, "num_stages": 7}' \
    --options '{"num_splits": 16, "blocks_per_step": 8, "num_stages": 7}' 2>&1 | grep -v Deprecation
  timeout 100 python3 $t --part decode --heads 32/8/128 --out "$out/steps3_32_8_128_b8.json" --shapes 8x8192 8x2048 \
    --variants default --options '{"num_splits": 2, "num_stages": 7}' 2>&1 | grep -v Deprecation
  timeout 100 python3 $t --part decode --heads 9/3/64 --out "$out/steps3_9_3_64.json" --shapes 8x8192 32x8192 \
    --variants default --options '{"num_splits": 4, "blocks_per_step": 8, "num_stages": 7}' \
    --options '{"num_splits": 5, "blocks_per_step": 8, "num_stages": 7}' \
    --options '{"num_splits": 1, "blocks_per_step": 8, "num_stages": 9}' \
    --options '{"num_splits": 1, "blocks_per_step": 8, "num_stages": 7, "num_warps": 8}' 2>&1 | grep -v Deprecation
elif [ "$part" = tail ]; then  # masking only the step that holds the length, with the row gather; transposed; evict-first
  for heads in 9/3/64 32/8/64 32/8/128; do
    timeout 150 python3 benchmarks/tune_kernels.py --part decode --heads $heads --out "$out/tail_${heads//\//_}.json" \
      --shapes 32x8192 8x8192 32x2048 --variants default --options '{"mask_tail_only": true}' \
      --options '{"transposed": true}' --options '{"eviction_policy": "evict_first"}' 2>&1 | grep -v Deprecation \
      | tee "$out/tail_${heads//\//_}.txt"
  done
elif [ "$part" = jaxpeer ]; then  # jax's paged kernel over a wide grid of its parameters, at the shapes nearest 1.5x
  timeout 560 python3 benchmarks/tune_jax_peer.py --out "$out/tune_jax_peer.json" --heads 32/8/64 9/3/64 32/8/128 \
    --shapes 8x8192 32x2048 128x512 2> "$out/tune_jax_peer.err" | tee "$out/tune_jax_peer.txt"
elif [ "$part" = smollm2 ]; then  # generation with the embedded model's shape (random weights), kernels on, then off
  for kernel in 1 0; do
    JAXPAGED_KERNELS=$kernel timeout 280 python3 benchmarks/generate.py --preset smollm2-135m-random --dtype bfloat16 \
      --batch-sizes 1 32 128 --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/generate_smollm2_kernel$kernel.json" \
      $([ $kernel = 1 ] && echo --plot "$out/generate_smollm2.png") 2>&1 | grep -v "it/s]" \
      | tee "$out/generate_smollm2_kernel$kernel.txt"
  done
elif [ "$part" = prefill_tiles ]; then  # the prefill kernel's tiles: 64-row (one warpgroup) tiles among them
  timeout 400 python3 benchmarks/tune_kernels.py --part prefill --out "$out/tune_prefill_tiles.json" 2>&1 \
    | grep -v Deprecation | tee "$out/tune_prefill_tiles.txt"
elif [ "$part" = prefill_rows ]; then  # kernel tests; the prefill kernel against the file before at three head shapes
  [ -f benchmarks/kernel_before.py ] || { echo "benchmarks/kernel_before.py: git show REV:jaxpaged/kernels/triton_decode.py > it"; exit 1; }
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  for heads in 32/8/128 32/8/64 9/3/64; do
    timeout 100 python3 benchmarks/tune_kernels.py --part prefill --heads $heads --previous kernel_before \
      --prefill-configs default light_first --out "$out/tune_prefill_rows_${heads//\//_}.json" 2>&1 \
      | grep -v Deprecation | tee -a "$out/tune_prefill_rows.txt"
  done
  timeout 200 python3 benchmarks/attention.py --only prefill --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/prefill.txt"
elif [ "$part" = prefill_splits ]; then  # kernel tests; chunks on a long cached prefix in 1-8 splits, then prefill
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  for heads in 9/3/64 32/8/128; do
    timeout 120 python3 benchmarks/tune_kernels.py --part prefill --heads $heads --prefill-configs default splits1 \
      splits2 splits4 splits8 --prefill-shapes 1x7168+1024 1x3584+512 8x1536+512 1x0+8192 \
      --out "$out/tune_prefill_splits_${heads//\//_}.json" 2>&1 | grep -v Deprecation | tee -a "$out/tune_prefill_splits.txt"
  done
  timeout 200 python3 benchmarks/attention.py --only prefill --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/prefill.txt"
elif [ "$part" = ncu_prefill ]; then  # hardware counters of one call each: ours, jax's Pallas kernel, torch
  sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats --section InstructionStats \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*cycles_active\.avg\.pct_of_peak_sustained_active"
  for heads in 32/8/128 9/3/64; do
    XLA_PYTHON_CLIENT_MEM_FRACTION=.5 timeout 200 ncu --clock-control none --kernel-name regex:"jaxpaged|mha|flash|fmha|sdpa" \
      $sections python3 benchmarks/profile_kernel.py --part prefill --heads $heads --batch 8 --context 2048 --calls 1 \
      --torch > "$out/ncu_prefill_${heads//\//_}.txt" 2>&1
    grep -E "^  [a-zA-Z_]|Duration|Compute .SM. Th|DRAM Th|Registers Per|Achieved Occ|Issued Warp|No Eligible|Executed Ipc A|tensor" \
      "$out/ncu_prefill_${heads//\//_}.txt" | cut -c1-110 | head -n 60
  done
elif [ "$part" = prefill_ab ]; then  # the prefill kernel against the file before it, in one run
  [ -f benchmarks/kernel_before.py ] || { echo "benchmarks/kernel_before.py: git show REV:jaxpaged/kernels/triton_decode.py > it"; exit 1; }
  for heads in 32/8/128 32/8/64 9/3/64; do
    timeout 150 python3 benchmarks/tune_kernels.py --part prefill --heads $heads --previous kernel_before \
      --prefill-configs default --prefill-shapes 8x0+2048 1x0+8192 8x1536+512 1x7168+1024 \
      --out "$out/tune_prefill_ab_${heads//\//_}.json" 2>&1 | grep -v Deprecation | tee -a "$out/tune_prefill_ab.txt"
  done
elif [ "$part" = ncu_sass ]; then  # per-instruction counters: which instructions of each loop stall, and on what
  XLA_PYTHON_CLIENT_MEM_FRACTION=.5 timeout 300 ncu --clock-control none --kernel-name regex:"jaxpaged|mha" \
    --section SourceCounters --section WarpStateStats --section InstructionStats -f -o /tmp/prefill_sass \
    python3 benchmarks/profile_kernel.py --part prefill --heads 32/8/128 --batch 8 --context 2048 --calls 1 2>&1 | tail -n 5
  for kernel in jaxpaged mha; do
    ncu -i /tmp/prefill_sass.ncu-rep --kernel-name regex:$kernel --page source --print-source sass --csv \
      > "$out/sass_${kernel}.csv" 2> "$out/sass_${kernel}.err"
    wc -l "$out/sass_${kernel}.csv"; head -c 600 "$out/sass_${kernel}.csv"; echo
  done
elif [ "$part" = packed ]; then  # kv heads packed into one decode program: fewer, longer programs
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "pack or random" 2>&1 \
    | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 220 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/64 --out "$out/packed_32_8_64.json" \
    --shapes 128x512 128x2048 128x8192 32x512 32x2048 32x8192 --variants default \
    --options '{"heads_per_program": 2, "transposed": true}' --options '{"heads_per_program": 2, "transposed": false}' \
    --options '{"heads_per_program": 2, "transposed": true, "blocks_per_step": 4}' \
    --options '{"heads_per_program": 4, "transposed": true}' \
    --options '{"heads_per_program": 4, "transposed": true, "blocks_per_step": 2}' 2>&1 | grep -v Deprecation \
    | tee "$out/packed_32_8_64.txt"
  timeout 170 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/128 --out "$out/packed_32_8_128.json" \
    --shapes 128x512 128x2048 128x8192 32x2048 32x8192 --variants default --options '{"heads_per_program": 2}' \
    --options '{"heads_per_program": 2, "blocks_per_step": 1}' --options '{"heads_per_program": 4}' 2>&1 \
    | grep -v Deprecation | tee "$out/packed_32_8_128.txt"
elif [ "$part" = packed2 ]; then  # the same where programs are many and short: a model's decode at batch 64-256
  untransposed='"transposed": false'
  timeout 300 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/64 --out "$out/packed2_32_8_64.json" \
    --shapes 128x128 128x256 128x512 256x256 256x512 64x512 64x2048 --variants default \
    --options "{\"heads_per_program\": 2, $untransposed}" --options "{\"heads_per_program\": 2, $untransposed, \"blocks_per_step\": 4}" \
    --options "{\"heads_per_program\": 4, $untransposed}" --options "{\"heads_per_program\": 4, $untransposed, \"blocks_per_step\": 2}" \
    --options "{\"heads_per_program\": 8, $untransposed}" --options '{"heads_per_program": 2, "transposed": true}' 2>&1 \
    | grep -v Deprecation | tee "$out/packed2_32_8_64.txt"
  timeout 200 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/128 --out "$out/packed2_32_8_128.json" \
    --shapes 128x256 128x512 256x512 64x512 --variants default --options '{"heads_per_program": 2}' \
    --options '{"heads_per_program": 4}' --options "{\"heads_per_program\": 2, $untransposed}" \
    --options "{\"heads_per_program\": 4, $untransposed}" 2>&1 | grep -v Deprecation | tee "$out/packed2_32_8_128.txt"
elif [ "$part" = packed_ab ]; then  # the packing default against the kernel file before it, in one run
  [ -f benchmarks/kernel_before.py ] || { echo "benchmarks/kernel_before.py: git show REV:jaxpaged/kernels/triton_decode.py > it"; exit 1; }
  timeout 230 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 130 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/64 --previous kernel_before --variants default \
    --shapes 128x128 128x256 128x512 256x256 64x512 32x512 128x2048 --out "$out/packed_ab_32_8_64.json" 2>&1 \
    | grep -v Deprecation | tee "$out/packed_ab.txt"
  timeout 90 python3 benchmarks/tune_kernels.py --part decode --heads 32/8/128 --previous kernel_before --variants default \
    --shapes 128x256 128x512 64x512 128x2048 --out "$out/packed_ab_32_8_128.json" 2>&1 | grep -v Deprecation \
    | tee -a "$out/packed_ab.txt"
  timeout 150 python3 benchmarks/attention.py --only decode --heads 32/8/64 32/8/128 --shapes 128x512 --tag _packed \
    --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/attention_packed.txt"
elif [ "$part" = decode_tables ]; then  # decode attention at every size, 32/8/128 heads (decode_tables64: 32/8/64)
  timeout 450 python3 benchmarks/attention.py --only decode --heads 32/8/128 --out-dir "$out" 2>&1 | grep -v Deprecation \
    | tee "$out/attention.txt"
elif [ "$part" = decode_tables64 ]; then
  timeout 450 python3 benchmarks/attention.py --only decode --heads 32/8/64 --all-sizes --tag _d64 --out-dir "$out" 2>&1 \
    | grep -v Deprecation | tee "$out/attention_d64.txt"
elif [ "$part" = linear_ab ]; then  # one-row projections as before, and as two rows
  [ -f benchmarks/llama_before.py ] || { echo "benchmarks/llama_before.py: git show REV:models/llama.py > it"; exit 1; }
  python3 - <<'PY' 2>&1 | tee "$out/linear_hlo.txt"
import jax, jax.numpy as jnp
w = jnp.ones((2048, 2048), jnp.bfloat16)
for rows in (1, 2):
    text = jax.jit(lambda x, w: x @ w).lower(jnp.ones((rows, 2048), jnp.bfloat16), w).compile().as_text()
    entry = text[text.index("ENTRY"):]
    print(f"[{rows}, 2048] x [2048, 2048] bf16, optimized HLO, entry computation:")
    print("\n".join("  " + line.strip()[:160] for line in entry.splitlines()[1:] if "=" in line))
PY
  before=$(mktemp -d) && cp -r jaxpaged models "$before/" && cp benchmarks/llama_before.py "$before/models/llama.py"
  for preset in llama-1b smollm2-135m-random; do
    for version in before current; do
      root=$([ $version = before ] && echo "$before" || echo .)
      PYTHONPATH=$root:benchmarks timeout 150 python3 benchmarks/generate.py --preset $preset --dtype bfloat16 \
        --random-weights --batch-sizes 1 --prompt-len 128 --new-tokens 128 --repeats 3 \
        --out "$out/linear_ab_${preset}_$version.json" 2>&1 | grep -v "it/s]" | tee "$out/linear_ab_${preset}_$version.txt"
    done
  done
elif [ "$part" = generate_ab ]; then  # generation with the kernel file before and the current one, one call
  [ -f benchmarks/kernel_before.py ] || { echo "benchmarks/kernel_before.py: git show REV:jaxpaged/kernels/triton_decode.py > it"; exit 1; }
  before=$(mktemp -d) && cp -r jaxpaged models "$before/" && cp benchmarks/kernel_before.py "$before/jaxpaged/kernels/triton_decode.py"
  for version in before current; do
    root=$([ $version = before ] && echo "$before" || echo .)
    PYTHONPATH=$root:benchmarks timeout 270 python3 benchmarks/generate.py --preset llama-1b --dtype bfloat16 --random-weights \
      --batch-sizes 128 --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/generate_ab_$version.json" 2>&1 \
      | grep -v "it/s]" | tee "$out/generate_ab_$version.txt"
  done
elif [ "$part" = prefill ]; then
  timeout 500 python3 benchmarks/attention.py --only prefill --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/prefill.txt"
elif [ "$part" = heads64 ]; then
  timeout 540 python3 benchmarks/attention.py --only decode --heads 32/8/64 9/3/64 --all-sizes --tag _d64 \
    --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/attention_d64.txt"
else
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "not random" 2>&1 | tail -n 15 | tee "$out/pytest_gpu.txt"
  timeout 150 python3 benchmarks/attention.py --only prefill --out-dir "$out" 2>&1 | grep -v Deprecation | tee "$out/prefill.txt"
  for kernel in 1 0; do
    JAXPAGED_KERNELS=$kernel python3 benchmarks/generate.py --preset llama-1b --dtype bfloat16 --random-weights \
      --batch-sizes 1 32 128 --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/generate_kernel$kernel.json" \
      $([ $kernel = 1 ] && echo --plot "$out/generate_llama-1b.png") 2>&1 | grep -v "it/s]" | tee "$out/generate_kernel$kernel.txt"
  done
fi

"""Run jaxpaged's kernels and their peers a few times each on one shape, for a profiler to read.

Meant to run under Nsight Compute on the GPU, e.g.
  ncu --clock-control none --kernel-name regex:"jaxpaged|mha|flash|fmha" --section SpeedOfLight \\
      --section WarpStateStats python benchmarks/profile_kernel.py --part prefill --batch 8 --context 2048
Decode: the kernel variants named by --variants and, with --torch, torch SDPA on a contiguous copy.
Prefill (a whole causal prompt of --context tokens): jaxpaged's prefill kernel, jax's Pallas flash
attention (Triton lowering, the best tile of the prefill benchmark) on the same q, K and V, and with
--torch torch SDPA. Each runs `--calls` times after it compiles; nothing is timed here.

With `--device-time` it instead prints each decode variant's device time per call
(`timing.device_time`) and the kernels that make it up. With `--sass-summary CSV ...` (Nsight Compute's
source page: `ncu -i REPORT --page source --print-source sass --csv`) it reads no GPU: it prints each
kernel's runs of instructions executed equally often (the prologue, each loop body, the epilogue),
with their instruction counts, executions and stall samples.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention import gather_blocks, make_inputs
from jaxpaged.kernels.decode import paged_decode_attention
from jaxpaged.kernels.prefill import paged_prefill_attention
from timing import device_time
from tune_kernels import _jax_mha, prefill_inputs

VARIANTS = {"default": {}, "block_gather": {"row_gather": False}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--heads", default="32/8/128", help="query heads/kv heads/head dim")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="decode variants (names in VARIANTS)")
    parser.add_argument("--torch", action="store_true", help="also run torch SDPA on a contiguous copy")
    parser.add_argument("--device-time", action="store_true", help="print each decode variant's device time per call and its kernels")
    parser.add_argument("--sass-summary", nargs="+", metavar="CSV", help="summarise Nsight Compute source-page CSVs instead")
    args = parser.parse_args()
    if args.sass_summary:
        for path in args.sass_summary:
            sass_summary(path)
        return
    heads, kv_heads, head_dim = (int(x) for x in args.heads.split("/"))
    if args.part == "prefill":
        run_prefill(args, heads, kv_heads, head_dim)
        return
    s = make_inputs(np.random.default_rng(0), args.batch, args.context, heads, kv_heads, head_dim, 16, 1)[0]
    decode_args = (s["q"], s["pool_k"], s["pool_v"], s["layer"], s["tables"], s["lengths"])
    for name in args.variants:
        fn = functools.partial(paged_decode_attention, **VARIANTS[name])
        if args.device_time:
            trace_calls(fn, decode_args, name)
        else:
            repeat(name, fn, decode_args, args.calls)
    if args.torch:
        dense = [gather_blocks(s[p], s["tables"]) for p in ("pool_k", "pool_v")]
        run_torch(s["q"][:, None], *dense, args.calls, causal=False)


def run_prefill(args, heads, kv_heads, head_dim):
    q, k, v, kernel_args = prefill_inputs(args.batch, 0, args.context, heads, kv_heads, head_dim)
    repeat("jaxpaged_prefill", paged_prefill_attention, kernel_args, args.calls)
    group = heads // kv_heads
    repeated = (q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2))
    mha = jax.jit(functools.partial(_jax_mha, block_q=64, block_k=64, num_warps=4, num_stages=3))
    repeat("jax_mha", mha, repeated, args.calls)
    if args.torch:
        run_torch(q, k, v, args.calls, causal=True)


def repeat(name, fn, fn_args, calls):
    for _ in range(calls):
        jax.block_until_ready(fn(*fn_args))
    print("ran", name, flush=True)


def run_torch(q, k, v, calls, causal):
    """torch SDPA (cuDNN or flash) on q [B, T, H, D], K and V [B, S, K, D], as [B, heads, tokens, D]."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.from_dlpack(x).transpose(1, 2).contiguous() for x in (q, k, v))
    for _ in range(calls):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=causal)
    torch.cuda.synchronize()
    print("ran torch_sdpa", flush=True)


def sass_summary(path, share=0.01):
    """Print the runs of consecutive SASS instructions of one kernel that executed equally often (within
    2%) and hold >= `share` of its executed instructions or 500 stall samples: instructions per run,
    warp-level executions of each, the run's total, its stall samples and its commonest opcodes."""
    with open(path) as f:
        rows = list(csv.reader(f))
    kernel, header, data = rows[0][1], rows[1], rows[2:]
    samples, executed = header.index("Warp Stall Sampling (All Samples)"), header.index("Instructions Executed")
    runs = []
    for row in data:
        count = float(row[executed] or 0)
        if runs and abs(count - runs[-1]["each"]) <= 0.02 * max(count, 1):
            run = runs[-1]
        else:
            run = {"start": row[0], "each": count, "instructions": 0, "samples": 0.0, "ops": collections.Counter()}
            runs.append(run)
        run["instructions"] += 1
        run["samples"] += float(row[samples] or 0)
        run["ops"][row[1].split()[1 if row[1].startswith("@") else 0].split(".")[0]] += 1
    total = sum(r["each"] * r["instructions"] for r in runs)
    print(f"{kernel}: {total / 1e6:.1f} M warp instructions, {sum(r['samples'] for r in runs):.0f} stall samples")
    for r in runs:
        if r["each"] * r["instructions"] >= share * total or r["samples"] >= 500:
            ops = " ".join(f"{op} {n}" for op, n in r["ops"].most_common(8))
            print(f"  {r['instructions']:5d} instructions x {r['each']:9.0f} = {r['each'] * r['instructions'] / 1e6:6.1f} M, "
                  f"{r['samples']:7.0f} samples  ({ops})")


def trace_calls(fn, fn_args, name, calls=20):
    seconds, kernels = device_time(fn, [fn_args], calls)
    print(f"{name}: {seconds * 1e6:.1f} us of device time per call")
    for kernel, us in sorted(kernels.items(), key=lambda item: -item[1])[:8]:
        print(f"  {us:9.1f} us  {kernel[:100]}")


if __name__ == "__main__":
    main()

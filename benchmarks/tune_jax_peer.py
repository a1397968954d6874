"""How fair is the peer's tuning? jax's Pallas paged kernel (`jax.experimental.pallas.ops.gpu.paged_attention`)
over a wide grid of its launch parameters, against the four settings that benchmarks/attention.py
tried per shape until this comparison (EARLIER_SETTINGS), with jaxpaged's defaults timed on the same
inputs in the same run.

The grid: pages per compute block 4, 8, 16, 32 x k splits 1, 2, 4, 8, 16 (where they divide the
block-table width) with 8 warps and 2 stages (the kernel's defaults); then, from the best of those,
4 warps, 3 stages, and both. (benchmarks/attention.py now tunes over the same grid:
`attention.tune_jax_paged`.) Device time per call (`timing.seconds_per_call`) over enough input
copies to miss the L2 cache; bfloat16, block size 16, every sequence at the full context.

Run: python benchmarks/tune_jax_peer.py --out FILE [--heads 32/8/64 ...] [--shapes 8x8192 32x2048 ...] [--interpret]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from attention import JAX_K_SPLITS, JAX_PAGES_PER_BLOCK, L2_BYTES, make_inputs
from jaxpaged.kernels.decode import paged_decode_attention
from timing import seconds_per_call

EARLIER_SETTINGS = ((8, 1), (8, 8), (16, 1), (16, 8))  # (pages per compute block, k splits), 8 warps, 2 stages


def setting_name(ppcb, splits, warps=8, stages=2):
    return f"ppcb{ppcb}_k{splits}_w{warps}_s{stages}"


def sweep(rng, heads, kv_heads, head_dim, batch, context, block_size=16, interpret=False):
    """{setting: GB/s} of jax's kernel at one shape, and ours (key "jaxpaged") on the same inputs."""
    kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
    copies = max(1, min(8, math.ceil(2 * L2_BYTES / kv_bytes)))
    sets = make_inputs(rng, batch, context, heads, kv_heads, head_dim, block_size, copies)
    blocks_per_seq = context // block_size
    ours = [(s["q"], s["pool_k"], s["pool_v"], s["layer"], s["tables"], s["lengths"]) for s in sets]
    attend = functools.partial(paged_decode_attention, interpret=interpret)
    reference = np.asarray(attend(*ours[0]), np.float32)
    # jax's kernel applies no 1/sqrt(D): q is scaled outside the timed call; its pages are our layer 0
    theirs = [((s["q"].astype(jnp.float32) * head_dim**-0.5).astype(s["q"].dtype), s["pool_k"][0], s["pool_v"][0],
               s["tables"], s["lengths"]) for s in sets]
    gbps = {"jaxpaged": kv_bytes / seconds_per_call(attend, ours)[0] / 1e9}
    timed = {}  # (pages per compute block, k splits, warps, stages): GB/s

    def time_setting(ppcb, splits, warps=8, stages=2):
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        fn = functools.partial(paged_attention, pages_per_compute_block=ppcb, k_splits=splits, num_warps=warps,
                               num_stages=stages, interpret=interpret)
        try:
            out = np.asarray(fn(*theirs[0]), np.float32)
            if np.linalg.norm(out - reference) <= 2e-2 * np.linalg.norm(reference):
                timed[ppcb, splits, warps, stages] = kv_bytes / seconds_per_call(fn, theirs)[0] / 1e9
        except Exception as error:  # a setting the kernel refuses or Triton can not compile
            print(f"  {setting_name(ppcb, splits, warps, stages)}: {type(error).__name__}")

    grid = [(p, k) for p, k in itertools.product(JAX_PAGES_PER_BLOCK, JAX_K_SPLITS) if blocks_per_seq % (p * k) == 0]
    for ppcb, splits in tqdm(grid, desc=f"{heads}/{kv_heads}/{head_dim} {batch}x{context}", leave=False):
        time_setting(ppcb, splits)
    if timed:
        ppcb, splits, _, _ = max(timed, key=timed.get)
        for warps, stages in ((4, 2), (8, 3), (4, 3)):
            time_setting(ppcb, splits, warps, stages)
    gbps.update({setting_name(*setting): value for setting, value in timed.items()})
    return gbps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/tune_jax_peer.json")
    parser.add_argument("--heads", nargs="+", default=["32/8/64"], help="query heads/kv heads/head dim")
    parser.add_argument("--shapes", nargs="+", default=["8x8192", "32x2048", "128x512"], help="BATCHxCONTEXT")
    parser.add_argument("--interpret", action="store_true", help="both kernels in interpret mode (a CPU smoke test)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for head_shape, shape in itertools.product(args.heads, args.shapes):
        heads, kv_heads, head_dim = (int(x) for x in head_shape.split("/"))
        batch, context = (int(x) for x in shape.split("x"))
        gbps = sweep(rng, heads, kv_heads, head_dim, batch, context, interpret=args.interpret)
        jax_best = max((v for k, v in gbps.items() if k != "jaxpaged"), default=float("nan"))
        benchmark_grid = [setting_name(p, k) for p, k in EARLIER_SETTINGS]
        jax_benchmark = max((gbps[k] for k in benchmark_grid if k in gbps), default=float("nan"))
        rows.append({"heads": head_shape, "batch": batch, "context": context, "GBps": gbps,
                     "jax_best_of_grid": jax_best, "jax_best_of_benchmark_settings": jax_benchmark})
        print(f"{head_shape} {batch}x{context}: ours {gbps['jaxpaged']:.0f} GB/s; jax best of the wide grid "
              f"{jax_best:.0f} ({max((k for k in gbps if k != 'jaxpaged'), key=gbps.get, default='-')}), of the "
              f"benchmark's four {jax_benchmark:.0f}; ours / best {gbps['jaxpaged'] / jax_best:.2f}x", flush=True)
        with open(args.out, "w") as f:  # after every shape, so a run cut short keeps what it measured
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "decode": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""The decode kernel's launch on 8-bit pools: its default (`launch.QUANTIZED_DEFAULTS`) against
variants, at a few shapes, with the bfloat16 kernel beside, in one run.

Variants: the pipeline stages (3 to 7), the positions a loop step (32 or 128 instead of 64), 8 warps,
and the products' operands: int8 pools take int8 products by default (q and the weights quantised
per row), "bf16 tiles"/"f16 tiles" convert the 8-bit tiles instead; float8 pools take float16
tiles by default, "bf16 tiles" the other. Time: the median of 5 rounds of a jitted loop of 20
dependent calls; bandwidth counts the bytes read (values and scales).

Run: python benchmarks/tune_kv_quant.py --out tune_kv_quant.json
     python benchmarks/tune_kv_quant.py --kv-dtypes int8 --variants default "stages 6"   # a few alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np
from tqdm import tqdm

from jaxpaged.kernels import launch, paged_decode_attention
from jaxpaged.quant import quantise, v_blocks
from attention import make_inputs
from timing import median_time_in_loop

SHAPES = [(8, 8192, 32, 8, 128), (128, 8192, 32, 8, 128), (32, 2048, 32, 8, 64), (128, 8192, 32, 8, 64),
          (32, 4096, 32, 8, 128)]
BLOCK_SIZE = 16


def variants(max_blocks: int, kv_dtype: str) -> dict:
    """{name: kernel options} to try on 8-bit pools ("default": the kernel's own launch)."""
    found = {"default": {}, **{f"stages {n}": {"num_stages": n} for n in (3, 4, 6, 7)},
             "32 positions": {"blocks_per_step": 32 // BLOCK_SIZE}, "128 positions": {"blocks_per_step": 128 // BLOCK_SIZE},
             "8 warps": {"num_warps": 8}, "bf16 tiles": {"dot_dtype": "bfloat16"}}
    if kv_dtype == "int8":
        found["f16 tiles"] = {"dot_dtype": "float16"}
    return {name: options for name, options in found.items() if max_blocks % options.get("blocks_per_step", 1) == 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tune_kv_quant.json")
    parser.add_argument("--kv-dtypes", nargs="+", default=["int8", "float8_e4m3fn"], choices=("int8", "float8_e4m3fn"))
    parser.add_argument("--variants", nargs="+", default=None, help='only these variants (e.g. default "stages 6")')
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for batch, context, heads, kv_heads, head_dim in tqdm(SHAPES, desc="shapes"):
        sets = make_inputs(rng, batch, context, heads, kv_heads, head_dim, BLOCK_SIZE, 2)
        max_blocks = context // BLOCK_SIZE
        plan = launch.decode_launch(batch, heads, kv_heads, head_dim, BLOCK_SIZE, max_blocks, 2, launch.this_gpu())
        positions = batch * context * kv_heads
        row = {"batch": batch, "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
               "bf16_plan": dataclasses.asdict(plan), "GBps": {}, "speedup": {}}
        bf16 = [(x["q"], x["pool_k"], x["pool_v"], x["layer"], x["tables"], x["lengths"]) for x in sets]
        base = median_time_in_loop(paged_decode_attention, bf16)
        row["GBps"]["bfloat16"] = 2 * positions * head_dim * 2 / base / 1e9
        for kv_dtype in args.kv_dtypes:
            quant = [(x["q"], *quantise(x["pool_k"], kv_dtype), *quantise(x["pool_v"], kv_dtype), x["layer"],
                      x["tables"], x["lengths"]) for x in sets]
            quant = [(q, k, ks, v_blocks(v), *rest) for q, k, ks, v, *rest in quant]  # V's blocks as a cache holds them
            for name, options in variants(max_blocks, kv_dtype).items():
                if args.variants and name not in args.variants:
                    continue
                def fn(q, k, ks, v, vs, layer, tables, lengths, options=options):
                    return paged_decode_attention(q, k, v, layer, tables, lengths, k_scale=ks, v_scale=vs, **options)
                try:
                    seconds = median_time_in_loop(fn, quant)
                except Exception as failure:  # a launch Triton can not compile (shared memory, registers)
                    print(f"  {kv_dtype} {name}: {type(failure).__name__}: {str(failure)[:160]}")
                    continue
                row["GBps"][f"{kv_dtype} {name}"] = 2 * positions * (head_dim + 2) / seconds / 1e9
                row["speedup"][f"{kv_dtype} {name}"] = base / seconds
        rows.append(row)
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "method": __doc__, "rows": rows}, f, indent=1, default=str)
    names = sorted({n for r in rows for n in r["speedup"]})
    print(f"\nspeed-up over the bfloat16 kernel on {jax.devices()[0].device_kind} (8-bit GB/s in brackets)")
    for r in rows:
        print(f"{r['batch']}x{r['context']} {r['heads']}/{r['kv_heads']}/{r['head_dim']} bf16 {r['GBps']['bfloat16']:.0f} GB/s")
        for n in names:
            if n in r["speedup"]:
                print(f"   {n:32} x{r['speedup'][n]:.2f} ({r['GBps'][n]:.0f})")


if __name__ == "__main__":
    main()

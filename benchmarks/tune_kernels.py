"""Sweep the decode kernel's launch parameters on a few shapes (GPU): blocks per step, warps, pipeline stages, splits.

Prints GB/s per configuration (K and V bytes over the median time, timed inside one jitted loop)
and writes the table as JSON. Run: python benchmarks/tune_decode.py --out FILE
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import numpy as np

from attention import make_inputs
from jaxpaged.kernels.triton_decode import paged_decode_attention
from timing import median_time_in_loop

SHAPES = [(32, 2048), (128, 2048), (8, 8192), (128, 8192)]  # (batch, context), 32/8 heads, head dim 128


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/tune_decode.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for batch, context in SHAPES:
        sets = make_inputs(rng, batch, context, 32, 8, 128, 16, 1)
        kv_bytes = 2 * batch * context * 8 * 128 * 2
        arg_sets = [(s["q"], s["pool_k"], s["pool_v"], 0, s["tables"], s["lengths"]) for s in sets]
        for bps, warps, stages, splits in itertools.product((4, 8, 16), (4, 8), (1, 2, 3, 4), (None, 4)):
            fn = functools.partial(paged_decode_attention, num_layers=1, blocks_per_step=bps, num_warps=warps,
                                   num_stages=stages, num_splits=splits)
            try:
                seconds = median_time_in_loop(fn, arg_sets, rounds=3)
            except Exception as error:  # a configuration Triton cannot compile
                print(f"B{batch} S{context} bps={bps} warps={warps} stages={stages} splits={splits}: {type(error).__name__}")
                continue
            rows.append(dict(batch=batch, context=context, blocks_per_step=bps, num_warps=warps, num_stages=stages,
                             num_splits=splits, seconds=seconds, GBps=kv_bytes / seconds / 1e9))
        best = sorted((r for r in rows if (r["batch"], r["context"]) == (batch, context)), key=lambda r: r["seconds"])[:5]
        print(f"B{batch} S{context}: " + "; ".join(
            f"bps={r['blocks_per_step']} w={r['num_warps']} st={r['num_stages']} sp={r['num_splits']}: {r['GBps']:.0f}"
            for r in best))
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Time the decode kernel's split merge (`merge.merge_decode_splits`) alone, over its warps, on the GPU.

For each decode shape that splits, random partial results of the kernel's shape ([B, K, S', rows, D]
float32 o, [B, K, S', rows] running max and sum) are merged with 1 to 16 warps per program; device
time per call (`timing.device_time`), checked against the default warps' output.

Run: python benchmarks/tune_merge.py --out FILE   (GPU only)
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.kernels import launch, merge
from timing import device_time

SHAPES = [(1, 8, 32, 128, 2048), (1, 8, 32, 128, 8192), (1, 8, 32, 64, 8192), (1, 3, 9, 64, 8192),
          (8, 3, 9, 64, 8192), (8, 8, 32, 128, 8192)]  # (batch, kv heads, query heads, head dim, context)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/tune_merge.json")
    args = parser.parse_args()
    rows = []
    for batch, kv_heads, heads, head_dim, context in SHAPES:
        steps = context // 64
        splits = launch.default_splits(batch * kv_heads, steps, launch.this_gpu().sm_count)
        padded = 1 << (splits - 1).bit_length()
        keys = jax.random.split(jax.random.key(splits), 3)
        o = jax.random.normal(keys[0], (batch, kv_heads, padded, 16, head_dim), jnp.float32)
        m = jax.random.normal(keys[1], (batch, kv_heads, padded, 16), jnp.float32)
        l = jax.random.uniform(keys[2], (batch, kv_heads, padded, 16), jnp.float32) + 1.0
        merge_splits = functools.partial(merge.merge_decode_splits, splits=splits, group=heads // kv_heads,
                                  num_heads=heads, dtype=jnp.bfloat16, interpret=False)
        reference = np.asarray(jax.jit(merge_splits)(o, m, l), np.float32)
        result = {"batch": batch, "kv_heads": kv_heads, "heads": heads, "head_dim": head_dim, "context": context,
                  "splits": splits, "default_warps": merge.merge_warps(padded, head_dim), "us": {}}
        for warps in (1, 2, 4, 8, 16):
            fn = jax.jit(functools.partial(merge_splits, num_warps=warps))
            np.testing.assert_allclose(np.asarray(fn(o, m, l), np.float32), reference, rtol=1e-2, atol=1e-2)
            result["us"][warps] = device_time(fn, [(o, m, l)])[0] * 1e6
        rows.append(result)
        print(f"B{batch} K{kv_heads} H{heads} D{head_dim} S{context} splits {splits} (default {result['default_warps']} warps): "
              + "  ".join(f"{w} warps {us:.2f} us" for w, us in result["us"].items()), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "merge": rows}, f, indent=2)


if __name__ == "__main__":
    main()

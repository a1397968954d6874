"""What 64-bit offsets cost the kernels: decode and prefill attention over the same K/V held in a pool
of fewer than 2^31 elements (32-bit offsets) and in one of more (Pallas's Triton lowering then offsets
in 64 bits), the blocks moved to the far end of the large pool. The two outputs must be equal bit for
bit; the times are medians of a jitted loop of 20 calls.

Run (GPU): python benchmarks/pool_offsets.py --out OUT/pool_offsets_H200.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.kernels.decode import paged_decode_attention
from jaxpaged.kernels.prefill import paged_prefill_attention
from timing import median_time_in_loop

BLOCK_SIZE, HEAD_DIM, KV_HEADS = 16, 128, 8
LARGE_BLOCKS = 2**31 // (KV_HEADS * BLOCK_SIZE * HEAD_DIM) + 1024  # one layer: past 2^31 elements


def pools(batch: int, context: int, key):
    """K and V of `batch` sequences of `context` positions in a pool just their size and in one past
    2^31 elements (their blocks at its end), with the two block tables [B, M]."""
    blocks = batch * context // BLOCK_SIZE
    k, v = (jax.random.normal(k, (1, KV_HEADS, blocks, BLOCK_SIZE, HEAD_DIM), jnp.bfloat16)
            for k in jax.random.split(key))
    table = jax.random.permutation(key, blocks).astype(jnp.int32).reshape(batch, -1)
    offset = LARGE_BLOCKS - blocks
    large = [jnp.zeros((1, KV_HEADS, LARGE_BLOCKS, BLOCK_SIZE, HEAD_DIM), jnp.bfloat16).at[:, :, offset:].set(x)
             for x in (k, v)]
    return (k, v, table), (*large, table + offset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["32x2048", "128x4096"], help="BATCHxCONTEXT (decode)")
    parser.add_argument("--heads", nargs="+", type=int, default=[32, 16], help="query heads (8 kv heads, D 128)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        batch, context = map(int, shape.split("x"))
        small, large = pools(batch, context, jax.random.key(batch + context))
        lengths = jnp.full((batch,), context, jnp.int32)
        for heads in args.heads:
            q = jax.random.normal(jax.random.key(heads), (batch, heads, HEAD_DIM), jnp.bfloat16)
            chunk = jax.random.normal(jax.random.key(heads), (batch, 64, heads, HEAD_DIM), jnp.bfloat16)
            positions = jnp.broadcast_to(jnp.arange(context - 64, context, dtype=jnp.int32), (batch, 64))
            calls = {"decode": lambda q, k, v, t: paged_decode_attention(q, k, v, 0, t, lengths),
                     "prefill 64": lambda q, k, v, t: paged_prefill_attention(q, k, v, 0, t, lengths, positions)}
            for kind, call in calls.items():
                query = q if kind == "decode" else chunk
                fn = jax.jit(call)
                outs = [np.asarray(fn(query, *pool)) for pool in (small, large)]
                times = [median_time_in_loop(call, [(query, *pool)]) for pool in (small, large)]
                rows.append({"kernel": kind, "batch": batch, "context": context, "heads": f"{heads}/{KV_HEADS}/{HEAD_DIM}",
                             "us_32_bit": times[0] * 1e6, "us_64_bit": times[1] * 1e6,
                             "ratio": times[1] / times[0], "bit_equal": bool(np.array_equal(outs[0], outs[1]))})
                print(rows[-1], flush=True)
        del small, large
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "large_pool_elements": LARGE_BLOCKS * KV_HEADS * BLOCK_SIZE * HEAD_DIM, "rows": rows}, f, indent=1)
    print(f"\n{'kernel':10} {'shape':>10} {'heads':>10} {'32-bit µs':>10} {'64-bit µs':>10} {'64/32':>6} equal")
    for r in rows:
        print(f"{r['kernel']:10} {r['batch']}x{r['context']:>6} {r['heads']:>10} {r['us_32_bit']:10.1f} "
              f"{r['us_64_bit']:10.1f} {r['ratio']:6.3f} {r['bit_equal']}")


if __name__ == "__main__":
    main()

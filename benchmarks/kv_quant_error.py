"""Round-trip error of 8-bit K/V storage by scale granularity: one scale per position and kv head
(what jaxpaged stores) against one scale per block and kv head.

Each scheme quantises random K/V laid out as the pools hold it ([N blocks, P positions, K heads,
D]) and dequantises it back; the errors are measured against the float32 input:
- per_token: one float16 scale per position and kv head (`jaxpaged.quant`), fixed when written;
- per_block_whole: one float32 scale per block and kv head over the whole block, written at once (a
  prefill that fills whole blocks; the best a per-block scale can do);
- per_block_filled: the same scale, but the block filled one position at a time (decode): the scale
  is the running max, and when a new position raises it the block's earlier values are re-quantised
  with the new scale (dequantised with the old, quantised again: rounded twice).
Data: standard normal; with outlier channels (2 of D channels x20, as keys often have); with
outlier tokens (2% of positions x30, as attention sinks); with outlier elements (0.1% x50).
Metrics: max abs error; relative RMS error (||err|| / ||x|| over everything); the worst position's
relative error (max over positions and heads of ||err|| / ||x|| over D), which is where a shared
scale hurts a small position beside a large one; and the bytes per position and kv head.

Run: python benchmarks/kv_quant_error.py [--out benchmarks/results/kv_quant_error_CPU.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.config import SCALE_ITEMSIZE
from jaxpaged.quant import QUANTIZED_DTYPES, dequantise, quantise


def make_data(kind: str, key, blocks: int, block_size: int, heads: int, head_dim: int) -> jax.Array:
    """Random K/V [N, P, K, D] float32 of one kind (see the module docstring)."""
    keys = jax.random.split(key, 3)
    x = jax.random.normal(keys[0], (blocks, block_size, heads, head_dim), jnp.float32)
    if kind == "outlier_channels":
        x = x.at[..., :2].multiply(20.0)
    elif kind == "outlier_tokens":
        chosen = jax.random.bernoulli(keys[1], 0.02, (blocks, block_size, 1, 1))
        x = jnp.where(chosen, 30.0 * x, x)
    elif kind == "outlier_elements":
        chosen = jax.random.bernoulli(keys[1], 0.001, x.shape)
        x = jnp.where(chosen, 50.0 * x, x)
    return x


def _quantise_with(x: jax.Array, scale: jax.Array, kv_dtype: str) -> jax.Array:
    """x [..., D] quantised with a given scale [...]; as jaxpaged.quant.quantise does with its own."""
    largest = QUANTIZED_DTYPES[kv_dtype]
    scaled = jnp.clip(x / jnp.where(scale > 0, scale, 1.0)[..., None], -largest, largest)
    if kv_dtype == "int8":
        scaled = jnp.round(scaled)
    return scaled.astype(jnp.dtype(kv_dtype))


def per_token(x, kv_dtype):
    values, scale = quantise(x, kv_dtype)  # scale [N, P, K]
    return dequantise(values, scale, jnp.float32)


def per_block_whole(x, kv_dtype):
    scale = jnp.max(jnp.abs(x), axis=(1, 3)) / QUANTIZED_DTYPES[kv_dtype]  # [N, K]
    scale = jnp.broadcast_to(scale[:, None], x.shape[:3])
    return dequantise(_quantise_with(x, scale, kv_dtype), scale, jnp.float32)


def per_block_filled(x, kv_dtype):
    """Positions written one at a time; a raised block scale re-quantises what the block holds."""
    blocks, block_size, heads, _ = x.shape
    largest = QUANTIZED_DTYPES[kv_dtype]
    values = jnp.zeros(x.shape, jnp.dtype(kv_dtype))
    scale = jnp.zeros((blocks, heads), jnp.float32)
    for t in range(block_size):
        new_scale = jnp.maximum(scale, jnp.max(jnp.abs(x[:, t]), axis=-1) / largest)  # [N, K]
        grew = (new_scale > scale)[:, None, :, None]  # [N, 1, K, 1]
        held = dequantise(values, jnp.broadcast_to(scale[:, None], x.shape[:3]), jnp.float32)
        again = _quantise_with(held, jnp.broadcast_to(new_scale[:, None], x.shape[:3]), kv_dtype)
        values = jnp.where(grew & (jnp.arange(block_size) < t)[None, :, None, None], again, values)
        values = values.at[:, t].set(_quantise_with(x[:, t], new_scale, kv_dtype))
        scale = new_scale
    return dequantise(values, jnp.broadcast_to(scale[:, None], x.shape[:3]), jnp.float32)


SCHEMES = {"per_token": per_token, "per_block_whole": per_block_whole, "per_block_filled": per_block_filled}
KINDS = ("normal", "outlier_channels", "outlier_tokens", "outlier_elements")


def errors(x: jax.Array, y: jax.Array) -> dict:
    err = np.asarray(y - x, np.float64)
    x = np.asarray(x, np.float64)
    row_norm = np.linalg.norm(x, axis=-1)
    row_rel = np.linalg.norm(err, axis=-1) / np.where(row_norm > 0, row_norm, 1.0)
    return {"max_abs": float(np.abs(err).max()), "rel_rms": float(np.linalg.norm(err) / np.linalg.norm(x)),
            "worst_position_rel": float(row_rel.max()), "median_position_rel": float(np.median(row_rel))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=128, help="blocks of random data (default 128)")
    parser.add_argument("--block-size", type=int, default=16, help="positions per block (default 16)")
    parser.add_argument("--heads", type=int, default=4, help="kv heads (default 4)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims (default 64 128)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()

    rows = []
    for head_dim in args.head_dims:
        for kind in KINDS:
            x = make_data(kind, jax.random.key(0), args.blocks, args.block_size, args.heads, head_dim)
            for kv_dtype in QUANTIZED_DTYPES:
                for scheme, run in SCHEMES.items():
                    scale_bytes = SCALE_ITEMSIZE if scheme == "per_token" else 4 / args.block_size  # float32 a block
                    row = {"head_dim": head_dim, "data": kind, "kv_dtype": kv_dtype, "scheme": scheme,
                           "bytes_per_position_and_head": head_dim + scale_bytes, **errors(x, run(x, kv_dtype))}
                    rows.append(row)
                    print(f"D={head_dim:3d} {kind:16s} {kv_dtype:13s} {scheme:16s} max abs {row['max_abs']:.4f}  "
                          f"rel rms {row['rel_rms']:.4f}  worst position {row['worst_position_rel']:.4f}  "
                          f"median position {row['median_position_rel']:.4f}  bytes {row['bytes_per_position_and_head']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": "CPU", "machine": platform.machine(), "jax": jax.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

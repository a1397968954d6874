"""The split merges: the partial results of programs that each saw part of a sequence's positions
(flash-decoding), each an unnormalised output with its running max and sum (base 2), rescaled to
their common maximum and normalised. The decode kernel's splits are merged by a small Pallas kernel
of their own (`merge_decode_splits`, one launch); the prefill kernel's by XLA after the kernel
(`merge_prefill_splits`).

Axis letters: B sequences, H query heads, K kv heads, G = H / K, D head dim, S splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpaged.kernels.common import MASK


def merge_warps(padded_splits: int, head_dim: int) -> int:
    """Warps per program of the split merge: one up to 4,096 elements of o per program ([S', D]),
    else 64 elements per thread (at most 16 warps). On an H100 (benchmarks/tune_merge.py) one warp
    was the fastest or within 4% of it at all six shapes timed, 1.27-1.74 us; two, the first rule,
    took 2.64 us at head dim 128 with 32 splits, where one took 1.50."""
    elements = padded_splits * head_dim
    return 1 if elements <= 4096 else min(16, elements // 2048)


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, group: int, splits: int):
    """One program: query head h of sequence b; grid (B, H). Its row of kv head h // G's partial
    results, o_ref [S', rows, D] and the running max and sum m_ref, l_ref [S', rows] (S' the splits
    padded to a power of two; the padding is masked), rescaled to their common maximum and
    normalised into out_ref [D]."""
    row = pl.program_id(1) % group
    padded, _, head_dim = o_ref.shape
    real = jnp.arange(padded) < splits
    m = plgpu.load(m_ref.at[:, row], mask=real, other=MASK)
    l = plgpu.load(l_ref.at[:, row], mask=real, other=0.0)
    o = plgpu.load(o_ref.at[:, row, :], mask=jnp.broadcast_to(real[:, None], (padded, head_dim)), other=0.0)
    weight = jnp.exp2(m - m.max())  # [S'] (the maxima are in base-2 units, as `common.update` keeps them)
    total = jnp.maximum((l * weight).sum(), jnp.finfo(jnp.float32).tiny)
    out_ref[...] = ((o * weight[:, None]).sum(axis=0) / total).astype(out_ref.dtype)


def merge_decode_splits(o, m, l, *, splits: int, group: int, num_heads: int, dtype, interpret: bool,
                  num_warps: int | None = None) -> jax.Array:
    """The decode kernel's splits merged in one launch: o [B, K, S', rows, D], m and l [B, K, S', rows]
    (S' >= splits, a power of two) -> [B, H, D] in dtype. Where XLA merged them it took one to four
    fusions, 1.3-5.2 us on an H100 (BENCHMARKS.md). Merged inside the decode kernel instead (the last
    split of each sequence and kv head to finish, counted in by an atomic add, reading the others'
    partial results back), the decode kernel took 1.3-3.3 us longer, about this launch's 1.3-1.8 us
    or more, plus 0.9 us to zero the counters: 1.01-1.33x the time at all eight 9/3/64 shapes timed
    (tune_kernels_fused_merge_9_3_64_H100.json). Warps: `merge_warps`."""
    batch, kv_heads, padded, rows, head_dim = o.shape
    warps = num_warps or merge_warps(padded, head_dim)
    return pl.pallas_call(
        functools.partial(_merge_kernel, group=group, splits=splits),
        grid=(batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, None, padded, rows, head_dim), lambda b, h: (b, h // group, 0, 0, 0)),
            pl.BlockSpec((None, None, padded, rows), lambda b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, padded, rows), lambda b, h: (b, h // group, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, head_dim), lambda b, h: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="jaxpaged_merge",
    )(o, m, l)


def merge_prefill_splits(o, m, l, dtype):
    """The prefill splits' [S, B, T * H, D] unnormalised outputs, [S, B, T * H] running maxima (base 2)
    and sums, merged: [B, T * H, D] in dtype (XLA, after the kernel)."""
    weight = jnp.exp2(m - m.max(axis=0, keepdims=True))
    total = (l * weight).sum(axis=0)
    return ((o * weight[..., None]).sum(axis=0) / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]).astype(dtype)

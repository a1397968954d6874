"""Paged decode attention in Pallas, lowered through Triton: one query token per sequence, K and V
read straight from the block pools through the block table, the context split across programs
(flash-decoding) when the batch alone does not fill the GPU.

Why the Triton lowering: it runs on the jax this project supports on GPUs (0.11, where it is
deprecated but present), it is what jax's own paged kernel uses, so the comparison is like for
like, and its ref gathers (`pool_ref[block_ids]`) express a page-table read in one line. The
kernel is alone in this file so that a Mosaic GPU version can replace it.

Grid: (B, K, splits). Program (b, h, s) takes sequence b, kv head h, and the s-th slice of the
sequence's blocks; it loads its G query heads (padded to 16 rows, the smallest Triton dot) once,
then walks `blocks_per_step` blocks at a time with an online softmax. Positions at or past the
length get probability 0 and their V rows are zeroed, so an unwritten or freed slot (NaN, or
another sequence's data) can not reach the output. The splits are merged outside the kernel.

Axis letters: B sequences, H query heads, K kv heads, G = H / K, D head dim, L layers,
N blocks, P block size, M blocks per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_ROWS = 16  # Triton's smallest dot tile


def _kernel(layer_base_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            block_size: int, blocks_per_step: int, steps_per_split: int, num_blocks: int, scale: float):
    split = pl.program_id(2)
    length = lengths_ref[0]
    layer_base = layer_base_ref[0]
    rows, head_dim = q_ref.shape
    chunk = blocks_per_step * block_size
    q = q_ref[...]
    first_step = split * steps_per_split
    last_step = jnp.minimum(first_step + steps_per_split, pl.cdiv(length, chunk))

    def body(step, carry):
        o, m, l = carry
        ids = tables_ref[pl.ds(step * blocks_per_step, blocks_per_step)]
        ids = layer_base + jnp.minimum(ids, num_blocks - 1)  # the sentinel N reads a real block, then is masked
        k = k_ref[ids].reshape(chunk, head_dim)
        v = v_ref[ids].reshape(chunk, head_dim)
        positions = step * chunk + jnp.arange(chunk)
        live = positions < length
        logits = plgpu.dot(q, k.T) * scale  # [rows, chunk] float32
        logits = jnp.where(live[None, :], logits, _MASK)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        v = jnp.where(live[:, None], v, jnp.zeros_like(v))
        o = o * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return o, m_new, l * correction + p.sum(axis=-1)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(first_step, jnp.maximum(last_step, first_step), body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _num_splits(batch: int, kv_heads: int, steps: int, target_programs: int = 256) -> int:
    """About two programs per SM of a 132-SM H100, never more splits than steps (measured: see tune_decode)."""
    want = max(1, -(-target_programs // (batch * kv_heads)))
    return max(1, min(steps, want))


def default_blocks_per_step(block_size: int, max_blocks: int) -> int:
    """64 positions per loop step (the fastest in the H100 sweep), dividing the block-table width."""
    blocks = max(1, 64 // block_size)
    while max_blocks % blocks:
        blocks //= 2
    return blocks


@functools.partial(jax.jit, static_argnames=("num_layers", "layout", "blocks_per_step", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer, block_tables: jax.Array,
                           lengths: jax.Array, *, num_layers: int, layout: str = "NPKD", blocks_per_step: int | None = None,
                           num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False) -> jax.Array:
    """Attention of one query per sequence over its cached K/V, read from the pools in place.

    Args:
      q: [B, H, D].
      k_pool, v_pool: all layers' pools, either "NPKD": [L * N, P, K, D] (jaxpaged's own
        [L, N, P, K, D], reshaped for free) or "KNPD": [K, L * N, P, D] (jax's kernel's order).
      layer: [] int, the layer to read.
      block_tables: [B, M] int32 block ids; entries past a sequence's blocks may hold any id in
        [0, N] (N is the sentinel).
      lengths: [B] int32 positions to attend to (0 for padding rows, which return zeros).
      num_layers: L (static), to find layer `layer`'s blocks in the flat pool.
      blocks_per_step: blocks loaded per loop step, dividing M; default 64 positions' worth.
      num_splits: programs per sequence and kv head; default from the batch size.

    Returns:
      [B, H, D] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    if layout == "NPKD":
        total_blocks, block_size, kv_heads, _ = k_pool.shape
        pool_spec = pl.BlockSpec((total_blocks, block_size, None, head_dim), lambda b, h, s: (0, 0, h, 0))
    elif layout == "KNPD":
        kv_heads, total_blocks, block_size, _ = k_pool.shape
        pool_spec = pl.BlockSpec((None, total_blocks, block_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
    else:
        raise ValueError(f"layout must be 'NPKD' or 'KNPD', got {layout!r}")
    num_blocks = total_blocks // num_layers
    max_blocks = block_tables.shape[1]
    blocks_per_step = blocks_per_step or default_blocks_per_step(block_size, max_blocks)
    if max_blocks % blocks_per_step:
        raise ValueError(f"the block-table width {max_blocks} must be a multiple of blocks_per_step={blocks_per_step}")
    group = num_heads // kv_heads
    rows = max(_MIN_ROWS, 1 << (group - 1).bit_length())
    steps = max_blocks // blocks_per_step
    splits = num_splits or _num_splits(batch, kv_heads, steps)
    steps_per_split = -(-steps // splits)

    q = q.reshape(batch, kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # [B, K, rows, D]
    layer_base = (jnp.asarray(layer, jnp.int32) * num_blocks).reshape(1)
    kernel = functools.partial(_kernel, block_size=block_size, blocks_per_step=blocks_per_step,
                               steps_per_split=steps_per_split, num_blocks=num_blocks, scale=head_dim**-0.5)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (0,)),  # layer base
            pl.BlockSpec((1,), lambda b, h, s: (b,)),  # length
            pl.BlockSpec((None, max_blocks), lambda b, h, s: (b, 0)),  # block-table row
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),  # q
            pool_spec,
            pool_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxpaged_decode",
    )(layer_base, lengths.astype(jnp.int32), block_tables.astype(jnp.int32), q, k_pool, v_pool)

    # Merge the splits: rescale each to the common maximum, then normalise.
    m_all = m.max(axis=2, keepdims=True)  # [B, K, 1, rows]
    weight = jnp.exp(m - m_all)
    total = (l * weight).sum(axis=2)  # [B, K, rows]
    out = (o * weight[..., None]).sum(axis=2) / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)


def supported(head_dim: int, block_size: int) -> bool:
    """Whether the kernel takes this shape; the caller falls back to the reference otherwise."""
    return head_dim in (64, 128, 256) and block_size >= 8


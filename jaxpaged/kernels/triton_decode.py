"""Paged attention in Pallas, lowered through Triton, K and V read straight from the block pools
through the block table. `paged_decode_attention`: one query token per sequence, the context split
across programs (flash-decoding) when the batch alone does not fill the GPU.
`paged_prefill_attention`: T causal queries per sequence on a cached prefix, one program per block
of query rows.

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


def _attend_chunk(step, carry, q, tables_ref, k_ref, v_ref, layer_base, length, q_pos, *, block_size: int,
                  blocks_per_step: int, num_blocks: int, scale: float):
    """One loop step of both kernels: load `blocks_per_step` blocks of K/V, update the online softmax.

    q_pos: [rows] positions of the queries (causal limit), or None for decode (the length is the limit).
    Positions at or past the length get probability 0 and their V rows are zeroed, so NaN or another
    sequence's data in an unused slot can not reach the output.
    """
    o, m, l = carry
    rows, head_dim = q.shape
    chunk = blocks_per_step * block_size
    ids = tables_ref[pl.ds(step * blocks_per_step, blocks_per_step)]
    ids = layer_base + jnp.minimum(ids, num_blocks - 1)  # the sentinel N reads a real block, then is masked
    k = k_ref[ids].reshape(chunk, head_dim)
    v = v_ref[ids].reshape(chunk, head_dim)
    positions = step * chunk + jnp.arange(chunk)
    live = positions < length
    visible = live[None, :] if q_pos is None else live[None, :] & (positions[None, :] <= q_pos[:, None])
    logits = jnp.where(visible, plgpu.dot(q, k.T) * scale, _MASK)  # [rows, chunk] float32
    m_new = jnp.maximum(m, logits.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    if q_pos is not None:  # a padding or early query row can see nothing in a whole chunk: keep it at 0
        p = jnp.where(visible, p, 0.0)
    v = jnp.where(live[:, None], v, jnp.zeros_like(v))
    o = o * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return o, m_new, l * correction + p.sum(axis=-1)


def _empty_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _kernel(layer_base_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            block_size: int, blocks_per_step: int, steps_per_split: int, num_blocks: int, scale: float):
    split = pl.program_id(2)
    length = lengths_ref[0]
    chunk = blocks_per_step * block_size
    first_step = split * steps_per_split
    last_step = jnp.minimum(first_step + steps_per_split, pl.cdiv(length, chunk))
    q = q_ref[...]
    body = functools.partial(_attend_chunk, q=q, tables_ref=tables_ref, k_ref=k_ref, v_ref=v_ref,
                             layer_base=layer_base_ref[0], length=length, q_pos=None, block_size=block_size,
                             blocks_per_step=blocks_per_step, num_blocks=num_blocks, scale=scale)
    o, m, l = jax.lax.fori_loop(first_step, jnp.maximum(last_step, first_step), body, _empty_carry(*q.shape))
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



def _prefill_kernel(layer_base_ref, lengths_ref, tables_ref, q_pos_ref, q_ref, k_ref, v_ref, o_ref, *,
                    block_size: int, blocks_per_step: int, num_blocks: int, scale: float):
    """One program: a block of query rows (tokens x heads of one kv head) of one sequence, causal."""
    length = lengths_ref[0]
    q = q_ref[...]
    q_pos = q_pos_ref[...]  # [rows]; -1 marks a padding row
    body = functools.partial(_attend_chunk, q=q, tables_ref=tables_ref, k_ref=k_ref, v_ref=v_ref,
                             layer_base=layer_base_ref[0], length=length, q_pos=q_pos, block_size=block_size,
                             blocks_per_step=blocks_per_step, num_blocks=num_blocks, scale=scale)
    last = jnp.minimum(length, q_pos.max() + 1)
    o, _, l = jax.lax.fori_loop(0, pl.cdiv(last, blocks_per_step * block_size), body, _empty_carry(*q.shape))
    o_ref[...] = (o / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_layers", "blocks_per_step", "query_rows", "num_warps", "num_stages",
                                             "interpret"))
def paged_prefill_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer, block_tables: jax.Array,
                            lengths: jax.Array, q_positions: jax.Array, *, num_layers: int,
                            blocks_per_step: int | None = None, query_rows: int = 64, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Causal attention of T queries per sequence (prefill, or a chunk on a cached prefix) over the pools.

    Query t of sequence b sits at q_positions[b, t] and sees cached positions <= it and < lengths[b]
    (its own K/V must already be in the pools). Pools in jaxpaged's layout, [L * N, P, K, D].

    Args:
      q: [B, T, H, D].
      block_tables: [B, M] int32; lengths: [B] int32; q_positions: [B, T] int32 (-1: a padding query).
      query_rows: rows (tokens x query heads of one kv head) per program, a power of two >= 16.

    Returns:
      [B, T, H, D] in q's dtype; padding queries return zeros.
    """
    batch, num_q, num_heads, head_dim = q.shape
    total_blocks, block_size, kv_heads, _ = k_pool.shape
    num_blocks = total_blocks // num_layers
    max_blocks = block_tables.shape[1]
    blocks_per_step = blocks_per_step or default_blocks_per_step(block_size, max_blocks)
    group = num_heads // kv_heads
    group_pad = 1 << (group - 1).bit_length()
    tokens_per_program = max(1, query_rows // group_pad)
    rows = max(_MIN_ROWS, tokens_per_program * group_pad)
    num_q_blocks = -(-num_q // tokens_per_program)
    padded_q = num_q_blocks * tokens_per_program

    q = jnp.pad(q, ((0, 0), (0, padded_q - num_q), (0, 0), (0, 0)))
    q = q.reshape(batch, num_q_blocks, tokens_per_program, kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0),) * 4 + ((0, group_pad - group), (0, 0)))
    q = q.transpose(0, 3, 1, 2, 4, 5).reshape(batch, kv_heads, num_q_blocks, tokens_per_program * group_pad, head_dim)
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, rows - tokens_per_program * group_pad), (0, 0)))  # [B, K, nq, rows, D]
    positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, padded_q - num_q)), constant_values=-1)
    row_pos = jnp.repeat(positions.reshape(batch, num_q_blocks, tokens_per_program), group_pad, axis=2)
    head_pad = (jnp.arange(tokens_per_program * group_pad) % group_pad) < group  # padded heads: no position
    row_pos = jnp.where(head_pad[None, None, :], row_pos, -1)
    row_pos = jnp.pad(row_pos, ((0, 0), (0, 0), (0, rows - tokens_per_program * group_pad)), constant_values=-1)

    layer_base = (jnp.asarray(layer, jnp.int32) * num_blocks).reshape(1)
    kernel = functools.partial(_prefill_kernel, block_size=block_size, blocks_per_step=blocks_per_step,
                               num_blocks=num_blocks, scale=head_dim**-0.5)
    pool_spec = pl.BlockSpec((total_blocks, block_size, None, head_dim), lambda b, h, j: (0, 0, h, 0))
    out = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_q_blocks),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, j: (0,)),
            pl.BlockSpec((1,), lambda b, h, j: (b,)),
            pl.BlockSpec((None, max_blocks), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, None, rows), lambda b, h, j: (b, j, 0)),
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
            pool_spec,
            pool_spec,
        ],
        out_specs=pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, num_q_blocks, rows, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxpaged_prefill",
    )(layer_base, lengths.astype(jnp.int32), block_tables.astype(jnp.int32), row_pos, q, k_pool, v_pool)

    out = out[:, :, :, : tokens_per_program * group_pad].reshape(batch, kv_heads, num_q_blocks, tokens_per_program,
                                                                  group_pad, head_dim)[:, :, :, :, :group]
    out = out.transpose(0, 2, 3, 1, 4, 5).reshape(batch, padded_q, num_heads, head_dim)
    return out[:, :num_q]

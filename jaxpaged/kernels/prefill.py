"""The paged prefill kernel (Pallas, Triton lowering): causal attention of T queries per sequence (a
prompt, or a chunk on a cached prefix), K and V read straight from the block pools through the
block table, one program per block of query rows (and, over a long prefix with few programs, per
part of the positions they see, merged after: `launch.default_prefill_splits`).

The kernel reads q and writes its output in their [B, T, H, D] layout, viewed as rows of
[T * H, D] (no transpose around it): a program's tile packs its tokens' G query heads into 64 rows,
kept in shared memory for both dots. Each step's K/V rows of positions are found a step ahead from
the blocks' ids; only the steps that reach a causal limit or the length mask.

Axis letters: B sequences, T query tokens, H query heads, K kv heads, G = H / K, D head dim,
L layers, N blocks per layer, P block size, M blocks per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpaged.kernels import launch
from jaxpaged.kernels.common import (check_inputs, check_scales, empty_carry, layer_operand, live_positions,
                                     load_ids, load_kv, load_kv8, pool_view, program_layer_base, scale_view, softmax_scale,
                                     update)
from jaxpaged.kernels.merge import merge_prefill_splits


def _prefill_kernel(layer_ref, lengths_ref, tables_ref, q_pos_ref, q_ref, k_ref, v_ref, *refs,
                    group: int, rows: int, tokens: int, num_q_blocks: int, splits: int, block_size: int,
                    blocks_per_step: int, num_blocks: int, num_layers: int, kv_heads: int, scale: float,
                    masked_loads: bool, quantized: bool):
    """One program: `tokens` consecutive queries of one sequence x the G query heads of one kv head,
    causal, over one of `splits` parts of the positions they see; grid (splits x query blocks, K, B).

    Its tile of `rows` rows (a power of two >= tokens * G) holds query t's head g at row t * G + g;
    the rows past tokens * G, and those of tokens past T, repeat the tile's last real row, so they
    compute its values again and write them to its place. The rows are gathered from q viewed as
    [T * H, D] and scattered back into o viewed the same way (both [B, T, H, D] as they come: no
    transpose runs around the kernel), and the q tile stays in shared memory as the first operand
    of both dots. The query blocks run from the last (the longest causal prefix) to the first: with
    the default tile, 20.08 M against 19.59 M tokens/s in order at 8 x 2048 and 5.77 M against 5.64 M
    at 1 x 8192 on an H100 (32/8/128 heads, tune_kernels_prefill_best_H100.json).

    Each loop step finds the K/V rows of the next (from its blocks' ids), so no load in a step
    waits on a table load of the same step. Loop steps wholly before every row's causal limit and
    inside the length run unmasked; the rest mask by the causal test alone, the query positions
    being clamped below the length once (masked_loads: V rows past the length load as zeros).
    Padding queries (position -1) return zeros. With 8-bit pools (quantized) refs begin with the K
    and V scales (`scale_view`), applied in registers (`common.update`), and each step reads K and V
    (transposed) at its blocks (`common.load_kv8`), converted to q's dtype. With one split, the output
    refs are o; with more, each split writes its unnormalised o, running max and sum (o, m, l) for
    `merge.merge_prefill_splits`.
    """
    scale_refs, out_refs = (refs[:2], refs[2:]) if quantized else (None, refs)
    split, j = pl.program_id(0) // num_q_blocks, pl.program_id(0) % num_q_blocks
    j = num_q_blocks - 1 - j  # the heaviest first
    num_q = q_pos_ref.shape[0]
    r = jnp.minimum(jnp.arange(rows), tokens * group - 1)  # [rows]: the tile's rows, the padding repeating the last
    token = jnp.minimum(j * tokens + r // group, num_q - 1)
    q_rows = token * (q_ref.shape[0] // num_q) + pl.program_id(1) * group + r % group  # rows of [T * H, D]
    q = q_ref[q_rows]  # [rows, D]
    length = lengths_ref[0]
    q_pos = jnp.minimum(q_pos_ref[token], length - 1)  # [rows]; -1: a padding query
    chunk = blocks_per_step * block_size
    seen = pl.cdiv(jnp.minimum(length, q_pos.max() + 1), chunk)  # steps any row sees
    per_split = pl.cdiv(seen, splits)
    start, last = split * per_split, jnp.minimum((split + 1) * per_split, seen)  # this split's steps
    first_pos = jnp.where(q_pos >= 0, q_pos, jnp.iinfo(jnp.int32).max).min()  # the earliest real row
    full = jnp.clip(jnp.minimum(length, first_pos + 1) // chunk, start, jnp.maximum(last, start))
    ids_of = functools.partial(load_ids, tables_ref=tables_ref,
                               layer_base=program_layer_base(layer_ref, num_blocks, num_layers, kv_heads),
                               blocks_per_step=blocks_per_step, num_blocks=num_blocks,
                               row_gather=0 if quantized else block_size, rows_from_blocks=True)

    def steps(masked):
        def body(i, carry):  # the K/V rows (8-bit pools: blocks) of step i were found in step i - 1
            ids, softmax = carry
            if quantized:  # V's scales past the length read as 0; the tiles in q's dtype
                live = live_positions(i, length, chunk) if masked else None
                k, v, row_scales = load_kv8(ids, k_ref, v_ref, scale_refs, block_size=block_size, live=live,
                                            dtype=q.dtype)
                softmax = update(softmax, q, k, v, i, length, q_pos, scale=scale, masked=masked, v_zeroed=True,
                                 row_scales=row_scales, v_t=True)
            else:
                live = live_positions(i, length, chunk) if masked and masked_loads else None
                k, v = load_kv(ids, k_ref, v_ref, live=live)
                softmax = update(softmax, q, k, v, i, length, q_pos, scale=scale, masked=masked,
                                 v_zeroed=live is not None)
            return ids_of(jnp.minimum(i + 1, jnp.maximum(last - 1, start))), softmax
        return body

    carry = jax.lax.fori_loop(start, full, steps(False), (ids_of(start), empty_carry(*q.shape)))
    _, (o, m, l) = jax.lax.fori_loop(full, last, steps(True), carry)
    real = q_pos >= 0
    if splits == 1:  # one reciprocal a row, 0 for padding queries
        inverse = jnp.where(real, 1 / jnp.maximum(l, jnp.finfo(jnp.float32).tiny), 0.0)
        out_refs[0][q_rows] = (o * inverse[:, None]).astype(out_refs[0].dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[q_rows] = jnp.where(real[:, None], o, 0.0)
        m_ref[q_rows] = m
        l_ref[q_rows] = jnp.where(real, l, 0.0)


@functools.partial(jax.jit, static_argnames=("blocks_per_step", "query_rows", "num_warps", "num_stages", "num_splits",
                                             "gpu", "interpret"))
def paged_prefill_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer, block_tables: jax.Array,
                            lengths: jax.Array, q_positions: jax.Array, *, k_scale: jax.Array | None = None,
                            v_scale: jax.Array | None = None, blocks_per_step: int | None = None,
                            query_rows: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            num_splits: int | None = None, gpu: launch.Gpu | None = None,
                            interpret: bool = False) -> jax.Array:
    """Causal attention of T queries per sequence (prefill, or a chunk on a cached prefix) over the pools.

    Query t of sequence b sits at q_positions[b, t] and sees cached positions <= it and < lengths[b]
    (its own K/V must already be in the pools). One launch: the kernel reads q and writes the
    output in their [B, T, H, D] layout.

    Args:
      q: [B, T, H, D].
      k_pool, v_pool, layer: as for `paged_decode_attention`.
      block_tables: [B, M] int32; lengths: [B] int32; q_positions: [B, T] int32 (-1: a padding query).
      k_scale, v_scale: for 8-bit pools, their scales [L, K, N, P], as for `paged_decode_attention`.
      blocks_per_step, query_rows, num_warps, num_stages: the tile (blocks per loop step; rows, i.e.
        tokens x query heads of one kv head, per program, a power of two >= 16), warps per program
        and pipeline stages. By default 64 positions x 64 rows (one warpgroup's MMA tile) with 4
        warps and 3 stages, or 2 stages where K/V rows are wider than 256 bytes (float32 at head
        dim 128, or head dim 256), so the stages fit in shared memory. On an H100 (bfloat16, 32/8/128
        heads, tune_kernels_prefill_best_H100.json) that tile with the row layout of q gives 19.59 M
        tokens/s at 8 x 2048 and 5.64 M at 1 x 8192 where the tile before, 128 x 128 with 8 warps and
        2 stages (q loaded as a window), gave 17.09 M and 5.37 M; 4 stages 14.39 M and 4.35 M.
      num_splits: parts of the positions each query block sees, run as programs of their own and
        merged after (flash-decoding, for few programs over a long cached prefix); default
        `launch.default_prefill_splits`.
      gpu: the card's numbers for the defaults; default `launch.this_gpu()` (the device jax runs on).
      interpret: run in Pallas interpret mode (any backend, slow; for tests).

    Returns:
      [B, T, H, D] in q's dtype; padding queries return zeros.
    """
    batch, num_q, num_heads, head_dim = q.shape
    quantized = check_scales(k_pool, k_scale, v_scale)
    (k_pool, v_pool), (k_spec, v_spec), (num_layers, kv_heads, num_blocks, block_size) = pool_view(k_pool, v_pool, True)
    check_inputs(q, k_pool, block_tables, lengths, q_positions, kv_heads=kv_heads)
    scales, scale_spec = scale_view(k_scale, v_scale) if quantized else ((), None)
    max_blocks = block_tables.shape[1]
    wide = (q if quantized else k_pool).dtype.itemsize * head_dim > 256  # float32 at head dim 128: fewer stages fit shared memory
    blocks_per_step = blocks_per_step or launch.default_blocks_per_step(block_size, max_blocks, positions=64)
    query_rows = query_rows or launch.PREFILL_QUERY_ROWS
    if query_rows < launch.MIN_ROWS or query_rows & (query_rows - 1):
        raise ValueError(f"query_rows must be a power of two >= {launch.MIN_ROWS}, got {query_rows}")
    num_warps = num_warps or 4
    num_stages = num_stages or (2 if wide else 3)
    group = num_heads // kv_heads
    rows = max(query_rows, 1 << (group - 1).bit_length())
    tokens = rows // group  # per program
    num_q_blocks = -(-num_q // tokens)
    steps = -(-max_blocks // blocks_per_step)
    sm_count = (gpu or launch.this_gpu()).sm_count
    splits = num_splits or launch.default_prefill_splits(num_q_blocks * kv_heads * batch, steps,
                                                         head_dim * q.dtype.itemsize, sm_count)

    as_rows = pl.BlockSpec((None, num_q * num_heads, head_dim), lambda j, h, b: (b, 0, 0))  # q and o of sequence b
    flat = (batch, num_q * num_heads)
    if splits == 1:
        out_specs, out_shape = as_rows, jax.ShapeDtypeStruct((*flat, head_dim), q.dtype)
    else:  # per split (grid axis 0 // query blocks): unnormalised o, running max and sum, all float32
        split_of = lambda j, h, b: (j // num_q_blocks, b)  # noqa: E731
        out_specs = [pl.BlockSpec((None, None, num_q * num_heads, head_dim), lambda j, h, b: (*split_of(j, h, b), 0, 0)),
                     pl.BlockSpec((None, None, num_q * num_heads), lambda j, h, b: (*split_of(j, h, b), 0)),
                     pl.BlockSpec((None, None, num_q * num_heads), lambda j, h, b: (*split_of(j, h, b), 0))]
        out_shape = [jax.ShapeDtypeStruct((splits, *flat, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((splits, *flat), jnp.float32), jax.ShapeDtypeStruct((splits, *flat), jnp.float32)]
    kernel = functools.partial(_prefill_kernel, group=group, rows=rows, tokens=tokens, num_q_blocks=num_q_blocks,
                               splits=splits, block_size=block_size, blocks_per_step=blocks_per_step,
                               num_blocks=num_blocks, num_layers=num_layers, kv_heads=kv_heads,
                               scale=softmax_scale(head_dim),
                               masked_loads=not interpret, quantized=quantized)  # (interpret mode can not mask a gather: V is zeroed after)
    out = pl.pallas_call(
        kernel,
        grid=(splits * num_q_blocks, kv_heads, batch),  # the query blocks of one sequence and kv head launch together
        in_specs=[
            pl.BlockSpec((1,), lambda j, h, b: (0,)),
            pl.BlockSpec((1,), lambda j, h, b: (b,)),
            pl.BlockSpec((None, max_blocks), lambda j, h, b: (b, 0)),
            pl.BlockSpec((None, num_q), lambda j, h, b: (b, 0)),
            as_rows,
            k_spec,
            v_spec,
            *[scale_spec] * len(scales),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxpaged_prefill",
    )(layer_operand(layer), lengths.astype(jnp.int32), block_tables.astype(jnp.int32), q_positions.astype(jnp.int32),
      q.reshape(*flat, head_dim), k_pool, v_pool, *scales)
    return (out if splits == 1 else merge_prefill_splits(*out, q.dtype)).reshape(q.shape)

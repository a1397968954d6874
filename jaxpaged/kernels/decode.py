"""The paged decode kernel (Pallas, Triton lowering): attention of one query token per sequence over
its cached K/V, read straight from the block pools through the block table, the context split
across programs (flash-decoding) when the batch alone does not fill the GPU.

Grid: (B, K / heads, splits). Program (b, h, s) takes sequence b, kv head h (or a pack of `heads`
kv heads), and the s-th of `splits` equal slices of the sequence's own loop steps (of its length,
not of the table's width, so that in a batch of ragged lengths every split of a long row has work
and none of a short row waits on one long slice); it loads its G query heads straight from q
(as 16 rows or more, the smallest Triton dot, the extra ones zero), then walks `blocks_per_step`
blocks at a time with an online softmax (in base 2: `common.update`). Where the sequences and kv
heads alone make about one program per SM, each gets one program walking longer steps instead of
splits (`launch.default_one_per_sm`). Where a split walks more than one step
(`launch.default_row_gather`) it gathers each step's K and V as [chunk, D] rows of positions (the
pools viewed as rows, the block table giving each row's block; in jaxpaged's head-major pools,
[L, K, N, P, D], one head's rows of a block are contiguous), which Triton copies asynchronously
into shared memory, three steps in flight, and feeds to the dots from there; with head dim 128 the
products are transposed (the chunk rather than the query rows as the dots' long side, so they
become Hopper's wgmma). Otherwise it gathers whole [blocks, P, D] blocks, issuing each step's loads
a step ahead where that measured faster (`launch.default_loads_ahead`). Positions at or past the
length get probability 0 and their V rows are loaded as zeros (or zeroed after the load), so an
unwritten or freed slot (NaN, or another sequence's data) can not reach the output. With one split
the program writes its G output rows in place, so the whole call is one launch; more splits are
merged by a second, small kernel (`merge.merge_decode_splits`). Where many programs would each read
a short context, one program takes 2 or 4 kv heads of a sequence
(`launch.default_heads_per_program`): their query heads fill the 16-row tile that G alone leaves
mostly padding, and each step gathers every packed head's rows, the logits between different kv
heads masked out.

Axis letters: B sequences, H query heads, K kv heads, G = H / K, D head dim, L layers,
N blocks per layer, P block size, M blocks per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpaged.kernels import launch
from jaxpaged.kernels.common import (check_inputs, check_scales, empty_carry, layer_operand, live_positions,
                                     load_ids, load_kv, load_kv8, pool_view, program_layer_base, scale_view,
                                     softmax_scale, update, update_transposed)
from jaxpaged.kernels.merge import merge_decode_splits
from jaxpaged.quant import quantise


def _attend_chunk(step, carry, q, tables_ref, k_ref, v_ref, layer_base, length, *, blocks_per_step: int,
                  num_blocks: int, scale: float, transposed: bool, masked_loads: bool, row_gather: int,
                  heads: int, group: int):
    """One loop step over float pools: load step `step`'s K/V, then update the online softmax.

    transposed: `update_transposed` (q given as q^T). masked_loads: V rows past the length load as
    zeros (a GPU-only load), instead of being zeroed after the load. heads, group: `heads` kv heads
    packed in the program (row gather), G query heads each.
    """
    ids = load_ids(step, tables_ref, layer_base, blocks_per_step=blocks_per_step, num_blocks=num_blocks,
                   row_gather=row_gather, heads=heads)
    chunk = blocks_per_step * (row_gather or k_ref.shape[-2])
    live = live_positions(step, length, chunk, heads) if masked_loads else None
    k, v = load_kv(ids, k_ref, v_ref, live=live)
    step_update = update_transposed if transposed else functools.partial(update, q_pos=None)
    return step_update(carry, q, k, v, step, length, scale=scale, v_zeroed=live is not None, heads=heads, group=group)


def _attend_chunk8(step, carry, q, tables_ref, k_ref, v_ref, layer_base, length, *, blocks_per_step: int,
                   num_blocks: int, block_size: int, scale: float, scale_refs, q_scale, dtype):
    """One loop step over 8-bit pools: K and V transposed at the step's blocks (`load_kv8`, the
    tiles converted to dtype, or kept int8 for int8 products), then the online softmax with the
    positions' scales (and q's row scales where q is int8)."""
    ids = load_ids(step, tables_ref, layer_base, blocks_per_step=blocks_per_step, num_blocks=num_blocks)
    live = live_positions(step, length, blocks_per_step * block_size)
    k, v_t, row_scales = load_kv8(ids, k_ref, v_ref, scale_refs, block_size=block_size, live=live, dtype=dtype)
    return update(carry, q, k, v_t, step, length, None, scale=scale, v_zeroed=True, row_scales=row_scales,
                  q_scale=q_scale, v_t=True)


def _attend_loaded(step, carry, q, tables_ref, k_ref, v_ref, layer_base, length, *, last: int,
                   blocks_per_step: int, num_blocks: int, scale: float, transposed: bool, masked_loads: bool):
    """One loop step of the block gather with its loads a step ahead (`launch.default_loads_ahead`):
    issue the loads of step + 1 (and the block ids of step + 2), then compute step `step` from the
    tiles loaded one step earlier, so memory latency overlaps the math. `last` is the last step to
    compute: the loads past it read it again (and are not used)."""
    (ids_next, k, v), softmax = carry
    chunk = blocks_per_step * k_ref.shape[-2]
    live = live_positions(jnp.minimum(step + 1, last), length, chunk) if masked_loads else None
    loaded = load_kv(ids_next, k_ref, v_ref, live=live)
    ids_after = load_ids(jnp.minimum(step + 2, last), tables_ref, layer_base, blocks_per_step=blocks_per_step,
                         num_blocks=num_blocks)
    step_update = update_transposed if transposed else functools.partial(update, q_pos=None)
    softmax = step_update(softmax, q, k, v, step, length, scale=scale, v_zeroed=masked_loads)
    return (ids_after, *loaded), softmax


def _decode_kernel(layer_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, *refs, group: int, rows: int,
                   block_size: int, blocks_per_step: int, splits: int, num_blocks: int, num_layers: int,
                   kv_heads: int, scale: float, transposed: bool, masked_loads: bool, row_gather: bool, heads: int,
                   loads_ahead: bool, quantized: bool, tile_dtype):
    """One program: sequence b, kv heads h * heads to (h + 1) * heads - 1 (one, unless packed), the
    s-th of `splits` equal slices of the sequence's loop steps; grid (B, K / heads, splits).

    It reads their G query heads each straight from q ([H, D] of sequence b), as `rows` rows of which
    the ones past heads * G are zeros. With 8-bit pools (quantized) the first two of refs are the K
    and V scales (`scale_view`); tile_dtype: what q and the 8-bit tiles take for the products (None:
    int8 products, q quantised per row here, as `jaxpaged.quant.quantise` does). With one output ref
    ([H, D]) it writes its normalised rows there (one split); with three, the unnormalised o and its
    running max and sum, merged outside.
    """
    scale_refs, out_refs = (refs[:2], refs[2:]) if quantized else (None, refs)
    head_rows = pl.ds(pl.program_id(1) * heads * group, rows)
    real = jnp.arange(rows) < heads * group
    q = plgpu.load(q_ref.at[head_rows], mask=real[:, None], other=0)
    q_scale = None
    if quantized and tile_dtype is None:  # int8 products: q quantised per row here (rows past the heads: 0)
        q, q_scale = quantise(q, "int8")
        q_scale = q_scale.astype(jnp.float32)
    elif tile_dtype is not None:
        q = q.astype(tile_dtype)
    split = pl.program_id(2)
    length = lengths_ref[0]
    chunk = blocks_per_step * block_size
    row_steps = pl.cdiv(length, chunk)
    per_split = pl.cdiv(row_steps, splits)  # the row's own steps shared evenly: no split is left idle
    first_step = split * per_split
    last_step = jnp.maximum(jnp.minimum(first_step + per_split, row_steps), first_step)
    layer_base = program_layer_base(layer_ref, num_blocks, num_layers, kv_heads, heads)
    shared = dict(tables_ref=tables_ref, k_ref=k_ref, v_ref=v_ref, layer_base=layer_base, length=length,
                  blocks_per_step=blocks_per_step, num_blocks=num_blocks, scale=scale)
    softmax = empty_carry(*q.shape)
    if quantized:
        step = functools.partial(_attend_chunk8, q=q, block_size=block_size, scale_refs=scale_refs, q_scale=q_scale,
                                 dtype=tile_dtype, **shared)
        o, m, l = jax.lax.fori_loop(first_step, last_step, step, softmax)
    elif loads_ahead:  # the first step's tiles and the second's block ids are loaded before the loop
        last = jnp.clip(last_step - 1, 0, tables_ref.shape[0] // blocks_per_step - 1)
        ids = functools.partial(load_ids, tables_ref=tables_ref, layer_base=layer_base,
                                blocks_per_step=blocks_per_step, num_blocks=num_blocks)
        first = jnp.minimum(first_step, last)
        live = live_positions(first, length, chunk) if masked_loads else None
        loaded = (ids(jnp.minimum(first_step + 1, last)), *load_kv(ids(first), k_ref, v_ref, live=live))
        step = functools.partial(_attend_loaded, q=q.T if transposed else q, last=last, transposed=transposed,
                                 masked_loads=masked_loads, **shared)
        o, m, l = jax.lax.fori_loop(first_step, last_step, step, (loaded, _transposed(softmax, transposed)))[1]
    else:
        step = functools.partial(_attend_chunk, q=q.T if transposed else q, transposed=transposed,
                                 masked_loads=masked_loads, row_gather=block_size if row_gather else 0, heads=heads,
                                 group=group, **shared)
        o, m, l = jax.lax.fori_loop(first_step, last_step, step, _transposed(softmax, transposed))
    if transposed:
        o = o.T
    if len(out_refs) == 1:
        o = (o / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[:, None]).astype(out_refs[0].dtype)
        plgpu.store(out_refs[0].at[head_rows], o, mask=real[:, None])
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def _transposed(softmax, transposed: bool):
    """The online softmax's carry as the transposed products keep it (o^T [D, rows]), or as it is."""
    return (softmax[0].T, *softmax[1:]) if transposed else softmax


_DOT_DTYPES = ("int8", "float16", "bfloat16", "float32")  # what 8-bit pools' products may take (`dot_dtype`)


@functools.partial(jax.jit, static_argnames=("blocks_per_step", "num_splits", "num_warps", "num_stages", "transposed", "dot_dtype",
                                             "row_gather", "heads_per_program", "gpu", "interpret"))
def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer, block_tables: jax.Array,
                           lengths: jax.Array, *, k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                           blocks_per_step: int | None = None, num_splits: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None, transposed: bool | None = None,
                           row_gather: bool | None = None, heads_per_program: int | None = None,
                           gpu: launch.Gpu | None = None, dot_dtype: str | None = None,
                           interpret: bool = False) -> jax.Array:
    """Attention of one query per sequence over its cached K/V, read from the pools in place.

    Args:
      q: [B, H, D].
      k_pool, v_pool: all layers' pools as the cache holds them, [L, K, N, P, D] (8-bit V's blocks
        transposed, [L, K, N, D, P]: `jaxpaged.quant.v_blocks`).
      layer: [] int, the layer to read (clamped into [0, L)).
      block_tables: [B, M] int32 block ids; entries past a sequence's blocks may hold any id in
        [0, N] (N is the sentinel).
      lengths: [B] int32 positions to attend to (0 for padding rows, which return zeros).
      k_scale, v_scale: for 8-bit pools (int8 or float8_e4m3fn), their scales [L, K, N, P]
        (`jaxpaged.quant`; a cache's 8-bit pools hold K rotated, and `paged_attention` turns q to
        match before it calls this), read in place: the products take the 8-bit tiles as they are
        (int8) or converted to `dot_dtype` in registers, and each position's scales are applied to its
        logits and probabilities (`common.update`). Their launch: the plain products of one kv
        head's rows, K as rows of positions and V as rows of a block's feature (`common.load_kv8`),
        `launch.QUANTIZED_DEFAULTS`' positions a step and stages, the splits of a pool of q's dtype.
      blocks_per_step: blocks loaded per loop step, dividing M; default `launch.default_step_positions`'s
        worth (32 KiB of K and V, at least 64 positions).
      num_splits: programs per sequence and kv head; default one where the sequences and kv heads
        make about one program per SM (`launch.default_one_per_sm`), else about a wave of programs
        (`launch.default_splits`). With one split the kernel writes the normalised output itself;
        with more, they are merged after it.
      num_warps: warps per program.
      num_stages: Triton's software-pipelining depth; default `launch.default_stages`.
      transposed: compute K q^T and V^T p^T (the chunk as the dots' M side) instead of q K^T and p V;
        default `launch.default_transposed`. V rows past the length load as zeros (a masked load)
        with the row gather or the transposed products, else are zeroed after the load (and always
        in interpret mode).
      row_gather: gather K/V as [chunk, D] rows of positions (the pools viewed as rows), instead of
        [blocks, P, D] blocks reshaped in the kernel; default `launch.default_row_gather`.
      heads_per_program: kv heads packed into one program (a power of two dividing K; the row gather
        only): their heads x G query rows share one tile and each step gathers heads x chunk K/V
        rows (chunk: the default step's positions / heads), the logits of rows and positions of
        different kv heads masked out. With G below 16 the tile's rows are padding anyway, so the
        products cost no more per byte. Default `launch.default_heads_per_program` (1 with the block
        gather).
      gpu: the card's numbers for the defaults; default `launch.this_gpu()` (the device jax runs on).
      dot_dtype: with 8-bit pools, the dtype q and the 8-bit tiles take for the products: "int8",
        "float16", "bfloat16" or "float32" (float pools take q's dtype and refuse one); default
        `launch.QUANTIZED_DEFAULTS` ("int8" for int8 pools, but q's dtype where a loop step holds fewer
        than `launch.MIN_INT8_STEP` positions; float16 for float8: q past float16's 65504 becomes
        inf there). "int8" (int8 pools): q is quantised per row too, in the kernel
        (`jaxpaged.quant.quantise`: a row holding inf or NaN attends as NaN), q . k runs on int8 operands into
        int32, the scales of q's rows and K's positions turn it back, and the probabilities times
        V's scales are rounded onto 0..127 per row and step for an int8 product with V
        (`common.weigh`). Their accuracy: benchmarks/kv_quant_model.py --int8-products.
      interpret: run in Pallas interpret mode (any backend, slow; for tests).

    Returns:
      [B, H, D] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    _, _, (_, kv_heads, _, block_size) = pool_view(k_pool, v_pool, row_gather=True)  # checks the pools
    check_inputs(q, k_pool, block_tables, lengths, kv_heads=kv_heads)
    quantized = check_scales(k_pool, k_scale, v_scale)
    max_blocks = block_tables.shape[1]
    group = num_heads // kv_heads
    out_dtype, tile_dtype = q.dtype, None
    if dot_dtype is not None and dot_dtype not in _DOT_DTYPES:
        raise ValueError(f"dot_dtype must be one of {_DOT_DTYPES} (or None), got {dot_dtype!r}")
    if dot_dtype is not None and not quantized:
        raise ValueError(f"dot_dtype is for 8-bit pools; pools of {k_pool.dtype} take q's dtype")
    if quantized:  # 8-bit pools' own launch (`launch.QUANTIZED_DEFAULTS`)
        if transposed or row_gather is False or (heads_per_program or 1) > 1:
            raise ValueError("8-bit pools take the plain products of one kv head's rows: transposed, row_gather=False "
                             "and heads_per_program > 1 are for float pools")
        transposed, row_gather, heads_per_program = False, True, 1
        blocks_per_step = blocks_per_step or launch.default_blocks_per_step(
            block_size, max_blocks, launch.QUANTIZED_DEFAULTS["step_positions"])
        num_stages = num_stages or launch.QUANTIZED_DEFAULTS["num_stages"]
        short_step = blocks_per_step * block_size < launch.MIN_INT8_STEP  # too short for int8 p . V
        if dot_dtype is None:
            dot_dtype = launch.QUANTIZED_DEFAULTS["dot_dtype"][k_pool.dtype.name]
            dot_dtype = q.dtype.name if dot_dtype == "int8" and short_step else dot_dtype
        if dot_dtype == "int8":  # int8 x int8 -> int32 products: the kernel quantises q per row
            if k_pool.dtype != jnp.int8:
                raise ValueError(f"dot_dtype='int8' takes int8 pools, not {k_pool.dtype}")
            if short_step:
                raise ValueError(f"dot_dtype='int8' takes loop steps of >= {launch.MIN_INT8_STEP} positions, not "
                                 f"{blocks_per_step} blocks of {block_size}")
        else:
            tile_dtype = jnp.dtype(dot_dtype)
    plan = launch.decode_launch(batch, num_heads, kv_heads, head_dim, block_size, max_blocks, out_dtype.itemsize
                                if quantized else k_pool.dtype.itemsize, gpu or launch.this_gpu(),
                                num_splits=num_splits, blocks_per_step=blocks_per_step,
                                heads_per_program=heads_per_program, row_gather=row_gather, transposed=transposed,
                                num_stages=num_stages)
    (k_pool, v_pool), (k_spec, v_spec), (num_layers, _, num_blocks, _) = pool_view(k_pool, v_pool, plan.row_gather)
    kv_groups = kv_heads // plan.heads_per_program  # programs per sequence and split
    splits, rows = plan.splits, plan.rows

    kernel = functools.partial(_decode_kernel, group=group, rows=rows, block_size=block_size,
                               blocks_per_step=plan.blocks_per_step, splits=splits,
                               num_blocks=num_blocks, num_layers=num_layers, kv_heads=kv_heads,
                               scale=softmax_scale(head_dim), transposed=plan.transposed,
                               masked_loads=(plan.transposed or plan.row_gather) and not interpret,
                               row_gather=plan.row_gather, heads=plan.heads_per_program,
                               loads_ahead=plan.loads_ahead, quantized=quantized,
                               tile_dtype=tile_dtype)
    scales, scale_spec = scale_view(k_scale, v_scale) if quantized else ((), None)
    if splits == 1:  # every program writes its rows of sequence b's [H, D]
        out_specs = pl.BlockSpec((None, num_heads, head_dim), lambda b, h, s: (b, 0, 0))
        out_shape = jax.ShapeDtypeStruct((batch, num_heads, head_dim), out_dtype)
    else:  # every program writes its unnormalised rows, running max and sum; the splits' axis is
        padded = 1 << (splits - 1).bit_length()  # padded to a power of two, for the merge's loads
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((batch, kv_groups, padded, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_groups, padded, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_groups, padded, rows), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(batch, kv_groups, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (0,)),  # layer
            pl.BlockSpec((1,), lambda b, h, s: (b,)),  # length
            pl.BlockSpec((None, max_blocks), lambda b, h, s: (b, 0)),  # block-table row
            pl.BlockSpec((None, num_heads, head_dim), lambda b, h, s: (b, 0, 0)),  # q of sequence b
            k_spec,
            v_spec,
            *[scale_spec] * len(scales),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=plan.num_stages),
        interpret=interpret,
        name="jaxpaged_decode",
    )(layer_operand(layer), lengths.astype(jnp.int32), block_tables.astype(jnp.int32), q, k_pool, v_pool, *scales)

    if splits == 1:
        return out
    return merge_decode_splits(*out, splits=splits, group=plan.heads_per_program * group, num_heads=num_heads,
                               dtype=out_dtype, interpret=interpret)

"""Paged attention in Pallas, lowered through Triton, K and V read straight from the block pools
through the block table. `paged_decode_attention`: one query token per sequence, the context split
across programs (flash-decoding) when the batch alone does not fill the GPU.
`paged_prefill_attention`: T causal queries per sequence on a cached prefix, one program per block
of query rows (and, over a long prefix with few programs, per part of the positions they see).

Why the Triton lowering: it runs on the jax this project supports on GPUs (0.11, where it is
deprecated but present), it is what jax's own paged kernel uses, so the comparison is like for
like, and its ref gathers (`pool_ref[block_ids]`) express a page-table read in one line. The
kernel is alone in this file so that a Mosaic GPU version can replace it.

Decode grid: (B, K, splits). Program (b, h, s) takes sequence b, kv head h, and the s-th slice of
the sequence's blocks; it loads its G query heads straight from q (as 16 rows or more, the smallest
Triton dot, the extra ones zero), then walks `blocks_per_step` blocks at a time with an online
softmax (in base 2: `_update`). Where the sequences and kv heads alone make about one program per
SM, each gets one program walking longer steps instead of splits (`default_one_per_sm`). Where a
split walks more than one step (`default_row_gather`) it gathers each step's K and V as [chunk, D]
rows of positions (the pools viewed as rows, the block table giving each row's block; in jaxpaged's
head-major pools, [L, K, N, P, D], one head's rows of a block are contiguous), which Triton copies
asynchronously into shared memory, three steps in flight, and feeds to the dots from there; with
head dim 128 the products are transposed (the chunk rather than the query rows as the dots' long
side, so they become Hopper's wgmma). The alternative gathers whole [blocks, P, D] blocks,
optionally issuing each step's loads one step ahead in registers. Positions at or past the length
get probability 0 and their V rows are loaded as zeros (or zeroed after the load), so an unwritten
or freed slot (NaN, or another sequence's data) can not reach the output. With one split the program
writes its G output rows in place, so the whole call is one launch; more splits are merged by a
second, small kernel (one program per query head). Where many programs would each read a short
context, one program takes 2 or 4 kv heads of a sequence (`default_heads_per_program`): their query
heads fill the 16-row tile that G alone leaves mostly padding, and each step gathers every packed
head's rows, the logits between different kv heads masked out.
The prefill kernel reads q and writes its output in their [B, T, H, D] layout, viewed as rows of
[T * H, D] (no transpose around it): a program's tile packs its tokens' G query heads into 64 rows,
kept in shared memory for both dots. Each step's K/V rows are found a step ahead from the blocks'
ids; only the steps that reach a causal limit or the length mask. Where the programs are few and
the prefix long, the positions are split across programs and merged after (`default_prefill_splits`).

Axis letters: B sequences, H query heads, K kv heads, G = H / K, D head dim, L layers,
N blocks per layer, P block size, M blocks per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_ROWS = 16  # Triton's smallest dot tile


def _softmax_scale(head_dim: int) -> float:
    """1 / sqrt(D) times log2(e): the kernels' softmax works in base 2 (`_update`)."""
    return head_dim**-0.5 * 1.4426950408889634


def _load_ids(step, tables_ref, layer_base, *, blocks_per_step: int, num_blocks: int, row_gather: int = 0,
              rows_from_blocks: bool = False, heads: int = 1):
    """Where loop step `step`'s K/V are: its blocks' indices in the pool as the kernel sees it
    ([blocks]), or with row_gather = P, the pool viewed as rows of positions, its positions' rows
    ([blocks * P]). layer_base: the pool index of block 0 of this program's layer (and head). The
    sentinel N reads a real block, then is masked. rows_from_blocks (prefill): the rows come from the
    step's block ids, loaded once each, rather than from one table load per position (decode's way:
    with rows from block ids decode ran 0.94-0.95x on an H100 at five of six head-dim-64 shapes with
    128 sequences, 0.97-1.02x at the other 19; tune_decode_ids_*_H100.json). heads (decode's packed
    kv heads, row gather, head-major pools): the rows of `heads` consecutive kv heads, head i's
    positions at [i * chunk, (i + 1) * chunk) ([heads * blocks * P]); layer_base is the first head's."""
    if not row_gather or rows_from_blocks:
        ids = tables_ref[pl.ds(step * blocks_per_step, blocks_per_step)]
        ids = layer_base + jnp.minimum(ids, num_blocks - 1)
        if not row_gather:
            return ids
        return (ids[:, None] * row_gather + jnp.arange(row_gather)[None, :]).reshape(blocks_per_step * row_gather)
    positions = step * blocks_per_step * row_gather + jnp.arange(blocks_per_step * row_gather)
    blocks = tables_ref[positions // row_gather]  # each block id, once per position
    rows = (layer_base + jnp.minimum(blocks, num_blocks - 1)) * row_gather + positions % row_gather
    if heads == 1:
        return rows
    head_rows = num_blocks * row_gather  # one kv head's rows in a layer
    return (rows[None, :] + jnp.arange(heads)[:, None] * head_rows).reshape(heads * rows.shape[0])


def _load_kv(ids, k_ref, v_ref, *, eviction_policy: str | None, live=None):
    """K and V at `ids` (blocks or rows, from `_load_ids`): two [chunk, D] tiles.

    live: None, or [chunk] bool; V rows that are not live then load as zeros (a masked load, so
    no select sits between the load and the dot).
    """
    if eviction_policy is None and live is None:
        k, v = k_ref[ids], v_ref[ids]
    else:  # (a GPU-only path: interpret mode can not load a gather through `plgpu.load`)
        k = plgpu.load(k_ref.at[ids], eviction_policy=eviction_policy)
        shape = v_ref.at[ids].shape  # [blocks, P, D], or [blocks * P, D] for row ids
        mask = None if live is None else jnp.broadcast_to(live.reshape(*shape[:-1], 1), shape)
        v = plgpu.load(v_ref.at[ids], mask=mask, other=None if live is None else 0.0, eviction_policy=eviction_policy)
    return k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])


def _live(step, length, chunk: int, heads: int = 1):
    """[chunk] bool: which positions of loop step `step` are before the length; with packed kv heads,
    [heads * chunk], head i's at [i * chunk, (i + 1) * chunk)."""
    if heads == 1:
        return step * chunk + jnp.arange(chunk) < length
    return step * chunk + jnp.arange(heads * chunk) % chunk < length


def _same_head(heads: int, chunk: int, rows: int, group: int, transposed: bool = False):
    """[rows, heads * chunk] bool (transposed: [heads * chunk, rows]): whether query row r (query
    head r % G of packed kv head r // G) and K/V row c (packed kv head c // chunk) share a kv head.
    Rows past heads * G match nothing."""
    q_head, kv_head = jnp.arange(rows) // group, jnp.arange(heads * chunk) // chunk
    return kv_head[:, None] == q_head[None, :] if transposed else q_head[:, None] == kv_head[None, :]


def _update(carry, q, k, v, step, length, q_pos, *, scale: float, masked: bool = True, v_zeroed: bool = False,
            heads: int = 1, group: int = 1):
    """The online-softmax update of both kernels with one loop step's K/V tiles ([chunk, D] each).

    scale: the softmax scale times log2(e): the running max is kept in base-2 units, so each
    probability is one fused multiply-add and one `exp2` (the hardware's ex2), where `exp` of the
    scaled logits compiles to a longer libdevice sequence.
    q_pos: [rows] positions of the queries (causal limit), each below the length (or -1: sees nothing),
      or None for decode (the length is the limit).
    masked: whether the chunk may reach past the length (or the causal limit). If so, positions at or
    past the length get probability 0 and their V rows are zeroed, so NaN or another sequence's data in
    an unused slot can not reach the output; a chunk known to be inside both limits skips that work.
    Masked logits are -inf and the running max starts finite (`_MASK`), so a masked position's
    probability is exp2(-inf) = 0 even in a row that sees nothing in the chunk (its max stays put).
    v_zeroed: the V rows past the length were loaded as zeros already.
    heads, group (decode): k and v hold `heads` packed kv heads' chunks one after another
    ([heads * chunk, D]), and query row r belongs to kv head r // G (G = group); a row sees only
    its own kv head's positions (`_same_head`), so every step masks.
    """
    o, m, l = carry
    chunk = k.shape[0] // heads
    logits = plgpu.dot(q, k.T)  # [rows, heads * chunk] float32, unscaled
    if heads > 1:
        live = _live(step, length, chunk, heads)
        logits = jnp.where(live[None, :] & _same_head(heads, chunk, q.shape[0], group), logits, -jnp.inf)
        if not v_zeroed:
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
    elif masked:
        positions = step * chunk + jnp.arange(chunk)
        live = positions < length
        visible = live[None, :] if q_pos is None else positions[None, :] <= q_pos[:, None]  # (q_pos < length)
        logits = jnp.where(visible, logits, -jnp.inf)
        if not v_zeroed:
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, logits.max(axis=-1) * scale)
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(logits * scale - m_new[:, None])
    o = o * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return o, m_new, l * correction + p.sum(axis=-1)


def _update_transposed(carry, q_t, k, v, step, length, *, scale: float, masked: bool = True, v_zeroed: bool = False,
                       heads: int = 1, group: int = 1):
    """Decode's `_update` computed transposed: logits^T = K q^T ([chunk, rows]) and o^T += V^T p^T
    ([D, rows]), so the chunk (64 positions), not the 16 query rows, is the M side of both dots:
    compiled for sm_90 they become Hopper's warpgroup MMA, which needs M >= 64, where `_update`'s
    become mma.sync (benchmarks/kernel_asm.py). Where it is faster: `default_transposed`.

    carry: o^T [D, rows] and the running max and sum [rows]; q_t: q^T [D, rows]. heads, group: as
    for `_update`.
    """
    o_t, m, l = carry
    chunk = k.shape[0] // heads
    logits = plgpu.dot(k, q_t)  # [heads * chunk, rows] float32, unscaled
    if masked or heads > 1:
        live = _live(step, length, chunk, heads)
        visible = live[:, None] if heads == 1 else live[:, None] & _same_head(heads, chunk, q_t.shape[1], group, True)
        logits = jnp.where(visible, logits, -jnp.inf)
        if not v_zeroed:
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, logits.max(axis=0) * scale)
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(logits * scale - m_new[None, :])
    o_t = o_t * correction[None, :] + plgpu.dot(v.T, p.astype(v.dtype))
    return o_t, m_new, l * correction + p.sum(axis=0)


def _attend_chunk(step, carry, q, tables_ref, k_ref, v_ref, layer_base, length, q_pos, *, blocks_per_step: int,
                  num_blocks: int, scale: float, masked: bool = True, eviction_policy: str | None = None,
                  transposed: bool = False, masked_loads: bool = False, row_gather: int = 0, heads: int = 1,
                  group: int = 1):
    """One loop step: load step `step`'s K/V, then update the online softmax.

    transposed: decode's `_update_transposed` (q given as q^T). masked_loads: V rows past the
    length load as zeros (a GPU-only load), instead of being zeroed after the load. heads, group:
    `heads` kv heads packed in the program (row gather), G query heads each.
    """
    ids = _load_ids(step, tables_ref, layer_base, blocks_per_step=blocks_per_step, num_blocks=num_blocks,
                    row_gather=row_gather, heads=heads)
    chunk = blocks_per_step * (row_gather or k_ref.shape[-2])
    live = _live(step, length, chunk, heads) if masked_loads and (masked or heads > 1) else None
    k, v = _load_kv(ids, k_ref, v_ref, eviction_policy=eviction_policy, live=live)
    update = _update_transposed if transposed else functools.partial(_update, q_pos=q_pos)
    return update(carry, q, k, v, step, length, scale=scale, masked=masked, v_zeroed=live is not None, heads=heads,
                  group=group)


def _attend_prefetched(step, carry, q, tables_ref, k_ref, v_ref, layer_base, length, *, last,
                       blocks_per_step: int, num_blocks: int, scale: float, masked: bool = True,
                       eviction_policy: str | None = None, transposed: bool = False, masked_loads: bool = False,
                       row_gather: int = 0):
    """One loop step that first issues the loads of step + 1 (and the block ids of step + 2), then
    computes step `step` from tiles loaded one step earlier, so memory latency overlaps the math.
    `last` is the last valid step: the loads past it read it again (and are not used)."""
    (ids_next, k, v), softmax = carry
    chunk = blocks_per_step * (row_gather or k_ref.shape[-2])
    live = _live(jnp.minimum(step + 1, last), length, chunk) if masked_loads else None
    k_next, v_next = _load_kv(ids_next, k_ref, v_ref, eviction_policy=eviction_policy, live=live)
    ids_after = _load_ids(jnp.minimum(step + 2, last), tables_ref, layer_base, blocks_per_step=blocks_per_step,
                          num_blocks=num_blocks, row_gather=row_gather)
    update = _update_transposed if transposed else functools.partial(_update, q_pos=None)
    softmax = update(softmax, q, k, v, step, length, scale=scale, masked=masked, v_zeroed=masked_loads)
    return (ids_after, k_next, v_next), softmax


def _layer_base(layer_ref, num_blocks: int, num_layers: int, flat_heads: int, heads: int = 1):
    """Where block 0 of the layer in layer_ref ([1] int32, clamped into the pools' layers) lies in the
    pool as the kernel sees it: for pools read flat, head-major (flat_heads = K), that layer's and
    this program's (first) kv head's (grid axis 1, counting packs of `heads` kv heads); else
    (flat_heads = 0: the BlockSpec picked the head) the layer's. Computed in the kernel: outside
    it, it would be one more launch per call."""
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)
    return ((layer * flat_heads + pl.program_id(1) * heads) if flat_heads else layer) * num_blocks


def _empty_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _kernel(layer_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs, group: int, rows: int,
            block_size: int, blocks_per_step: int, steps_per_split: int, num_blocks: int, num_layers: int,
            flat_heads: int, scale: float, mask_tail_only: bool, prefetch: bool, eviction_policy: str | None,
            transposed: bool, masked_loads: bool, row_gather: bool, heads: int):
    """One program: sequence b, kv heads h * heads to (h + 1) * heads - 1 (one, unless packed), the
    s-th slice of the blocks; grid (B, K / heads, splits).

    It reads their G query heads each straight from q ([H, D] of sequence b), as `rows` rows of which
    the ones past heads * G are zeros. With one output ref ([H, D], q's dtype) it writes its normalised
    rows there (one split); with three, the unnormalised o and its running max and sum, merged outside.
    """
    head_rows = pl.ds(pl.program_id(1) * heads * group, rows)
    real = jnp.arange(rows) < heads * group
    q = plgpu.load(q_ref.at[head_rows], mask=real[:, None], other=0.0)
    split = pl.program_id(2)
    length = lengths_ref[0]
    chunk = blocks_per_step * block_size
    steps = tables_ref.shape[0] // blocks_per_step
    first_step = split * steps_per_split
    last_step = jnp.maximum(jnp.minimum(first_step + steps_per_split, pl.cdiv(length, chunk)), first_step)
    layer_base = _layer_base(layer_ref, num_blocks, num_layers, flat_heads, heads)
    shared = dict(q=q.T if transposed else q, tables_ref=tables_ref, k_ref=k_ref, v_ref=v_ref, layer_base=layer_base,
                  length=length, blocks_per_step=blocks_per_step, num_blocks=num_blocks, scale=scale,
                  eviction_policy=eviction_policy, transposed=transposed, masked_loads=masked_loads,
                  row_gather=block_size if row_gather else 0)
    softmax = _empty_carry(*q.shape)
    if transposed:
        softmax = (softmax[0].T, *softmax[1:])
    if prefetch:
        last = jnp.clip(last_step - 1, 0, steps - 1)
        ids = functools.partial(_load_ids, tables_ref=tables_ref, layer_base=layer_base,
                                blocks_per_step=blocks_per_step, num_blocks=num_blocks,
                                row_gather=shared["row_gather"])
        first = jnp.minimum(first_step, last)
        live = _live(first, length, chunk) if masked_loads else None
        k, v = _load_kv(ids(first), k_ref, v_ref, eviction_policy=eviction_policy, live=live)
        carry = ((ids(jnp.minimum(first_step + 1, last)), k, v), softmax)
        step = functools.partial(_attend_prefetched, last=last, **shared)
    else:
        carry = softmax
        step = functools.partial(_attend_chunk, q_pos=None, heads=heads, group=group, **shared)
    if mask_tail_only:  # only the chunk holding the length can reach past it
        full = jnp.clip(length // chunk, first_step, last_step)
        carry = jax.lax.fori_loop(first_step, full, functools.partial(step, masked=False), carry)
        first_step = full
    carry = jax.lax.fori_loop(first_step, last_step, step, carry)
    o, m, l = carry[1] if prefetch else carry
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


_ONE_WAVE = 256  # programs: about two per SM of a 132-SM H100


def default_launch(batch: int, kv_heads: int, head_dim: int, steps: int, itemsize: int = 2,
                   row_gather: bool = True) -> tuple[int, bool]:
    """The decode kernel's default splits per sequence and kv head, and whether the block gather
    prefetches.

    Splits: enough for about one wave of programs, never more than the steps; with the block
    gather, then twice as many, up to two waves, while each split keeps at least 64 steps (4096
    positions). Prefetch: see `default_prefetch`; never when the splits were doubled for a long
    context. Measured on an H100 with bfloat16 (benchmarks/tune_kernels.py, attention.py): each
    choice was the faster one at the shapes of the attention benchmark (twice the splits with the
    row gather: 1-17% slower at 15 of 16 shapes). The doubling does not pay with the row gather:
    one split read 2,822-3,020 GB/s against 2,718-2,959 doubled at the three shapes where it
    applied (32 x 8192 at 32/8/128 and 32/8/64 heads, 128 x 8192 at 9/3/64; same run, rows from
    NPKD pools), and 2,933-3,015 against 2,903-2,951 from head-major pools.
    """
    programs = batch * kv_heads
    splits = max(1, min(steps, -(-_ONE_WAVE // programs)))
    doubled = False
    while not row_gather and programs * splits < 2 * _ONE_WAVE and steps // (2 * splits) >= 64:
        splits, doubled = splits * 2, True
    return splits, not doubled and default_prefetch(programs * splits, head_dim * itemsize)


def default_row_gather(steps: int, splits: int) -> bool:
    """Whether the decode kernel gathers rows of positions (rather than whole blocks): where a split
    walks more than one loop step. Rows pay by keeping several steps' loads in flight (`default_stages`);
    with one step per split there is nothing to overlap. Measured on an H100 with bfloat16, both forced
    in the same run (benchmarks/attention.py): rows took 1.00-1.06x the block gather's time at the seven
    shapes where each split walks one step (batch 1 with 512 and 2048 positions at 32/8/128, 32/8/64 and
    9/3/64 heads, and 9/3/64 x 8 x 512), and 0.84-0.97x at all 29 others."""
    return -(-steps // splits) > 1


def default_prefetch(programs: int, row_bytes: int) -> bool:
    """Whether the decode kernel issues its loads a step ahead (K/V tiles held in registers).

    With 128-byte rows (head dim 64 in 16 bits) always; with 256-byte rows (head dim 128) only when
    the grid is about one wave (<= 256 programs), since the tiles leave room for two programs per
    SM; with wider rows (float32 at head dim 128) never.
    """
    return row_bytes <= 128 or (row_bytes <= 256 and programs <= _ONE_WAVE)


def default_transposed(prefetch: bool, programs: int, row_bytes: int, row_gather: bool = False,
                       splits: int = 1) -> bool:
    """Whether the decode kernel computes the transposed products.

    Row gather: with rows wider than 128 bytes (head dim 128 in 16 bits), and with narrower rows
    when the sequences alone make more than two waves (> 512 programs, one split). Measured on an
    H100 with bfloat16, same runs (tune_kernels.py): at 32/8/128 heads 2,746-3,038 GB/s against
    2,709-3,011 without at the six shapes of >= 64k positions (9% ahead at 32 x 8192, within 1%
    either way at the other five); at head dim 64, +2-6% at 32/8/64 x 128 sequences (1,024 programs), 1-4% slower at up to
    512 programs (32/8/64 x 32 and fewer sequences) and 1-7% slower at every 9/3/64 shape (384
    programs, or 768 in two splits at 128 x 8192).
    Block gather: only on top of prefetch, and with head dim 64 in 16 bits only beyond one wave:
    with prefetch +3-6% at 32/8/128 heads (32 x 2048, 8 x 8192) and at 32/8/64 x 128 sequences;
    2-3% slower at 32/8/64 x 32 sequences (256 programs); without prefetch up to 30% slower.
    """
    if row_gather:
        return row_bytes > 128 or (programs > 2 * _ONE_WAVE and splits == 1)
    return prefetch and (row_bytes > 128 or programs > _ONE_WAVE)


def default_stages(row_gather: bool, step_bytes: int, one_per_sm: bool = False) -> int:
    """Triton's num_stages for the decode loop: 5 with the row gather when a step's K and V tiles
    take at most 32 KiB (Triton then keeps three steps' tiles in flight in shared memory, 105 KB
    at head dim 128 in bfloat16), else 2; 7 with the row gather and one program per SM
    (`default_one_per_sm`: 32 KiB steps, about 106 KB of shared memory at head dim 64).

    Measured on an H100 with bfloat16 at 32/8/128 heads and the six shapes of >= 64k positions
    (tune_kernels.py, same runs): with 5 stages the row gather read 2,742-3,030 GB/s against
    2,555-2,978 with 2 (two steps in flight) and 2,519-2,937 for the block gather with prefetch;
    in another run 2,746-3,038 against 2,578-3,014 with 7 (four steps, 138 KB: one program per SM).
    """
    if row_gather and one_per_sm:
        return 7
    return 5 if row_gather and step_bytes <= 32 * 1024 else 2


_SMS = 132  # streaming multiprocessors of an H100 (SXM)
_ONE_PER_SM_STEP_BYTES = 32 * 1024  # K and V of one loop step with one program per SM


def default_one_per_sm(programs: int) -> bool:
    """Whether the decode kernel, left to its defaults (no num_splits), gives each sequence and kv
    head one program (no split, so no merge launch), on an SM of its own, and loop steps of 32 KiB
    of K and V (128 positions at head dim 64 in 16 bits, 64 at 128) with 7 stages: where the
    sequences and kv heads alone make from 96 programs up to one per SM (132 on an H100). Fewer leave
    too many SMs idle; more put two programs on some SMs and one on others.

    Measured on an H100 with bfloat16 against the split launch (tune_kernels.py, same runs): 1.01-1.25x
    its bandwidth at all 11 shapes with 96 or 128 programs (9/3/64 heads x 32 sequences at 512,
    2,048 and 8,192 positions; 32/8/64 and 32/8/128 x 12 sequences at 2,048 and x 16 at 512, 2,048
    and 8,192), e.g. 2,400 against 2,225 GB/s at 9/3/64 x 32 x 2,048; 0.86-0.93x at 64 programs,
    1.01x and 0.96x at 72, 0.95x at 144, 1.01x and 0.98x at 192, and 0.86-1.01x against the one
    split of 64 positions and 5 stages at 256 programs and more.
    """
    return 96 <= programs <= _SMS


def default_heads_per_program(programs: int, kv_heads: int, group: int, positions: int) -> int:
    """How many kv heads the decode kernel packs into one program by default: where the sequences
    and kv heads make at least 512 programs and the block table holds at most 512 positions, the
    largest power of two up to 4 that divides K, keeps the packed query rows (heads x G) within one
    16-row tile and leaves at least 256 programs; else 1. The programs of such short contexts each
    read little (128 KiB of K and V at head dim 64, 512 positions) and pay their prologue and
    epilogue as often; packed, each reads 2-4 times as much with the same tile.

    Measured on an H100 with bfloat16 (tune_kernels.py, tune_kernels_decode_packed_*_H100.json): in
    one run, against the kernel file before at its defaults, at 32/8/64 heads with 128 sequences
    of 128, 256 and 512 positions 2,258 / 2,561 / 2,755 GB/s against 2,011 / 2,383 / 2,705 (1.12x,
    1.07x, 1.02x), 256 x 256 1.03x, 64 x 512 (2 heads) 1.01x; at 32/8/128, 128 x 256 1.03x, 128 x 512
    1.01x, 64 x 512 1.02x. In the sweeps before: beyond 512 positions it stopped paying (0.98-1.01x
    at 2,048 and 8,192 with 128 sequences); with fewer programs it cost (32 x 512 at 32/8/64: 0.97x
    with 2 heads, 0.84-0.87x with 4); 8 heads (32 query rows) were never ahead of 4.
    """
    if programs < 2 * _ONE_WAVE or positions > 512:
        return 1
    heads = 1
    while (heads < 4 and kv_heads % (2 * heads) == 0 and 2 * heads * group <= _MIN_ROWS
           and programs // (2 * heads) >= _ONE_WAVE):
        heads *= 2
    return heads


def default_blocks_per_step(block_size: int, max_blocks: int, positions: int = 64) -> int:
    """Blocks per loop step covering `positions` positions (64: the fastest decode step in the H100
    sweep; prefill uses 128), dividing the block-table width."""
    blocks = max(1, positions // block_size)
    while max_blocks % blocks:
        blocks //= 2
    return blocks


_MAX_POOL_SIZE = 2**31 - 1  # the kernels address a pool with 32-bit element offsets


def _check_inputs(q, k_pool, block_tables, lengths, q_positions=None, *, kv_heads: int):
    """Clear errors for inputs that the kernels would otherwise read out of bounds or group wrongly."""
    if k_pool.size > _MAX_POOL_SIZE:
        raise ValueError(f"a pool of {k_pool.size:,} elements {tuple(k_pool.shape)} is beyond the kernels' 32-bit "
                         f"offsets (at most {_MAX_POOL_SIZE:,}); use the reference path (jaxpaged.attention) "
                         "or fewer blocks")
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    if head_dim != k_pool.shape[-1] or heads % kv_heads:
        raise ValueError(f"q {q.shape} does not fit pools {k_pool.shape}: the head dims must agree and the "
                         f"query heads must be a multiple of the {kv_heads} kv heads")
    expected = {"block_tables": (block_tables, (batch, block_tables.shape[-1])), "lengths": (lengths, (batch,))}
    if q_positions is not None:
        expected["q_positions"] = (q_positions, q.shape[:2])
    for name, (x, shape) in expected.items():
        if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers of shape {shape} (from q {q.shape}), got {x.dtype}{list(x.shape)}")


def _layer_ref(layer) -> jax.Array:
    """The layer index as the kernels take it, [1] int32; a clear error for one that is not a scalar
    integer. (The kernels clamp it into the pools' layers, as the reference path's gather does.)"""
    layer = jnp.asarray(layer)
    if layer.shape != () or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"layer must be a scalar integer, got {layer.dtype}{list(layer.shape)}")
    return layer.astype(jnp.int32).reshape(1)


LAYOUTS = {"KNPD": "[L, K, N, P, D]", "NPKD": "[L, N, P, K, D]"}


def _pool_view(k_pool, v_pool, layout: str, row_gather: bool):
    """The pools as the kernels read them, their BlockSpec (whole pools, or kv head h on grid axis 1,
    which is the kv head in both kernels' grids), and the static sizes (L, N, P, K, flat_heads).

    KNPD pools, [L, K, N, P, D] (jaxpaged's, head-major), are read flat, as [L * K * N * P, D] rows
    of positions or [L * K * N, P, D] blocks, the kernel finding its layer's and kv head's blocks
    (flat_heads = K); NPKD pools, [L, N, P, K, D] (the layout before), as [L * N * P, K, D] rows or
    [L * N, P, K, D] blocks with head h picked by the BlockSpec (flat_heads = 0). Both views are free
    reshapes.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"k_pool and v_pool differ: {k_pool.shape} {k_pool.dtype}, {v_pool.shape} {v_pool.dtype}")
    if k_pool.ndim != 5:
        raise ValueError(f"{layout} pools must be {LAYOUTS[layout]}, got {tuple(k_pool.shape)}")
    if layout == "KNPD":
        num_layers, kv_heads, num_blocks, block_size, head_dim = k_pool.shape
        flat_heads = kv_heads
        total = num_layers * kv_heads * num_blocks
        shape = (total * block_size, head_dim) if row_gather else (total, block_size, head_dim)
        spec = pl.BlockSpec(shape, lambda _, h, __: (0,) * len(shape))
    else:
        num_layers, num_blocks, block_size, kv_heads, head_dim = k_pool.shape
        flat_heads = 0
        total = num_layers * num_blocks
        if row_gather:
            shape = (total * block_size, kv_heads, head_dim)
            spec = pl.BlockSpec((total * block_size, None, head_dim), lambda _, h, __: (0, h, 0))
        else:
            shape = (total, block_size, kv_heads, head_dim)
            spec = pl.BlockSpec((total, block_size, None, head_dim), lambda _, h, __: (0, 0, h, 0))
    pools = (k_pool.reshape(shape), v_pool.reshape(shape))
    return pools, spec, (num_layers, num_blocks, block_size, kv_heads, flat_heads)


@functools.partial(jax.jit, static_argnames=("layout", "blocks_per_step", "num_splits", "num_warps",
                                             "num_stages", "mask_tail_only", "prefetch", "eviction_policy", "transposed",
                                             "masked_loads", "row_gather", "heads_per_program", "interpret"))
def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer, block_tables: jax.Array,
                           lengths: jax.Array, *, layout: str = "KNPD", blocks_per_step: int | None = None,
                           num_splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                           mask_tail_only: bool = False, prefetch: bool | None = None,
                           eviction_policy: str | None = None, transposed: bool | None = None,
                           masked_loads: bool | None = None, row_gather: bool | None = None,
                           heads_per_program: int | None = None, interpret: bool = False) -> jax.Array:
    """Attention of one query per sequence over its cached K/V, read from the pools in place.

    Args:
      q: [B, H, D].
      k_pool, v_pool: all layers' pools as the cache holds them, [L, K, N, P, D] (layout "KNPD",
        jaxpaged's), or [L, N, P, K, D] ("NPKD", the layout before, kept for the comparison).
      layer: [] int, the layer to read (clamped into [0, L)).
      block_tables: [B, M] int32 block ids; entries past a sequence's blocks may hold any id in
        [0, N] (N is the sentinel).
      lengths: [B] int32 positions to attend to (0 for padding rows, which return zeros).
      blocks_per_step: blocks loaded per loop step, dividing M; default 64 positions' worth, or 32 KiB
        of K and V with one program per SM (`default_one_per_sm`).
      num_splits: programs per sequence and kv head; default one where the sequences and kv heads
        make 96 to 132 programs (`default_one_per_sm`), else from the grid (`default_launch`). With
        one split the kernel writes the normalised output itself; with more, they are merged after it.
      num_stages: Triton's software-pipelining depth; default `default_stages`.
      mask_tail_only: mask only the loop step that holds the length (the others are inside it);
        False masks every step.
      prefetch: issue each step's loads one step ahead, in the loop carry; default: never with the
        row gather, else from the grid (`default_launch`).
      eviction_policy: cache hint for the K/V loads ("evict_first", ...), None for the default.
      transposed: compute K q^T and V^T p^T (the chunk as the dots' M side) instead of q K^T and p V;
        default from the launch (`default_transposed`).
      masked_loads: V rows past the length load as zeros (a masked load) rather than being zeroed
        after the load (in interpret mode they are zeroed after it); default: with the row gather
        or the transposed products.
      row_gather: gather K/V as [chunk, D] rows of positions (the pools viewed as rows), instead of
        [blocks, P, D] blocks reshaped in the kernel; default `default_row_gather`.
      heads_per_program: kv heads packed into one program (a power of two dividing K; head-major pools
        and the row gather only): their heads x G query rows share one tile and each step gathers
        heads x chunk K/V rows (chunk: the default step's positions / heads), the logits of rows and
        positions of different kv heads masked out. With G below 16 the tile's rows are padding
        anyway, so the products cost no more per byte. Default `default_heads_per_program` where
        packing is possible (else 1).

    Returns:
      [B, H, D] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    _, _, (_, _, block_size, kv_heads, _) = _pool_view(k_pool, v_pool, layout, row_gather=True)  # checks the layout
    _check_inputs(q, k_pool, block_tables, lengths, kv_heads=kv_heads)
    max_blocks = block_tables.shape[1]
    row_bytes = head_dim * k_pool.dtype.itemsize
    group = num_heads // kv_heads
    if heads_per_program is None:
        packable = layout == "KNPD" and row_gather is not False and not prefetch
        heads_per_program = default_heads_per_program(batch * kv_heads, kv_heads, group, max_blocks * block_size) \
            if packable else 1
    if heads_per_program < 1 or kv_heads % heads_per_program or heads_per_program & (heads_per_program - 1):
        raise ValueError(f"heads_per_program={heads_per_program} must be a power of two dividing the {kv_heads} kv heads")
    packed = heads_per_program > 1
    if packed and (layout != "KNPD" or row_gather is False or prefetch):
        raise ValueError("heads_per_program > 1 takes head-major (KNPD) pools and the row gather, without prefetch")
    kv_groups = kv_heads // heads_per_program  # programs per sequence and split
    one_per_sm = num_splits is None and default_one_per_sm(batch * kv_groups)
    num_splits = 1 if one_per_sm else num_splits
    positions = (_ONE_PER_SM_STEP_BYTES // (2 * row_bytes) if one_per_sm else 64) // heads_per_program
    blocks_per_step = blocks_per_step or default_blocks_per_step(block_size, max_blocks, positions)
    if max_blocks % blocks_per_step:
        raise ValueError(f"the block-table width {max_blocks} must be a multiple of blocks_per_step={blocks_per_step}")
    rows = max(_MIN_ROWS, 1 << (heads_per_program * group - 1).bit_length())
    steps = max_blocks // blocks_per_step
    if row_gather is None:
        row_gather = packed or default_row_gather(
            steps, num_splits or default_launch(batch, kv_groups, head_dim, steps, k_pool.dtype.itemsize)[0])
    (k_pool, v_pool), pool_spec, (num_layers, num_blocks, _, _, flat_heads) = _pool_view(
        k_pool, v_pool, layout, row_gather)
    if num_splits:
        splits, auto_prefetch = num_splits, default_prefetch(batch * kv_groups * num_splits, row_bytes)
    else:
        splits, auto_prefetch = default_launch(batch, kv_groups, head_dim, steps, k_pool.dtype.itemsize, row_gather)
    prefetch = auto_prefetch and not row_gather if prefetch is None else prefetch
    if transposed is None:
        transposed = default_transposed(prefetch, batch * kv_groups * splits, row_bytes, row_gather, splits)
    masked_loads = transposed or row_gather if masked_loads is None else masked_loads
    step_bytes = 2 * heads_per_program * blocks_per_step * block_size * row_bytes
    num_stages = num_stages or default_stages(row_gather, step_bytes, one_per_sm)
    steps_per_split = -(-steps // splits)

    layer = _layer_ref(layer)
    kernel = functools.partial(_kernel, group=group, rows=rows, block_size=block_size, blocks_per_step=blocks_per_step,
                               steps_per_split=steps_per_split, num_blocks=num_blocks, num_layers=num_layers,
                               flat_heads=flat_heads, scale=_softmax_scale(head_dim), mask_tail_only=mask_tail_only,
                               prefetch=prefetch, eviction_policy=eviction_policy, transposed=transposed,
                               masked_loads=masked_loads and not interpret, row_gather=row_gather,
                               heads=heads_per_program)
    if splits == 1:  # every program writes its rows of sequence b's [H, D]
        out_specs = pl.BlockSpec((None, num_heads, head_dim), lambda b, h, s: (b, 0, 0))
        out_shape = jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype)
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
            pool_spec,
            pool_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxpaged_decode",
    )(layer, lengths.astype(jnp.int32), block_tables.astype(jnp.int32), q, k_pool, v_pool)

    if splits == 1:
        return out
    return _merge_splits(*out, splits=splits, group=heads_per_program * group, num_heads=num_heads, dtype=q.dtype,
                         interpret=interpret)


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
    m = plgpu.load(m_ref.at[:, row], mask=real, other=_MASK)
    l = plgpu.load(l_ref.at[:, row], mask=real, other=0.0)
    o = plgpu.load(o_ref.at[:, row, :], mask=jnp.broadcast_to(real[:, None], (padded, head_dim)), other=0.0)
    weight = jnp.exp2(m - m.max())  # [S'] (the maxima are in base-2 units, as `_update` keeps them)
    total = jnp.maximum((l * weight).sum(), jnp.finfo(jnp.float32).tiny)
    out_ref[...] = ((o * weight[:, None]).sum(axis=0) / total).astype(out_ref.dtype)


def _merge_splits(o, m, l, *, splits: int, group: int, num_heads: int, dtype, interpret: bool,
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


def supported(head_dim: int, block_size: int, pool_size: int = 0) -> bool:
    """Whether the kernels take this shape (pool_size: elements of one whole K or V pool, all layers);
    the caller falls back to the reference otherwise."""
    return head_dim in (64, 128, 256) and block_size >= 8 and pool_size <= _MAX_POOL_SIZE


def _prefill_kernel(layer_ref, lengths_ref, tables_ref, q_pos_ref, q_ref, k_ref, v_ref, *out_refs,
                    group: int, rows: int, tokens: int, num_q_blocks: int, splits: int, heavy_first: bool,
                    block_size: int, blocks_per_step: int, num_blocks: int, num_layers: int, flat_heads: int,
                    scale: float, row_gather: bool, masked_loads: bool):
    """One program: `tokens` consecutive queries of one sequence x the G query heads of one kv head,
    causal, over one of `splits` parts of the positions they see; grid (splits x query blocks, K, B).

    Its tile of `rows` rows (a power of two >= tokens * G) holds query t's head g at row t * G + g;
    the rows past tokens * G, and those of tokens past T, repeat the tile's last real row, so they
    compute its values again and write them to its place. The rows are gathered from q viewed as
    [T * H, D] and scattered back into o viewed the same way (both [B, T, H, D] as they come: no
    transpose runs around the kernel), and the q tile stays in shared memory as the first operand
    of both dots. heavy_first: the query blocks run from the last (the longest causal prefix) to
    the first.

    Each loop step finds the K/V rows of the next (from its blocks' ids), so no load in a step
    waits on a table load of the same step. Loop steps wholly before every row's causal limit and
    inside the length run unmasked; the rest mask by the causal test alone, the query positions
    being clamped below the length once (masked_loads: V rows past the length load as zeros).
    Padding queries (position -1) return zeros. With one split, out_refs is o; with more, each
    split writes its unnormalised o, running max and sum (o, m, l) for `_merge_prefill_splits`.
    """
    split, j = pl.program_id(0) // num_q_blocks, pl.program_id(0) % num_q_blocks
    j = num_q_blocks - 1 - j if heavy_first else j
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
    ids_of = functools.partial(_load_ids, tables_ref=tables_ref,
                               layer_base=_layer_base(layer_ref, num_blocks, num_layers, flat_heads),
                               blocks_per_step=blocks_per_step, num_blocks=num_blocks,
                               row_gather=block_size if row_gather else 0, rows_from_blocks=True)

    def steps(masked):
        def body(i, carry):  # the K/V rows of step i were found in step i - 1
            ids, softmax = carry
            live = _live(i, length, chunk) if masked and masked_loads else None
            k, v = _load_kv(ids, k_ref, v_ref, eviction_policy=None, live=live)
            softmax = _update(softmax, q, k, v, i, length, q_pos, scale=scale, masked=masked, v_zeroed=live is not None)
            return ids_of(jnp.minimum(i + 1, jnp.maximum(last - 1, start))), softmax
        return body

    carry = jax.lax.fori_loop(start, full, steps(False), (ids_of(start), _empty_carry(*q.shape)))
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


def _merge_prefill_splits(o, m, l, dtype):
    """The prefill splits' [S, B, T * H, D] unnormalised outputs, [S, B, T * H] running maxima (base 2)
    and sums, merged: [B, T * H, D] in dtype (XLA, after the kernel)."""
    weight = jnp.exp2(m - m.max(axis=0, keepdims=True))
    total = (l * weight).sum(axis=0)
    return ((o * weight[..., None]).sum(axis=0) / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]).astype(dtype)


def default_prefill_splits(programs: int, steps: int, row_bytes: int) -> int:
    """Splits of the positions each query block sees. By shared memory an H100 holds _SMS x 4
    programs of the default tile at K/V rows of <= 128 bytes (head dim 64 in 16 bits: 57 KB each),
    x 2 at wider rows (114 KB); `full` counts that, and on the card the registers allow as many (128
    a thread at head dim 64, Nsight Compute, ncu_prefill_regs_8x2048_9_3_64_H100.txt; 146 before the
    lighter mask, which allowed 3). With a third of `full` or fewer programs (query blocks x
    kv heads x sequences), enough splits to fill it, each keeping >= 8 of the `steps` loop steps
    (the table's capacity), at most 8; else 1. Measured on an H100
    (tune_kernels_prefill_splits_*_H100.json, 9/3/64 heads): 147 programs over a 7k prefix, 4 splits
    1.47x one; 75 over 3.5k, 4 splits 1.59x, 8 1.54x; and at 32/8/128, 256 programs over 3.5k,
    2 splits 0.88x one, so that one is not split."""
    full = _SMS * (4 if row_bytes <= 128 else 2)
    if 3 * programs > full:
        return 1
    return max(1, min(8, -(-full // programs), steps // 8))


@functools.partial(jax.jit, static_argnames=("layout", "blocks_per_step", "query_rows", "num_warps", "num_stages",
                                             "row_gather", "heavy_first", "num_splits", "interpret"))
def paged_prefill_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer, block_tables: jax.Array,
                            lengths: jax.Array, q_positions: jax.Array, *, layout: str = "KNPD",
                            blocks_per_step: int | None = None, query_rows: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, row_gather: bool = True, heavy_first: bool = True,
                            num_splits: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention of T queries per sequence (prefill, or a chunk on a cached prefix) over the pools.

    Query t of sequence b sits at q_positions[b, t] and sees cached positions <= it and < lengths[b]
    (its own K/V must already be in the pools). One launch: the kernel reads q and writes the
    output in their [B, T, H, D] layout.

    Args:
      q: [B, T, H, D].
      k_pool, v_pool, layer, layout: as for `paged_decode_attention`.
      block_tables: [B, M] int32; lengths: [B] int32; q_positions: [B, T] int32 (-1: a padding query).
      blocks_per_step, query_rows, num_warps, num_stages: the tile (blocks per loop step; rows, i.e.
        tokens x query heads of one kv head, per program, a power of two >= 16), warps per program
        and pipeline stages. By default 64 positions x 64 rows (one warpgroup's MMA tile) with 4
        warps and 3 stages, or 2 stages where K/V rows are wider than 256 bytes (float32 at head
        dim 128, or head dim 256), so the stages fit in shared memory. On an H100 (bfloat16, 32/8/128
        heads, tune_kernels_prefill_best_H100.json) that tile with the row layout of q gives 19.59 M
        tokens/s at 8 x 2048 and 5.64 M at 1 x 8192 where the tile before, 128 x 128 with 8 warps and
        2 stages (q loaded as a window), gave 17.09 M and 5.37 M; 4 stages 14.39 M and 4.35 M.
      row_gather: gather K/V as [chunk, D] rows of positions, as the decode kernel does, rather than
        [blocks, P, D] blocks: 11.87 M against 11.39 M tokens/s at 8 x 2048, 4.28 M against 4.15 M
        at 1 x 8192 (H100, bfloat16, 32/8/128 heads, same run of tune_kernels.py).
      heavy_first: launch the query blocks with the longest causal prefix first, rather than in
        order: with the default tile, 20.08 M against 19.59 M tokens/s at 8 x 2048 and 5.77 M against
        5.64 M at 1 x 8192 on an H100 (same run as above); with the tile before, 1.5-2% slower.
      num_splits: parts of the positions each query block sees, run as programs of their own and
        merged after (flash-decoding, for few programs over a long cached prefix); default
        `default_prefill_splits`.

    Returns:
      [B, T, H, D] in q's dtype; padding queries return zeros.
    """
    batch, num_q, num_heads, head_dim = q.shape
    (k_pool, v_pool), pool_spec, (num_layers, num_blocks, block_size, kv_heads, flat_heads) = _pool_view(
        k_pool, v_pool, layout, row_gather)
    _check_inputs(q, k_pool, block_tables, lengths, q_positions, kv_heads=kv_heads)
    max_blocks = block_tables.shape[1]
    wide = k_pool.dtype.itemsize * head_dim > 256  # float32 at head dim 128: fewer stages fit shared memory
    blocks_per_step = blocks_per_step or default_blocks_per_step(block_size, max_blocks, positions=64)
    query_rows = query_rows or 64
    if query_rows < _MIN_ROWS or query_rows & (query_rows - 1):
        raise ValueError(f"query_rows must be a power of two >= {_MIN_ROWS}, got {query_rows}")
    num_warps = num_warps or 4
    num_stages = num_stages or (2 if wide else 3)
    group = num_heads // kv_heads
    rows = max(query_rows, 1 << (group - 1).bit_length())
    tokens = rows // group  # per program
    num_q_blocks = -(-num_q // tokens)
    steps = -(-max_blocks // blocks_per_step)
    splits = num_splits or default_prefill_splits(num_q_blocks * kv_heads * batch, steps, head_dim * q.dtype.itemsize)

    layer = _layer_ref(layer)
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
                               splits=splits, heavy_first=heavy_first, block_size=block_size,
                               blocks_per_step=blocks_per_step, num_blocks=num_blocks, num_layers=num_layers,
                               flat_heads=flat_heads, scale=_softmax_scale(head_dim), row_gather=row_gather,
                               masked_loads=not interpret)  # (interpret mode can not mask a gather: V is zeroed after)
    out = pl.pallas_call(
        kernel,
        grid=(splits * num_q_blocks, kv_heads, batch),  # the query blocks of one sequence and kv head launch together
        in_specs=[
            pl.BlockSpec((1,), lambda j, h, b: (0,)),
            pl.BlockSpec((1,), lambda j, h, b: (b,)),
            pl.BlockSpec((None, max_blocks), lambda j, h, b: (b, 0)),
            pl.BlockSpec((None, num_q), lambda j, h, b: (b, 0)),
            as_rows,
            pool_spec,
            pool_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxpaged_prefill",
    )(layer, lengths.astype(jnp.int32), block_tables.astype(jnp.int32), q_positions.astype(jnp.int32),
      q.reshape(*flat, head_dim), k_pool, v_pool)
    return (out if splits == 1 else _merge_prefill_splits(*out, q.dtype)).reshape(q.shape)

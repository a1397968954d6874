"""Pure jitted functions over the paged state: allocate, write (scatter), gather, free.

Every function that changes the state takes it first, returns a new one, and is jitted with the
state donated, so XLA updates the pools in place; the caller must drop its reference to the old
state. Nothing loops per block: allocation pops a whole batch's blocks off the free-list stack at
once (a cumsum gives each sequence its slice of the stack).

Axis letters: L layers, N blocks, P positions per block, K kv heads, D head dim, B sequences in a batch
(each names a row of the block table by `seq_idx`), T tokens per sequence in a chunk, S gathered
positions, M blocks per sequence.

Failure is reported, never silent: functions that can run out of blocks return `ok`, a bool
scalar, and when it is False they return the state unchanged (same contents) and drop the writes.

One rule for indices that name nothing, in every function: they are padding.
- A sequence index outside [0, B) (negative, B, or above) is a padding row: it takes no block,
  writes nothing, advances no length and reads as empty; the other rows of the call go ahead.
- A block id outside [0, N) is ignored (`free_blocks`); a slot outside [0, N * P) writes nothing
  (`write_slots`); a position outside a row's M * P positions gets no slot (`slot_mapping`).
- Counts are clipped to [0, T] (num_tokens; T the chunk, or max_new_tokens), never negative.
A call is refused, ok=False and nothing changed, when it names a real row twice (padding rows
may repeat; `gather_kv` may read a row twice), when a traced layer lies outside [0, L), when the
pool or a block-table row is full, or when a block would be freed twice. Where Python can see
the mistake, it raises before any work: a layer given as a Python int outside [0, L)
(IndexError), a negative static size (`count`, `max_new_tokens`, `max_len`, `num_chunk_tokens`:
ValueError), wrong shapes or dtypes, and a state donated to an earlier call (ValueError).
`gather_kv` and `write_slots` return no flag: a traced layer out of range reads as empty and
writes nothing there.

Checks inside jit are vector operations on the index arrays ([B], [B, T] or [B, M]), never on
the pools.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpaged import checks
from jaxpaged.quant import decode, encode
from jaxpaged.state import BlockAllocatorState, PagedKVState


def _ceil_div(a, b):
    return (a + b - 1) // b


def _num_layers(state: PagedKVState) -> int:
    return state.config.num_layers


# ----------------------------------------------------------------------------- the allocator


def _pop_blocks(alloc: BlockAllocatorState, counts: jax.Array, width: int):
    """Pops counts[b] blocks for each b off the free stack, all or none.

    Returns (allocator, ids [B, width] with N past counts[b], fits).
    """
    num_blocks = alloc.free_ids.shape[0]
    total = jnp.sum(counts)
    fits = total <= alloc.num_free
    first = jnp.cumsum(counts) - counts  # [B] where each sequence's run starts, from the top
    j = jnp.arange(width, dtype=jnp.int32)
    take = (j[None, :] < counts[:, None]) & fits  # [B, width]
    stack_pos = alloc.num_free - 1 - (first[:, None] + j[None, :])
    ids = jnp.where(take, alloc.free_ids.at[stack_pos].get(mode="fill", fill_value=num_blocks), num_blocks)
    new_alloc = alloc.replace(
        num_free=alloc.num_free - jnp.where(fits, total, 0),
        ref_counts=alloc.ref_counts.at[ids].add(1, mode="drop"),
    )
    return new_alloc, ids, fits


def _release_blocks(alloc: BlockAllocatorState, ids: jax.Array):
    """Drops one reference per entry of `ids` (any shape; entries outside [0, N) ignored), all or none.

    Blocks whose count reaches 0 go back on the free stack. Returns (allocator, ok); ok is False,
    and nothing changes, when some block would drop below zero references (a double free).
    """
    num_blocks = alloc.free_ids.shape[0]
    ids = jnp.where(checks.in_range(ids, num_blocks), ids, num_blocks)  # negative ids too: none is block N-1
    drops = jnp.zeros((num_blocks,), jnp.int32).at[ids.ravel()].add(1, mode="drop")
    ok = jnp.all(drops <= alloc.ref_counts)
    drops = jnp.where(ok, drops, 0)
    ref_counts = alloc.ref_counts - drops
    became_free = (drops > 0) & (ref_counts == 0)
    push_pos = alloc.num_free + jnp.cumsum(became_free, dtype=jnp.int32) - 1
    free_ids = alloc.free_ids.at[jnp.where(became_free, push_pos, num_blocks)].set(
        jnp.arange(num_blocks, dtype=jnp.int32), mode="drop"
    )
    new_alloc = BlockAllocatorState(
        free_ids=free_ids,
        num_free=alloc.num_free + jnp.sum(became_free, dtype=jnp.int32),
        ref_counts=ref_counts,
    )
    return new_alloc, ok


@checks.guard
@functools.partial(jax.jit, static_argnames=("count",), donate_argnames=("alloc",))
def allocate_blocks(alloc: BlockAllocatorState, count: int):
    """Takes `count` free blocks. DONATES alloc.

    Args:
      count: static, >= 0 (ValueError otherwise).

    Returns:
      (allocator, ids [count] int32, ok); when ok is False nothing is taken and ids are N.
    """
    count = checks.check_int(count, "count")
    new_alloc, ids, ok = _pop_blocks(alloc, jnp.full((1,), count, jnp.int32), count)
    return new_alloc, ids[0], ok


@checks.guard
@functools.partial(jax.jit, donate_argnames=("alloc",))
def free_blocks(alloc: BlockAllocatorState, ids: jax.Array):
    """Drops one reference to each block in `ids` [n]; blocks left with none become free. DONATES alloc.

    An id outside [0, N) (negative included) is ignored; an id named twice drops two references.

    Returns:
      (allocator, ok); ok is False, and nothing changes, on a double free.
    """
    checks.check_index_array(ids, "ids", None)
    return _release_blocks(alloc, ids)


# ----------------------------------------------------------------------------- sequences


def _admit(state: PagedKVState, seq_idx, layer=0):
    """The call's rows and layer as the functions below use them, and whether the call is accepted.

    Indices naming no row become padding rows. A real row named twice, or a layer outside [0, L),
    refuses the whole call, which then runs with every row a padding row (and layer 0): nothing
    changes. Returns (rows [B], layer, accepted []).
    """
    c = state.config
    rows = checks.padding_rows(seq_idx, c.max_seqs)
    layer_ok = checks.in_range(layer, c.num_layers)
    accepted = layer_ok & ~checks.repeats_a_row(rows, c.max_seqs)
    return jnp.where(accepted, rows, c.max_seqs), jnp.where(layer_ok, layer, 0), accepted


def _check_rows(seq_idx, num_tokens=None, **batch: int) -> None:
    """Host checks of static shapes and dtypes: seq_idx (and num_tokens) are [B] integer arrays;
    `batch` may fix B (B=...)."""
    checks.check_index_array(seq_idx, "seq_idx", "B", **batch)
    if num_tokens is not None:
        checks.check_index_array(num_tokens, "num_tokens", "B", B=seq_idx.shape[0])


def _seq_lens_of(state: PagedKVState, layer, seq_idx):
    return state.table.seq_lens.at[layer, seq_idx].get(mode="fill", fill_value=0)  # [B]


def _held_blocks(state: PagedKVState, seq_idx):
    """Blocks [B] that rows seq_idx hold (0 for a padding row)."""
    c = state.config
    rows = state.table.block_ids.at[seq_idx].get(mode="fill", fill_value=c.num_blocks)  # [B, M]
    return jnp.sum(rows < c.num_blocks, axis=-1, dtype=jnp.int32)


def _reserve(state: PagedKVState, seq_idx, target_lens, max_new_blocks: int):
    """Grows each sequence's blocks to cover target_lens [B] positions. Returns (state, ok).

    seq_idx [B] holds distinct real rows and padding rows (index B) only (`_admit`)."""
    c = state.config
    held = _held_blocks(state, seq_idx)  # [B]
    needed = _ceil_div(target_lens, c.block_size)
    real_row = seq_idx < c.max_seqs  # padding rows take no blocks
    width_ok = jnp.all((needed <= c.max_blocks_per_seq) | ~real_row)
    counts = jnp.where(width_ok & real_row, jnp.maximum(needed - held, 0), 0)
    allocator, new_ids, fits = _pop_blocks(state.allocator, counts, max_new_blocks)
    cols = held[:, None] + jnp.arange(max_new_blocks, dtype=jnp.int32)[None, :]  # [B, J]
    target_rows = jnp.where(new_ids < c.num_blocks, seq_idx[:, None], c.max_seqs)
    block_ids = state.table.block_ids.at[target_rows, cols].set(new_ids, mode="drop")
    new_state = state.replace(table=state.table.replace(block_ids=block_ids), allocator=allocator)
    return new_state, fits & width_ok


@functools.partial(checks.guard, num_layers=_num_layers)
@functools.partial(jax.jit, static_argnames=("max_new_tokens",), donate_argnames=("state",))
def reserve(state: PagedKVState, seq_idx: jax.Array, num_tokens: jax.Array, layer=0, *, max_new_tokens: int):
    """Makes room for num_tokens [B] more positions past each sequence's length in `layer`. DONATES state.

    Lengths do not change; only blocks are taken. `max_new_tokens` (static, >= 0) bounds num_tokens
    and sizes the work. Real rows must be distinct; padding rows (any index outside [0, B)) take
    nothing.

    Returns:
      (state, ok); ok is False, and nothing changes, when the pool or a block-table row is full, a
      real row is named twice or a traced layer is out of range.
    """
    max_new_tokens = checks.check_int(max_new_tokens, "max_new_tokens")
    _check_rows(seq_idx, num_tokens)
    seq_idx, layer, accepted = _admit(state, seq_idx, layer)
    num_tokens = jnp.clip(num_tokens, 0, max_new_tokens)
    target = _seq_lens_of(state, layer, seq_idx) + num_tokens
    state, ok = _reserve(state, seq_idx, target, _ceil_div(max_new_tokens, state.config.block_size) or 1)
    return state, ok & accepted


def slot_mapping(state: PagedKVState, seq_idx, starts, num_tokens, num_chunk_tokens: int):
    """Flat pool slots (block * P + offset) for T positions from starts [B]; unique sentinels past num_tokens.

    Positions past num_tokens, outside the row's M * P positions or past its blocks, and every
    position of a padding row (seq_idx outside [0, B)), get no slot; nor does any position when a
    real row is named twice (two rows would share slots).

    Returns:
      slots [B, T] int32; the padding positions get N*P + (b*T + t), out of range and distinct,
      so a scatter may declare its indices unique and still drop them.
    """
    c = state.config
    seq_idx = checks.padding_rows(seq_idx, c.max_seqs)
    seq_idx = jnp.where(checks.repeats_a_row(seq_idx, c.max_seqs), c.max_seqs, seq_idx)
    return _slots(state, seq_idx, starts, num_tokens, num_chunk_tokens)


def _slots(state: PagedKVState, seq_idx, starts, num_tokens, num_chunk_tokens: int):
    """`slot_mapping` for rows seq_idx [B] already checked (a row may repeat here: the caller
    keeps the positions of its rows apart)."""
    c = state.config
    t = jnp.arange(num_chunk_tokens, dtype=jnp.int32)
    positions = starts[:, None] + t[None, :]  # [B, T]
    rows = state.table.block_ids.at[seq_idx].get(mode="fill", fill_value=c.num_blocks)  # [B, M]
    columns = jnp.clip(positions // c.block_size, 0, c.max_blocks_per_seq - 1)
    blocks = jnp.take_along_axis(rows, columns, axis=1)
    slots = blocks * c.block_size + positions % c.block_size
    sentinel = c.num_blocks * c.block_size + jnp.arange(slots.size, dtype=jnp.int32).reshape(slots.shape)
    valid = (t[None, :] < num_tokens[:, None]) & checks.in_range(positions, c.max_seq_len) & (blocks < c.num_blocks)
    return jnp.where(valid, slots, sentinel)


def write_slots(state: PagedKVState, layer, slots: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVState:
    """Scatters k, v [B, T, K, D] into `layer`'s pools at slots [B, T]; slots outside [0, N * P) are dropped.

    8-bit pools take each position's values quantised with a scale of its own per kv head, written
    to the scales [L, K, N, P] beside them, K rotated first (`jaxpaged.quant.encode`).

    Real slots must be distinct (as `slot_mapping` gives them). A layer given as a Python int must
    lie in [0, L) (IndexError); a traced one out of range writes nothing.
    """
    c = state.config
    k, v = checks.check_kv(k, v, "BTKD", c.jnp_dtype, K=c.num_kv_heads, D=c.head_dim)
    checks.check_index_array(slots, "slots", "BT", B=k.shape[0], T=k.shape[1])
    if checks.is_int(layer):
        checks.check_index(layer, c.num_layers, "layer")
    else:  # L is out of range: the scatter drops every window
        layer = jnp.where(checks.in_range(layer, c.num_layers), layer, c.num_layers)
    slots = slots.reshape(-1)  # [B * T]
    outside = c.num_blocks * c.block_size + jnp.arange(slots.size, dtype=slots.dtype)  # distinct, like slot_mapping's
    blocks, offsets = _block_and_offset(jnp.where(slots >= 0, slots, outside), c.block_size)  # no negative wraps
    pools = state.pools
    new = {}
    for name, x in (("k", k), ("v", v)):
        x = x.reshape(-1, c.num_kv_heads, c.head_dim)  # [B * T, K, D]
        if c.quantized:  # each position and head its own scale, fixed now: nothing written earlier changes
            x, scale = encode(x, c.kv_dtype, rotated=name == "k")  # [B * T, K, D], [B * T, K]
            new[name + "_scale"] = getattr(pools, name + "_scale").at[layer, :, blocks, offsets].set(
                scale, mode="drop", unique_indices=True)
        # one (block, offset) index per token, its [K, D] window strided across the heads (not K indices
        # of [D] each: on an H100, XLA's scatter of those cost tens of microseconds per layer and step at
        # batch 1); the pools keep their shape (`_block_and_offset`)
        pool = _windows(getattr(pools, name), layer, blocks, offsets, c.quantized and name == "v")
        new[name] = pool.set(x, mode="drop", unique_indices=True)
    return state.replace(pools=pools.replace(**new))


def _windows(pool: jax.Array, layer, blocks: jax.Array, offsets: jax.Array, positions_last: bool):
    """`pool.at` the [K, D] window of each (block, offset) of `layer`: indexed [..., K, D] like blocks
    and offsets, from a [L, K, N, P, D] pool, or with positions_last from 8-bit V's [L, K, N, D, P]."""
    return pool.at[layer, :, blocks, :, offsets] if positions_last else pool.at[layer, :, blocks, offsets]


def _block_and_offset(slots: jax.Array, block_size: int):
    """Flat slots (block * P + offset) as the pools' block and offset indices, to index the pools as
    they are, [L, K, N, P, D]. Indexed through a [L, K, N * P, D] reshape instead, the pools were
    copied several times per layer and step (8 pool-sized copies in a scanned loop over 30 layers,
    XLA on the CPU), where this form compiles to no copy at all. Out-of-range slots (>= N * P) give
    blocks >= N, still out of range."""
    return slots // block_size, slots % block_size


def _take_slots(state: PagedKVState, layer, seq_idx, num_tokens, num_chunk_tokens: int, *, host_blocks=False):
    """Blocks for num_tokens [B] more positions past `layer`'s lengths, and the slots they land in.
    With `host_blocks` no block is taken: the positions must lie in the blocks the rows hold.

    seq_idx and layer as `_admit` returns them (real rows distinct, which `host_blocks` callers
    guarantee themselves). Returns (state, slots [B, T], num_tokens as granted [B], ok); lengths are
    not advanced.
    """
    c = state.config
    num_tokens = jnp.where(seq_idx < c.max_seqs, jnp.clip(num_tokens, 0, num_chunk_tokens), 0)
    starts = _seq_lens_of(state, layer, seq_idx)
    if host_blocks:
        ok = jnp.all(_ceil_div(starts + num_tokens, c.block_size) <= _held_blocks(state, seq_idx))
    else:
        state, ok = _reserve(state, seq_idx, starts + num_tokens, _ceil_div(num_chunk_tokens, c.block_size))
    num_tokens = jnp.where(ok, num_tokens, 0)
    return state, _slots(state, seq_idx, starts, num_tokens, num_chunk_tokens), num_tokens, ok


@functools.partial(checks.guard, num_layers=_num_layers)
@functools.partial(jax.jit, donate_argnames=("state",))
def append(state: PagedKVState, layer, seq_idx: jax.Array, k: jax.Array, v: jax.Array, num_tokens=None):
    """Appends a chunk of tokens to each of B sequences in one layer, taking blocks as needed. DONATES state.

    Prefill is a chunk of T tokens; decode is T = 1. Works inside jit and `lax.fori_loop`.

    Args:
      state: the cache.
      layer: [] int, the layer written; a Python int must lie in [0, L) (IndexError).
      seq_idx: [B] int32 block-table rows; real rows distinct, any index outside [0, B) a padding row.
      k, v: [B, T, K, D] in the cache dtype.
      num_tokens: [B] int32, valid tokens per row (the rest is padding); default T. Clipped to [0, T].

    Returns:
      (state, ok). When ok is False (out of blocks, past the block-table width, a real row named
      twice, or a traced layer out of range) the state is returned unchanged: no block taken,
      nothing written, no length advanced.
    """
    c = state.config
    k, v = checks.check_kv(k, v, "BTKD", c.jnp_dtype, K=c.num_kv_heads, D=c.head_dim)
    if num_tokens is None:
        num_tokens = jnp.full(k.shape[:1], k.shape[1], jnp.int32)
    _check_rows(seq_idx, num_tokens, B=k.shape[0])
    seq_idx, layer, accepted = _admit(state, seq_idx, layer)
    state, slots, num_tokens, ok = _take_slots(state, layer, seq_idx, num_tokens, k.shape[1])
    state = write_slots(state, layer, slots, k, v)
    seq_lens = state.table.seq_lens.at[layer, seq_idx].add(num_tokens, mode="drop")
    return state.replace(table=state.table.replace(seq_lens=seq_lens)), ok & accepted


@checks.guard
@functools.partial(jax.jit, static_argnames=("num_chunk_tokens",), donate_argnames=("state",))
def allocate_slots(state: PagedKVState, seq_idx: jax.Array, num_tokens: jax.Array, *, num_chunk_tokens: int):
    """Takes blocks for a model step that writes every layer, once: the slot mapping. DONATES state.

    Every layer of each sequence must hold the same length (as after model steps; a row whose
    layers differ refuses the call). The new positions start at that length; every layer's length
    advances by num_tokens now, so each layer then only scatters its K/V with `write_slots` and
    attends.

    Args:
      seq_idx: [B] int32 block-table rows; real rows distinct, any index outside [0, B) a padding row.
      num_tokens: [B] int32 new positions per row, clipped to [0, num_chunk_tokens] (T, static, >= 0).

    Returns:
      (state, slots [B, T] int32, ok). When ok is False (out of blocks, past the block-table width,
      a real row named twice, or a row whose layers hold different lengths) nothing changes and
      every slot is a dropped sentinel.
    """
    num_chunk_tokens = checks.check_int(num_chunk_tokens, "num_chunk_tokens")
    _check_rows(seq_idx, num_tokens)
    seq_idx, _, accepted = _admit(state, seq_idx)
    lens = state.table.seq_lens.at[:, seq_idx].get(mode="fill", fill_value=0)  # [L, B]
    accepted &= jnp.all(lens == lens[:1])  # else a layer's length would pass the blocks taken for layer 0's
    seq_idx = jnp.where(accepted, seq_idx, state.config.max_seqs)
    state, slots, num_tokens, ok = _take_slots(state, 0, seq_idx, num_tokens, num_chunk_tokens)
    seq_lens = state.table.seq_lens.at[:, seq_idx].add(num_tokens[None, :], mode="drop")
    return state.replace(table=state.table.replace(seq_lens=seq_lens)), slots, ok & accepted


@checks.guard
@functools.partial(jax.jit, static_argnames=("num_chunk_tokens",), donate_argnames=("state",))
def reserved_slots(state: PagedKVState, seq_idx: jax.Array, num_tokens: jax.Array, *, num_chunk_tokens: int):
    """`allocate_slots` for a cache whose blocks the host gives out (`PagedKVState.host_blocks`: the
    engine's block manager writes every row's blocks into the table before a step): it takes no
    block on the device, and leaves to the host what the host guarantees (real rows distinct, every
    layer of a row at one length). DONATES state.

    The same slots and lengths as `allocate_slots` where every real row's new positions lie in the
    blocks its table row holds; else ok is False, nothing changes and every slot is a dropped
    sentinel. Its checks and the free list's bookkeeping are what `allocate_slots` spends most of
    its kernels on, once in every decode step (benchmarks/NOTES.md).

    Args and returns: as `allocate_slots`.
    """
    num_chunk_tokens = checks.check_int(num_chunk_tokens, "num_chunk_tokens")
    _check_rows(seq_idx, num_tokens)
    rows = checks.padding_rows(seq_idx, state.config.max_seqs)
    state, slots, num_tokens, ok = _take_slots(state, 0, rows, num_tokens, num_chunk_tokens, host_blocks=True)
    seq_lens = state.table.seq_lens.at[:, rows].add(num_tokens[None, :], mode="drop")
    return state.replace(table=state.table.replace(seq_lens=seq_lens)), slots, ok


@checks.guard
@functools.partial(jax.jit, static_argnames=("tile_tokens", "max_tokens"), donate_argnames=("state",))
def allocate_packed_slots(state: PagedKVState, seq_idx: jax.Array, num_tokens: jax.Array, tile_row: jax.Array,
                          tile_start: jax.Array, *, tile_tokens: int, max_tokens: int):
    """`allocate_slots` for chunks of ragged lengths cut into tiles: the slots come as rows of one
    tile each, so no shape depends on the longest chunk. DONATES state.

    Chunk c (table row seq_idx[c], num_tokens[c] new positions) is cut into tiles of Q tokens;
    tile j holds positions tile_start[j] .. tile_start[j] + Q - 1 of chunk tile_row[j] (counted
    from the chunk's first new position). Lengths advance by num_tokens as `allocate_slots` does.

    Args:
      seq_idx: [C] int32 block-table rows; real rows distinct, any index outside [0, B) a padding row.
      num_tokens: [C] int32, clipped to [0, max_tokens].
      tile_row: [Bt] int32, each tile's chunk (outside [0, C): a padding tile).
      tile_start: [Bt] int32, multiples of Q; the tiles of a chunk distinct.
      tile_tokens: Q, static; max_tokens: static bound on num_tokens (the blocks taken per row).

    Returns:
      (state, Step fields of the tiles: seq_idx [Bt], positions [Bt, Q], num_tokens [Bt], slots
      [Bt, Q], ok). When ok is False (out of blocks, past the block-table width, a real row or a
      tile named twice, a tile start off the tile grid, a row whose layers differ) nothing changes
      and every slot is a dropped sentinel.
    """
    c = state.config
    _check_rows(seq_idx, num_tokens)
    _check_rows(tile_row, tile_start)
    seq_idx, _, accepted = _admit(state, seq_idx)
    lens = state.table.seq_lens.at[:, seq_idx].get(mode="fill", fill_value=0)  # [L, C]
    accepted &= jnp.all(lens == lens[:1])
    chunks = seq_idx.shape[0]
    real_tile = checks.in_range(tile_row, chunks)
    tiles_per_chunk = _ceil_div(max_tokens, tile_tokens)
    accepted &= jnp.all(~real_tile | ((tile_start % tile_tokens == 0) & (tile_start >= 0) & (tile_start < max_tokens)))
    tile_key = jnp.where(real_tile, tile_row * tiles_per_chunk + tile_start // tile_tokens, -1)
    accepted &= ~checks.repeats_a_row(tile_key, chunks * tiles_per_chunk)
    seq_idx = jnp.where(accepted, seq_idx, c.max_seqs)
    num_tokens = jnp.where(seq_idx < c.max_seqs, jnp.clip(num_tokens, 0, max_tokens), 0)
    starts = lens[0]
    state, ok = _reserve(state, seq_idx, starts + num_tokens, _ceil_div(max_tokens, c.block_size))
    num_tokens = jnp.where(ok, num_tokens, 0)
    tile_row = jnp.where(real_tile, tile_row, chunks)
    tile_seq = seq_idx.at[tile_row].get(mode="fill", fill_value=c.max_seqs)
    tile_first = starts.at[tile_row].get(mode="fill", fill_value=0) + tile_start
    tile_count = jnp.clip(num_tokens.at[tile_row].get(mode="fill", fill_value=0) - tile_start, 0, tile_tokens)
    slots = _slots(state, tile_seq, tile_first, tile_count, tile_tokens)
    seq_lens = state.table.seq_lens.at[:, seq_idx].add(num_tokens[None, :], mode="drop")
    positions = tile_first[:, None] + jnp.arange(tile_tokens, dtype=jnp.int32)[None, :]
    return (state.replace(table=state.table.replace(seq_lens=seq_lens)), tile_seq, positions, tile_count, slots,
            ok & accepted)


@functools.partial(checks.guard, num_layers=_num_layers)
@functools.partial(jax.jit, static_argnames=("max_len",))
def gather_kv(state: PagedKVState, layer, seq_idx: jax.Array, *, max_len: int):
    """Reads B sequences of one layer as contiguous, zero-padded arrays.

    Positions at or past a sequence's length read as 0, whatever the block holds: a freed or
    reused block never shows its previous owner's data. 8-bit pools are read dequantised (K rotated
    back), in the config's dtype.

    Args:
      layer: [] int; a Python int must lie in [0, L) (IndexError), a traced one out of range
        reads every row as empty.
      seq_idx: [B] int32 block-table rows (any index outside [0, B) is a padding row, which reads
        as empty); a row may be read twice.
      max_len: S, static, >= 0; positions past it are not read.

    Returns:
      (k [B, S, K, D], v [B, S, K, D], seq_lens [B] int32).
    """
    c = state.config
    max_len = checks.check_int(max_len, "max_len")
    _check_rows(seq_idx)
    seq_idx = checks.padding_rows(seq_idx, c.max_seqs)
    layer_ok = checks.in_range(layer, c.num_layers)
    layer = jnp.where(layer_ok, layer, 0)
    seq_lens = jnp.where(layer_ok, _seq_lens_of(state, layer, seq_idx), 0)  # a layer out of range reads as empty
    positions = jnp.arange(max_len, dtype=jnp.int32)
    rows = state.table.block_ids.at[seq_idx].get(mode="fill", fill_value=c.num_blocks)  # [B, M]
    blocks = rows.at[:, positions // c.block_size].get(mode="fill", fill_value=c.num_blocks)  # [B, S]
    blocks = jnp.where(positions[None, :] < seq_lens[:, None], blocks, c.num_blocks)  # past the length: none
    offsets = jnp.broadcast_to(positions % c.block_size, blocks.shape)
    k, v = (_windows(pool, layer, blocks, offsets, positions_last).get(mode="fill", fill_value=0)  # [B, S, K, D]
            for pool, positions_last in ((state.pools.k, False), (state.pools.v, c.quantized)))
    if c.quantized:
        k, v = (decode(x, scale.at[layer, :, blocks, offsets].get(mode="fill", fill_value=0), c.jnp_dtype, rotated)
                for x, scale, rotated in ((k, state.pools.k_scale, True), (v, state.pools.v_scale, False)))  # [B, S, K]
    return k, v, seq_lens


@checks.guard
@functools.partial(jax.jit, donate_argnames=("state",))
def free_seqs(state: PagedKVState, seq_idx: jax.Array):
    """Ends sequences: their blocks lose a reference (and are free at zero), their rows empty. DONATES state.

    Args:
      seq_idx: [B] int32 rows to free; real rows distinct, any index outside [0, B) a padding row,
        ignored.

    Returns:
      (state, ok); ok is False, and nothing changes, if a block would be freed twice or a real row
      is named twice.
    """
    c = state.config
    _check_rows(seq_idx)
    seq_idx, _, accepted = _admit(state, seq_idx)
    rows = state.table.block_ids.at[seq_idx].get(mode="fill", fill_value=c.num_blocks)  # [B, M]
    allocator, ok = _release_blocks(state.allocator, rows)
    cleared = jnp.where(ok, seq_idx, c.max_seqs)
    table = state.table.replace(
        block_ids=state.table.block_ids.at[cleared].set(c.num_blocks, mode="drop"),
        seq_lens=state.table.seq_lens.at[:, cleared].set(0, mode="drop"),
    )
    return state.replace(table=table, allocator=allocator), ok & accepted

"""The paged cache's state: immutable pytrees whose sizes are static fields.

Axis letters: L layers, N blocks in the pool, P positions per block, K kv heads, D head dim,
B sequence slots (rows of the block table), M blocks per sequence.

Sentinels, never a reserved garbage block:
- a block-table entry of N (`config.num_blocks`) means "no block";
- a sequence index of B (`config.max_seqs`) means "no sequence" (a padding row of a batch); so does
  any other index outside [0, B), negative ones included (`jaxpaged.ops` maps them to B).
Reads through a sentinel are masked, writes through one are dropped (`mode="drop"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxpaged import checks
from jaxpaged.config import CacheConfig
from jaxpaged.protocol import Step, attend_each, check_impl, new_positions
from jaxpaged.quant import SCALE_DTYPE


@struct.dataclass
class KVPools:
    """Block pools, K and V apart, one pair per layer stacked on the leading axis, head-major: each
    kv head's blocks lie apart, so one head's P positions of a block are P * D contiguous elements
    (the layout the decode kernel reads fastest; benchmarks/NOTES.md).

    8-bit pools (`CacheConfig.kv_dtype` float8_e4m3fn or int8) hold each position's D values of one
    kv head as x / scale, with the float16 scale beside them, and V's blocks transposed, positions
    last (`jaxpaged.quant`); float pools have no scales (None).
    """

    k: jax.Array  # [L, K, N, P, D] in the config's pool_dtype
    v: jax.Array  # [L, K, N, P, D]; 8-bit pools [L, K, N, D, P] (`CacheConfig.pool_shapes`)
    k_scale: jax.Array | None = None  # [L, K, N, P] float16, 8-bit pools only
    v_scale: jax.Array | None = None  # [L, K, N, P] float16, 8-bit pools only


@struct.dataclass
class BlockAllocatorState:
    """The free list (a stack) and per-block reference counts.

    Invariant: `free_ids[:num_free]` are exactly the blocks whose reference count is 0.
    """

    free_ids: jax.Array  # [N] int32; entries past num_free are stale
    num_free: jax.Array  # [] int32
    ref_counts: jax.Array  # [N] int32


@struct.dataclass
class BlockTable:
    """Which blocks each sequence slot owns, and how many positions each layer has written."""

    block_ids: jax.Array  # [B, M] int32; a sequence's blocks form a prefix of its row, N after it
    seq_lens: jax.Array  # [L, B] int32; positions written per layer and sequence


@struct.dataclass
class PagedKVState:
    """Everything a paged KV cache holds on the device.

    With a `mesh` (`init_state(config, mesh)`), the pools are sharded over kv heads on its
    "tensor" axis and everything else is replicated (`jaxpaged.parallel`); attention then runs per
    device on its own kv heads.
    """

    pools: KVPools
    table: BlockTable
    allocator: BlockAllocatorState
    config: CacheConfig = struct.field(pytree_node=False)
    mesh: Mesh | None = struct.field(pytree_node=False, default=None)
    # True where the host gives every row its blocks before a step (the engine's block manager):
    # `begin_step` then takes none on the device (`ops.reserved_slots`)
    host_blocks: bool = struct.field(pytree_node=False, default=False)

    # -- the cache protocol (jaxpaged.protocol): what a model's attention calls

    def begin_step(self, seq_idx, num_tokens, num_chunk_tokens: int, *, max_len=None, impl="auto"):
        """Takes blocks for num_tokens [B] new positions of rows seq_idx [B] in every layer, once, and
        advances every layer's length (`ops.allocate_slots`; with `host_blocks`, `ops.reserved_slots`:
        the blocks are in the table already). Returns (state, Step with the slots; padding tokens at
        position -1: `new_positions`)."""
        from jaxpaged.ops import allocate_slots, reserved_slots

        if seq_idx is None:
            raise ValueError("a PagedKVState needs seq_idx, the block-table row of each batch row")
        rows = checks.padding_rows(seq_idx, self.config.max_seqs)  # no negative index wraps to row B - 1
        starts = self.table.seq_lens.at[0, rows].get(mode="fill", fill_value=0)  # [B]
        slots_of = reserved_slots if self.host_blocks else allocate_slots
        state, slots, ok = slots_of(self, seq_idx, num_tokens, num_chunk_tokens=num_chunk_tokens)
        return state, Step(seq_idx=seq_idx, positions=new_positions(starts, num_tokens, num_chunk_tokens),
                           num_tokens=num_tokens, ok=ok, slots=slots, max_len=max_len, impl=check_impl(impl))

    def begin_packed_step(self, seq_idx, num_tokens, tile_row, tile_start, tile_tokens: int, max_tokens: int, *,
                          max_len=None, impl="auto"):
        """`begin_step` for chunks of ragged lengths packed on one token axis and cut into tiles of
        Q = tile_tokens (`ops.allocate_packed_slots`): the Step's rows are the tiles [Bt, Q], each
        reading its chunk's blocks, so no shape depends on the longest chunk. Returns (state, Step)."""
        from jaxpaged.ops import allocate_packed_slots

        state, tile_seq, positions, tile_count, slots, ok = allocate_packed_slots(
            self, seq_idx, num_tokens, tile_row, tile_start, tile_tokens=tile_tokens, max_tokens=max_tokens)
        return state, Step(seq_idx=tile_seq, positions=positions, num_tokens=tile_count, ok=ok, slots=slots,
                           max_len=max_len, impl=check_impl(impl))

    def attend(self, layer, q, k, v, step: Step):
        """Scatters k, v [B, T, K, D] into the step's slots of `layer`, then paged attention of q [B, T, H, D]
        (on a mesh, each device its own kv heads: `jaxpaged.parallel.attend_per_device`)."""
        if self.mesh is not None:
            from jaxpaged.parallel import attend_per_device

            return attend_per_device(self, layer, q, k, v, step)
        from jaxpaged.attention import paged_attention
        from jaxpaged.ops import write_slots

        state = write_slots(self, layer, step.slots, k, v)
        out = paged_attention(q, state, layer, step.seq_idx, step.positions, max_len=step.max_len, impl=step.impl)
        return out, state

    def attend_groups(self, layer, groups):
        """`attend` for groups of rows of one step (the engine's decode rows and prefill chunks): writes
        every group's k, v, then attends each group's q; groups is a list of (q, k, v, Step), as
        `attend` takes them. It equals `attend` group by group where no group writes a slot that
        another group's rows read (the engine's groups are different sequences, each writing only
        blocks it alone holds); with the writes ahead, no write follows a read of the pools in the
        layer, which XLA otherwise may not order in a scanned loop over layers: it copied both
        pools in each layer (on an H200, 12x the time of llama-1b's mixed calls:
        benchmarks/NOTES.md). On a mesh it attends group by group. Returns ([out [B, T, H, D] per
        group], state)."""
        if self.mesh is not None:
            return attend_each(self, layer, groups)
        from jaxpaged.attention import paged_attention
        from jaxpaged.ops import write_slots

        state = self
        for _, k, v, step in groups:
            state = write_slots(state, layer, step.slots, k, v)
        return [paged_attention(q, state, layer, step.seq_idx, step.positions, max_len=step.max_len, impl=step.impl)
                for q, _, _, step in groups], state


def init_allocator(num_blocks: int) -> BlockAllocatorState:
    """All blocks free; they leave the stack from the top, block 0 first."""
    return BlockAllocatorState(
        free_ids=jnp.arange(num_blocks - 1, -1, -1, dtype=jnp.int32),
        num_free=jnp.asarray(num_blocks, jnp.int32),
        ref_counts=jnp.zeros((num_blocks,), jnp.int32),
    )


def init_state(config: CacheConfig, mesh: Mesh | None = None) -> PagedKVState:
    """An empty cache: zeroed pools (and scales, for 8-bit pools), no sequence owns a block, every block free.

    mesh: a `jaxpaged.parallel.make_mesh` mesh whose tensor axis divides the kv heads: the pools
    are built sharded over kv heads on it (no device holds a whole pool), the rest replicated.
    """
    if mesh is not None:
        from jaxpaged.parallel import check_kv_heads, place_cache

        check_kv_heads(config.num_kv_heads, mesh, "CacheConfig.num_kv_heads")
        return place_cache(init_state, config, mesh=mesh)
    c = config
    k_shape, v_shape = c.pool_shapes
    pools = KVPools(k=jnp.zeros(k_shape, c.pool_dtype), v=jnp.zeros(v_shape, c.pool_dtype))
    if c.quantized:
        pools = pools.replace(k_scale=jnp.zeros(k_shape[:-1], SCALE_DTYPE), v_scale=jnp.zeros(k_shape[:-1], SCALE_DTYPE))
    return PagedKVState(
        pools=pools,
        table=BlockTable(
            block_ids=jnp.full((c.max_seqs, c.max_blocks_per_seq), c.num_blocks, jnp.int32),
            seq_lens=jnp.zeros((c.num_layers, c.max_seqs), jnp.int32),
        ),
        allocator=init_allocator(c.num_blocks),
        config=c,
    )

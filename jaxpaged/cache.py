"""The seed's stateful API as thin facades over the pure state and ops.

Each facade holds a state pytree, calls a jitted pure function, and swaps in the state it returns.
It adds argument checks, the mapping from user `seq_id`s to block-table rows, and host-side
slicing of padded results; no cache logic of its own.

Shapes follow the seed: heads first. A sequence's chunk is [K, T, D], a batch's is [B, K, T, D].
Chunks are padded to a power-of-two T before the jitted call, so compilations grow with
log(T), not with the number of distinct chunk lengths.

Arguments are checked before any state changes (`jaxpaged.checks`); a wrong one raises an error
naming it and its allowed range. Every facade is safe to call from several threads: a re-entrant
lock serialises each call's read, jitted update and swap of the state (a state read by one thread
must not be donated by another meanwhile).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged import checks, ops
from jaxpaged.attention import attend
from jaxpaged.config import CacheConfig, bucket
from jaxpaged.contiguous import ContiguousKVState, contiguous_append, contiguous_read, init_contiguous
from jaxpaged.protocol import Step, check_impl, new_positions
from jaxpaged.quant import decode, v_blocks
from jaxpaged.state import BlockAllocatorState, PagedKVState, init_allocator, init_state
from jaxpaged.stats import MemoryStats, contiguous_memory_stats, paged_memory_stats


class OutOfBlocksError(RuntimeError):
    """The pool has too few free blocks (or a block-table row is full); the cache is unchanged."""


class CacheFullError(RuntimeError):
    """Every sequence slot of the block table is taken; the cache is unchanged."""


class UnknownSequenceError(KeyError):
    """No live sequence has this id (never allocated, or already freed)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class DoubleFreeError(RuntimeError):
    """A block that is already free was freed again; the allocator is unchanged."""


def _locked(method):
    """Runs the method holding the object's re-entrant lock, `self._lock`."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


def _pad_tokens(x: jax.Array, axis: int) -> jax.Array:
    """Pads the token axis with zeros up to its bucket size."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, bucket(x.shape[axis]) - x.shape[axis])
    return jnp.pad(x, pad)


@dataclasses.dataclass(frozen=True)
class Block:
    """A read-only view of one block of one layer (the seed's Block, K and V apart)."""

    block_id: int
    k_data: jax.Array  # [K, P, D]
    v_data: jax.Array  # [K, P, D]


class BlockAllocator:
    """Hands out and takes back block ids; a facade over `BlockAllocatorState` and its pure ops.

    Standalone (`BlockAllocator(num_blocks)`) it owns its state; `PagedKVCache.allocator` returns
    one bound to the cache's state (and lock), so blocks it hands out are ones no sequence can
    take, and it refuses to free a block that a sequence holds. Safe to call from several threads.
    """

    def __init__(self, num_blocks: int):
        own = {"state": init_allocator(checks.check_int(num_blocks, "num_blocks", low=1))}
        self._get = lambda: own["state"]
        self._set = lambda state: own.__setitem__("state", state)
        self._holder = lambda block_id: None
        self._lock = threading.RLock()

    @classmethod
    def _bound(cls, get, set_, holder, lock) -> BlockAllocator:
        """An allocator over another object's state; holder(block_id) names the sequence that holds a block, or None."""
        allocator = cls.__new__(cls)
        allocator._get, allocator._set, allocator._holder, allocator._lock = get, set_, holder, lock
        return allocator

    @property
    def state(self) -> BlockAllocatorState:
        return self._get()

    @property
    def num_blocks(self) -> int:
        return self.state.free_ids.shape[0]

    @property
    @_locked
    def num_free_blocks(self) -> int:
        return int(self.state.num_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @_locked
    def allocate(self) -> int:
        """Takes one free block and returns its id. Raises OutOfBlocksError when none is free."""
        new_state, ids, ok = ops.allocate_blocks(self.state, count=1)
        self._set(new_state)
        if not bool(ok):
            raise OutOfBlocksError(f"all {self.num_blocks} blocks are in use")
        return int(ids[0])

    @_locked
    def free(self, block_id: int) -> None:
        """Gives back a block this allocator handed out.

        Raises IndexError for an id outside [0, N), ValueError for a block a sequence of the cache
        holds (free the sequence instead), DoubleFreeError if it is already free; nothing changes.
        """
        block_id = checks.check_index(block_id, self.num_blocks, "block_id")
        holder = self._holder(block_id)
        if holder is not None:
            raise ValueError(f"block {block_id} is held by sequence {holder!r}; free the sequence instead")
        new_state, ok = ops.free_blocks(self.state, jnp.asarray([block_id], jnp.int32))
        self._set(new_state)
        if not bool(ok):
            raise DoubleFreeError(f"block {block_id} is already free")

    @_locked
    def ref_count(self, block_id: int) -> int:
        return int(self.state.ref_counts[checks.check_index(block_id, self.num_blocks, "block_id")])

    @_locked
    def stats(self) -> dict:
        """Total, used and free blocks, and the used share."""
        used = self.num_used_blocks
        return {"total_blocks": self.num_blocks, "used_blocks": used, "free_blocks": self.num_blocks - used,
                "utilisation": used / self.num_blocks}


class PagedKVCache:
    """A paged KV cache for many sequences, each appended to layer by layer.

    Args:
      config: a `CacheConfig`, or any model config with layers, kv heads and head dim
        (see `CacheConfig.from_model_config`).
      block_size: P, positions per block (a power of two).
      num_blocks: N, blocks in the pool shared by all sequences.
      max_seqs: sequences that can be live at once.
      max_blocks_per_seq: M, the most blocks one sequence may hold; default N.
      dtype: element type of K and V as written and read; default the config's.
      kv_dtype: storage of the pools, "float8_e4m3fn" or "int8" (8 bits with scales), or None (dtype);
        default the config's.

    What is safe to touch: every public method, from any thread (each holds the cache's re-entrant
    lock while it reads, updates and swaps the state); `allocator`, which frees only blocks it
    handed out itself, never one a sequence holds. `state` is the current pytree, to read: the
    next call donates it (its arrays are then deleted), so copy what you keep, and never assign
    it or pass it to a donating op yourself; the block-table row of a sequence is the cache's
    business.
    """

    def __init__(self, config: Any, block_size: int = 16, num_blocks: int = 256, *, max_seqs: int = 32,
                 max_blocks_per_seq: int | None = None, dtype: Any = None, kv_dtype: Any = None):
        overrides = dict(block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs, max_blocks_per_seq=max_blocks_per_seq)
        if dtype is not None:
            overrides["dtype"] = dtype
        if kv_dtype is not None:
            overrides["kv_dtype"] = kv_dtype
        self.config = CacheConfig.from_model_config(config, **overrides)
        self.state: PagedKVState = init_state(self.config)
        self._rows: dict[Hashable, int] = {}
        self._lock = threading.RLock()

    # -- sequences

    @property
    @_locked
    def seq_ids(self) -> list:
        return list(self._rows)

    def _row(self, seq_id: Hashable) -> int:
        try:
            return self._rows[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"unknown sequence {seq_id!r} (never allocated, or already freed)") from None

    @_locked
    def allocate_sequence(self, seq_id: Hashable, initial_len: int = 0) -> None:
        """Starts a sequence with blocks reserved for `initial_len` positions; its length starts at 0.

        Raises ValueError for a duplicate id, CacheFullError when no slot is left, OutOfBlocksError
        when the reservation does not fit; the cache is unchanged in each case.
        """
        if not isinstance(seq_id, Hashable):
            raise TypeError(f"seq_id must be hashable, got {type(seq_id).__name__}")
        if seq_id in self._rows:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        initial_len = checks.check_int(initial_len, "initial_len")
        taken = set(self._rows.values())
        row = next((r for r in range(self.config.max_seqs) if r not in taken), None)
        if row is None:
            raise CacheFullError(f"all {self.config.max_seqs} sequence slots are in use; free one or raise max_seqs")
        self.state, ok = ops.reserve(self.state, jnp.asarray([row], jnp.int32), jnp.asarray([initial_len], jnp.int32),
                                     max_new_tokens=bucket(initial_len))
        if not bool(ok):
            raise OutOfBlocksError(f"no room for {initial_len} positions: {self.num_free_blocks} free blocks of "
                                   f"{self.config.block_size}, at most {self.config.max_blocks_per_seq} per sequence")
        self._rows[seq_id] = row

    @_locked
    def append_tokens(self, seq_id: Hashable, layer_idx: int, k: Any, v: Any) -> bool:
        """Appends T positions to one layer of a sequence, taking blocks as needed.

        Args:
          k, v: [K, T, D] in the cache dtype.

        Returns:
          True on success; False when the blocks ran out (nothing changed).
        """
        row = self._row(seq_id)
        layer = checks.check_index(layer_idx, self.config.num_layers, "layer_idx")
        c = self.config
        k, v = checks.check_kv(k, v, "KTD", c.dtype, K=c.num_kv_heads, D=c.head_dim)
        num_tokens = jnp.asarray([k.shape[1]], jnp.int32)
        k, v = (_pad_tokens(jnp.swapaxes(x, 0, 1)[None], axis=1) for x in (k, v))  # [1, T', K, D]
        self.state, ok = ops.append(self.state, layer, jnp.asarray([row], jnp.int32), k, v, num_tokens)
        return bool(ok)

    @_locked
    def get_seq_len(self, seq_id: Hashable, layer_idx: int = 0) -> int:
        """Positions written to `layer_idx` of the sequence."""
        layer = checks.check_index(layer_idx, self.config.num_layers, "layer_idx")
        return int(self.state.table.seq_lens[layer, self._row(seq_id)])

    @_locked
    def get_kv(self, seq_id: Hashable, layer_idx: int) -> tuple[jax.Array, jax.Array]:
        """The sequence's K and V so far in one layer, each [K, S, D] with S its length, in the cache
        dtype (8-bit pools dequantised)."""
        row = self._row(seq_id)
        layer = checks.check_index(layer_idx, self.config.num_layers, "layer_idx")
        seq_len = self.get_seq_len(seq_id, layer)
        k, v, _ = ops.gather_kv(self.state, layer, jnp.asarray([row], jnp.int32), max_len=bucket(seq_len))
        return tuple(jnp.swapaxes(x[0, :seq_len], 0, 1) for x in (k, v))

    @_locked
    def free_sequence(self, seq_id: Hashable) -> None:
        """Ends a sequence; its blocks become free for others. Raises UnknownSequenceError if not live."""
        row = self._row(seq_id)
        self.state, ok = ops.free_seqs(self.state, jnp.asarray([row], jnp.int32))
        if not bool(ok):  # the pure layer refused: a block of this row is already free
            raise DoubleFreeError(f"sequence {seq_id!r} holds a block that is already free")
        del self._rows[seq_id]

    # -- blocks and statistics

    @property
    def allocator(self) -> BlockAllocator:
        """A BlockAllocator bound to this cache's free list and lock; it refuses to free a block a sequence holds."""
        return BlockAllocator._bound(lambda: self.state.allocator,
                                     lambda alloc: setattr(self, "state", self.state.replace(allocator=alloc)),
                                     self._holder, self._lock)

    @_locked
    def _holder(self, block_id: int) -> Hashable | None:
        """The id of the live sequence whose block-table row holds `block_id`, or None."""
        rows = np.flatnonzero(np.any(np.asarray(self.state.table.block_ids) == block_id, axis=1))
        return next((seq_id for seq_id, row in self._rows.items() if row in rows), None)

    @property
    @_locked
    def num_free_blocks(self) -> int:
        return int(self.state.allocator.num_free)

    @_locked
    def block_table(self, seq_id: Hashable) -> list[int]:
        """The ids of the blocks a sequence holds, in position order."""
        ids = np.asarray(self.state.table.block_ids[self._row(seq_id)])
        return [int(i) for i in ids[ids < self.config.num_blocks]]

    @_locked
    def get_block(self, block_id: int, layer_idx: int) -> Block:
        """A view of one block of one layer: k_data and v_data, each [K, P, D] (8-bit pools dequantised)."""
        block_id = checks.check_index(block_id, self.config.num_blocks, "block_id")
        layer = checks.check_index(layer_idx, self.config.num_layers, "layer_idx")
        pools = self.state.pools
        k, v = pools.k[layer, :, block_id], pools.v[layer, :, block_id]
        if self.config.quantized:
            k = decode(k, pools.k_scale[layer, :, block_id], self.config.jnp_dtype, rotated=True)
            v = decode(v_blocks(v), pools.v_scale[layer, :, block_id], self.config.jnp_dtype, rotated=False)
        return Block(block_id, k, v)

    @_locked
    def memory_stats(self) -> MemoryStats:
        return paged_memory_stats(self.state)


class _StatefulCacheSteps:
    """The cache protocol (jaxpaged.protocol) for the facades with `update()` (KVCache and its paged
    adapter): eager, the cache changes in place and each call returns it. Batch row b is row b."""

    def begin_step(self, seq_idx, num_tokens, num_chunk_tokens: int, *, max_len=None, impl="auto"):
        starts = jnp.asarray(self.seq_lens(0), jnp.int32)
        return self, Step(seq_idx=None, positions=new_positions(starts, num_tokens, num_chunk_tokens),
                          num_tokens=num_tokens, ok=jnp.asarray(True), max_len=max_len, impl=check_impl(impl))

    def attend(self, layer, q, k, v, step: Step):
        """Appends k, v [B, T, K, D] through `update()` and attends q [B, T, H, D] over what it returns.
        Raises OutOfBlocksError (nothing changed) where the cache has no room."""
        k_all, v_all = self.update(layer, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), step.num_tokens)
        seq_lens = jnp.asarray(self.seq_lens(layer))
        # S padded to a power of two (masked anyway): attention compiles per bucket, not per length
        pad = [(0, 0), (0, 0), (0, bucket(k_all.shape[2]) - k_all.shape[2]), (0, 0)]
        k_all, v_all = (jnp.swapaxes(jnp.pad(x, pad), 1, 2) for x in (k_all, v_all))  # [B, S, K, D]
        return attend(q, k_all, v_all, step.positions, seq_lens), self


class KVCache(_StatefulCacheSteps):
    """The classic contiguous cache: [B, K, max_len, D] preallocated per layer. Safe to call from
    several threads (one lock around each call).

    Args:
      config: a CacheConfig or any model config with layers, kv heads and head dim.
      batch_size: B, >= 1.
      max_len: S, positions preallocated per row, >= 1.
      dtype: element type; default the config's.
    """

    def __init__(self, config: Any, batch_size: int, max_len: int, dtype: Any = None):
        batch_size, max_len = checks.check_int(batch_size, "batch_size", low=1), checks.check_int(max_len, "max_len", low=1)
        overrides = {"num_blocks": 1} if dtype is None else {"num_blocks": 1, "dtype": dtype}
        shape = CacheConfig.from_model_config(config, **overrides)
        if shape.quantized:
            raise ValueError(f"the contiguous cache holds K and V in the cache dtype only, not kv_dtype "
                             f"{shape.kv_dtype!r}; use the paged cache for 8-bit pools")
        self.config = shape
        self.num_layers = shape.num_layers
        self.state: ContiguousKVState = init_contiguous(shape.num_layers, batch_size, shape.num_kv_heads, max_len,
                                                        shape.head_dim, shape.jnp_dtype)
        self._lock = threading.RLock()

    @_locked
    def update(self, layer_idx: int, k: Any, v: Any, num_tokens: Any = None) -> tuple[jax.Array, jax.Array]:
        """Appends k, v [B, K, T, D] to one layer and returns its K and V so far, each [B, K, S, D].

        Args:
          num_tokens: optional [B] integers >= 0, valid tokens per row (the rest of the T is
            padding; more than T is clipped to T). S is the longest row; shorter rows read as zeros
            past their length.

        Raises IndexError, TypeError or ValueError for a bad argument and OutOfBlocksError when a
        row would pass max_len; nothing changes in each case.
        """
        layer = checks.check_index(layer_idx, self.num_layers, "layer_idx")
        batch, heads, _, head_dim = self.state.k.shape[1:]
        k, v = checks.check_kv(k, v, "BKTD", self.state.k.dtype, B=batch, K=heads, D=head_dim)
        num_tokens = checks.num_tokens_array(num_tokens, batch, k.shape[2])
        self.state, ok = contiguous_append(self.state, layer, k, v, num_tokens)
        if not bool(ok):
            raise OutOfBlocksError(f"a row would pass max_len={self.state.k.shape[3]}")
        k_all, v_all, seq_lens = contiguous_read(self.state, layer)
        longest = int(jnp.max(seq_lens))
        return k_all[:, :, :longest], v_all[:, :, :longest]

    @_locked
    def seq_lens(self, layer_idx: int = 0) -> np.ndarray:
        return np.asarray(self.state.seq_lens[checks.check_index(layer_idx, self.num_layers, "layer_idx")])

    @_locked
    def reset(self) -> None:
        num_layers, batch, heads, max_len, head_dim = self.state.k.shape
        self.state = init_contiguous(num_layers, batch, heads, max_len, head_dim, self.state.k.dtype)

    @_locked
    def memory_stats(self) -> MemoryStats:
        return contiguous_memory_stats(self.state)


class PagedKVCacheAdapter(_StatefulCacheSteps):
    """`KVCache.update()` backed by paged blocks: the same results, bit for bit, and the same errors.

    Batch row b is the sequence `b` of an inner PagedKVCache, which takes blocks only as rows grow.
    Safe to call from several threads: every call holds the inner cache's lock.

    Args:
      config: a CacheConfig or any model config with layers, kv heads and head dim.
      batch_size: B, >= 1.
      block_size: P.
      num_blocks: N, the shared pool; default enough for every row to reach max_len.
      max_len: the most positions one row may hold, >= 1; default N * P.
      dtype: element type; default the config's.
      kv_dtype: storage of the pools (`PagedKVCache`); default the config's.
    """

    def __init__(self, config: Any, batch_size: int, block_size: int = 16, num_blocks: int | None = None,
                 max_len: int | None = None, dtype: Any = None, kv_dtype: Any = None):
        if num_blocks is None and max_len is None:
            raise ValueError("give num_blocks, max_len or both")
        batch_size = checks.check_int(batch_size, "batch_size", low=1)
        block_size = checks.check_int(block_size, "block_size", low=1)
        if max_len is not None:
            max_len = checks.check_int(max_len, "max_len", low=1)
        blocks_per_row = None if max_len is None else -(-max_len // block_size)
        if num_blocks is None:
            num_blocks = batch_size * blocks_per_row
        self.batch_size = batch_size
        self.cache = PagedKVCache(config, block_size, num_blocks, max_seqs=batch_size,
                                  max_blocks_per_seq=blocks_per_row, dtype=dtype, kv_dtype=kv_dtype)
        self.config = self.cache.config
        self._lock = self.cache._lock
        self.reset()

    @_locked
    def reset(self) -> None:
        """Frees every row and starts them again empty."""
        for seq_id in self.cache.seq_ids:
            self.cache.free_sequence(seq_id)
        for row in range(self.batch_size):
            self.cache.allocate_sequence(row)

    @_locked
    def update(self, layer_idx: int, k: Any, v: Any, num_tokens: Any = None) -> tuple[jax.Array, jax.Array]:
        """Appends k, v [B, K, T, D] to one layer and returns its K and V so far, each [B, K, S, D].

        num_tokens as in `KVCache.update` (more than T is clipped to T, before the chunk is padded).
        Raises OutOfBlocksError (nothing changed) when the pool cannot hold the new positions, and
        IndexError, TypeError or ValueError for a bad argument.
        """
        layer = checks.check_index(layer_idx, self.config.num_layers, "layer_idx")
        c = self.config
        k, v = checks.check_kv(k, v, "BKTD", c.dtype, B=self.batch_size, K=c.num_kv_heads, D=c.head_dim)
        chunk = k.shape[2]
        num_tokens = checks.num_tokens_array(num_tokens, self.batch_size, chunk)
        k, v = (_pad_tokens(jnp.swapaxes(x, 1, 2), axis=1) for x in (k, v))  # [B, T', K, D]
        seq_idx = jnp.arange(self.batch_size, dtype=jnp.int32)
        cache = self.cache
        cache.state, ok = ops.append(cache.state, layer, seq_idx, k, v, num_tokens)
        if not bool(ok):
            raise OutOfBlocksError(f"no room for {chunk} more positions: {cache.num_free_blocks} free blocks, "
                                   f"at most {c.max_seq_len} positions per row")
        longest = int(jnp.max(cache.state.table.seq_lens[layer]))
        k_all, v_all, _ = ops.gather_kv(cache.state, layer, seq_idx, max_len=bucket(longest))
        return tuple(jnp.swapaxes(x[:, :longest], 1, 2) for x in (k_all, v_all))

    @_locked
    def seq_lens(self, layer_idx: int = 0) -> np.ndarray:
        return np.asarray(self.cache.state.table.seq_lens[checks.check_index(layer_idx, self.config.num_layers, "layer_idx")])

    def memory_stats(self) -> MemoryStats:
        return self.cache.memory_stats()


def create_paged_kv_cache(config: Any, batch_size: int, block_size: int = 16, blocks_per_seq: int = 32,
                          dtype: Any = None, kv_dtype: Any = None) -> PagedKVCacheAdapter:
    """The seed's factory: an adapter for `batch_size` rows of up to `blocks_per_seq` blocks each.

    The pool holds batch_size * blocks_per_seq blocks, so every row can reach its maximum.
    kv_dtype "float8_e4m3fn" or "int8" stores them in 8 bits with scales (`CacheConfig.kv_dtype`).
    """
    blocks_per_seq = checks.check_int(blocks_per_seq, "blocks_per_seq", low=1)
    batch_size = checks.check_int(batch_size, "batch_size", low=1)
    return PagedKVCacheAdapter(config, batch_size, block_size, num_blocks=batch_size * blocks_per_seq,
                               max_len=blocks_per_seq * block_size, dtype=dtype, kv_dtype=kv_dtype)

"""Memory statistics for the paged and the contiguous caches, counted from what is really allocated.

A contiguous cache is described as a paged one whose blocks are whole rows: one block of
`max_len` positions per batch row, all of them taken from the start.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpaged.contiguous import ContiguousKVState
from jaxpaged.state import PagedKVState


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """A snapshot of how a cache's device memory is used."""

    total_blocks: int  # blocks the pools hold
    used_blocks: int  # blocks owned by at least one sequence (or held by the allocator's user)
    free_blocks: int  # blocks on the free list
    block_size: int  # positions per block
    bytes_per_block: int  # K plus V, all layers (with their scales, for 8-bit pools)
    bytes_reserved: int  # bytes of the pools (and scales) on the device
    bytes_live: int  # bytes that hold written tokens (K plus V, every layer)
    num_seqs: int  # sequences holding blocks
    blocks_per_seq: tuple[int, ...]  # blocks held by each of those sequences

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position takes in every layer: K plus V, with their scales for 8-bit pools."""
        return self.bytes_per_block // self.block_size

    @property
    def bytes_used(self) -> int:
        """Bytes of the blocks in use: what a pool sized to this workload would need."""
        return self.used_blocks * self.bytes_per_block

    @property
    def utilisation(self) -> float:
        """Live bytes over reserved bytes."""
        return self.bytes_live / self.bytes_reserved if self.bytes_reserved else 0.0

    @property
    def fragmentation(self) -> float:
        """Internal fragmentation: the share of the used blocks' bytes that holds no token."""
        return 1.0 - self.bytes_live / self.bytes_used if self.bytes_used else 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(bytes_per_token=self.bytes_per_token, bytes_used=self.bytes_used, utilisation=self.utilisation, fragmentation=self.fragmentation)
        return out

    def format(self) -> str:
        """A few human-readable lines."""
        mib = 1 / 2**20
        return (
            f"blocks: {self.used_blocks} used / {self.free_blocks} free / {self.total_blocks} total "
            f"(block size {self.block_size}, {self.num_seqs} sequences)\n"
            f"bytes: {self.bytes_reserved * mib:.2f} MiB reserved, {self.bytes_used * mib:.2f} MiB in used blocks, "
            f"{self.bytes_live * mib:.2f} MiB live ({self.bytes_per_token} bytes per position)\n"
            f"utilisation {self.utilisation:.1%}, internal fragmentation {self.fragmentation:.1%}"
        )


def paged_memory_stats(state: PagedKVState) -> MemoryStats:
    """Statistics of a paged cache, read back from the device once. A state of R data-parallel
    replicas (every leaf stacked [R, ...], `jaxpaged.parallel`) counts them together: R x N blocks."""
    c = state.config
    block_ids, seq_lens, num_free = (np.asarray(x) for x in (state.table.block_ids, state.table.seq_lens, state.allocator.num_free))
    replicas = num_free.size
    held = (block_ids.reshape(-1, block_ids.shape[-1]) < c.num_blocks).sum(axis=1)
    bytes_per_position = c.bytes_per_token // c.num_layers  # one layer, K plus V (and their scales)
    return MemoryStats(
        total_blocks=replicas * c.num_blocks,
        used_blocks=replicas * c.num_blocks - int(num_free.sum()),
        free_blocks=int(num_free.sum()),
        block_size=c.block_size,
        bytes_per_block=c.bytes_per_block,
        bytes_reserved=replicas * c.pool_bytes,
        bytes_live=int(seq_lens.sum()) * bytes_per_position,
        num_seqs=int((held > 0).sum()),
        blocks_per_seq=tuple(int(h) for h in held[held > 0]),
    )


def contiguous_memory_stats(state: ContiguousKVState) -> MemoryStats:
    """Statistics of a contiguous cache: every row holds one block of max_len positions (the rows of
    every replica, for a state of data-parallel replicas stacked [R, ...])."""
    num_layers, batch, heads, max_len, head_dim = state.k.shape[-5:]
    batch *= int(np.prod(state.k.shape[:-5]))  # times R
    bytes_per_position = 2 * heads * head_dim * state.k.dtype.itemsize
    return MemoryStats(
        total_blocks=batch,
        used_blocks=batch,
        free_blocks=0,
        block_size=max_len,
        bytes_per_block=max_len * bytes_per_position * num_layers,
        bytes_reserved=batch * max_len * bytes_per_position * num_layers,
        bytes_live=int(np.asarray(state.seq_lens).sum()) * bytes_per_position,
        num_seqs=batch,
        blocks_per_seq=(1,) * batch,
    )

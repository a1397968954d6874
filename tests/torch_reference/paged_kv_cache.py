"""The seed's paged cache in PyTorch, with the seed's fixes: K and V apart, `if block is None`,
`block_table[seq_id]`, V handled in get_kv, and errors for bad input.

Blocks leave the free list from its end and come back in ascending id order, the policy of
jaxpaged's free stack, so the two assign the same block ids to the same operations.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Block:
    block_id: int
    k_data: torch.Tensor  # [num_kv_heads, block_size, head_dim]
    v_data: torch.Tensor  # [num_kv_heads, block_size, head_dim]


class BlockAllocator:
    """One Block per id, per layer; a free list that hands out ids."""

    def __init__(self, num_blocks: int, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype):
        shape = (num_kv_heads, block_size, head_dim)
        self.blocks = [[Block(i, torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for i in range(num_blocks)]
                       for _ in range(num_layers)]
        self.free_ids = list(range(num_blocks - 1, -1, -1))
        self.num_blocks = num_blocks

    def allocate(self) -> int:
        if not self.free_ids:
            raise RuntimeError("out of blocks")
        return self.free_ids.pop()

    def free(self, block_ids) -> None:
        free = set(self.free_ids)
        if any(b in free for b in block_ids):
            raise RuntimeError("double free")
        self.free_ids.extend(sorted(block_ids))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype = torch.float32, max_blocks_per_seq: int | None = None):
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq or num_blocks
        self.allocator = BlockAllocator(num_blocks, num_layers, num_kv_heads, block_size, head_dim, dtype)
        self.block_table: dict[object, list[int]] = {}
        self.seq_lens: dict[object, list[int]] = {}
        self.num_layers = num_layers

    def allocate_sequence(self, seq_id, initial_len: int = 0) -> None:
        if seq_id in self.block_table:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        needed = -(-initial_len // self.block_size)
        if needed > self.allocator.num_free_blocks or needed > self.max_blocks_per_seq:
            raise RuntimeError("out of blocks")
        self.block_table[seq_id] = [self.allocator.allocate() for _ in range(needed)]
        self.seq_lens[seq_id] = [0] * self.num_layers

    def append_tokens(self, seq_id, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """k, v: [K, T, D]. False (nothing changed) when the blocks run out."""
        table, start = self.block_table[seq_id], self.seq_lens[seq_id][layer_idx]
        chunk = k.shape[1]
        needed = -(-(start + chunk) // self.block_size) - len(table)
        if needed > self.allocator.num_free_blocks or len(table) + max(needed, 0) > self.max_blocks_per_seq:
            return False
        table.extend(self.allocator.allocate() for _ in range(max(needed, 0)))
        blocks = self.allocator.blocks[layer_idx]
        for t in range(chunk):
            block = blocks[table[(start + t) // self.block_size]]
            block.k_data[:, (start + t) % self.block_size] = k[:, t]
            block.v_data[:, (start + t) % self.block_size] = v[:, t]
        self.seq_lens[seq_id][layer_idx] += chunk
        return True

    def get_kv(self, seq_id, layer_idx: int):
        """K and V so far, each [K, S, D]."""
        length, blocks = self.seq_lens[seq_id][layer_idx], self.allocator.blocks[layer_idx]
        table = self.block_table[seq_id]
        k = torch.cat([blocks[b].k_data for b in table], dim=1) if table else blocks[0].k_data[:, :0]
        v = torch.cat([blocks[b].v_data for b in table], dim=1) if table else blocks[0].v_data[:, :0]
        return k[:, :length].clone(), v[:, :length].clone()

    def free_sequence(self, seq_id) -> None:
        self.allocator.free(self.block_table.pop(seq_id))
        del self.seq_lens[seq_id]


class PagedKVCacheAdapter:
    """`KVCache.update()` over the paged cache: batch row b is sequence b."""

    def __init__(self, cache: PagedKVCache, batch_size: int):
        self.cache, self.batch_size = cache, batch_size
        for b in range(batch_size):
            cache.allocate_sequence(b)

    def seq_lens(self, layer_idx: int = 0) -> torch.Tensor:
        return torch.tensor([self.cache.seq_lens[b][layer_idx] for b in range(self.batch_size)])

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, num_tokens=None):
        chunk = k.shape[2]
        counts = [chunk] * self.batch_size if num_tokens is None else [int(n) for n in num_tokens]
        for b, n in enumerate(counts):
            if not self.cache.append_tokens(b, layer_idx, k[b, :, :n], v[b, :, :n]):
                raise RuntimeError("out of blocks")
        rows = [self.cache.get_kv(b, layer_idx) for b in range(self.batch_size)]
        longest = max(r[0].shape[1] for r in rows)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]))  # noqa: E731
        return torch.stack([pad(k) for k, _ in rows]), torch.stack([pad(v) for _, v in rows])


def create_paged_kv_cache(num_layers: int, num_kv_heads: int, head_dim: int, batch_size: int, block_size: int = 16,
                          blocks_per_seq: int = 32, dtype: torch.dtype = torch.float32) -> PagedKVCacheAdapter:
    cache = PagedKVCache(num_layers, num_kv_heads, head_dim, block_size, batch_size * blocks_per_seq, dtype,
                         max_blocks_per_seq=blocks_per_seq)
    return PagedKVCacheAdapter(cache, batch_size)

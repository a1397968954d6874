"""The engine's block manager: which sequence owns which block of the pool, on the host.

It is the one source of truth for block ownership while the engine runs: reference counts, the
free queue and the prefix cache live here, and each step hands the device the block tables it
computed. (The pure ops' in-jit allocator serves the stateful cache API and one-shot generation;
the engine leaves it out, so there is never a second owner.)

- A sequence's blocks are a list of block ids; block i holds its positions [i * P, (i + 1) * P).
- Prefix caching: a full block is named by a chained hash of its tokens (xxh3 of the previous
  block's hash and its own P token ids), and the tokens are compared on a hit. A block whose last
  reference goes stays cached in the free queue, least recently freed first, and loses its name only
  when the queue hands it out again. A prompt's last token is always computed, so at most
  (len - 1) // P full blocks of it come from the cache.
- Fork (`fork`, for n > 1 samples) shares every block; the first write into a shared, partly filled
  block copies it first (`grow` returns the copies the device must make before the step).

Axis letters: N blocks in the pool, P block size.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import xxhash


class NoFreeBlocks(RuntimeError):
    """The pool has too few free blocks; nothing was taken."""


@dataclasses.dataclass
class SeqBlocks:
    """One sequence's blocks, in position order, and how far the prefix cache knows them."""

    blocks: list[int]
    num_cached: int = 0  # leading positions whose K/V came from the prefix cache
    num_named: int = 0  # leading full blocks already named (hashed) for the cache
    last_name: int | None = None  # the name of block num_named - 1


def chain_hash(previous: int | None, tokens) -> int:
    """The name of a full block: xxh3-64 of the previous block's name and this block's token ids."""
    h = xxhash.xxh3_64()
    if previous is not None:
        h.update(previous.to_bytes(8, "little"))
    h.update(np.asarray(tokens, np.int32).tobytes())
    return h.intdigest()


@dataclasses.dataclass
class PrefixCacheStats:
    queried_blocks: int = 0  # full prompt blocks looked up in the cache
    hit_blocks: int = 0  # of those, found

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0


class BlockManager:
    """Hands out the pool's N blocks to sequences, shares them by reference count, caches full ones.

    Args:
      num_blocks: N.
      block_size: P.
      enable_prefix_caching: name full blocks by their tokens and reuse them across sequences.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = np.zeros(num_blocks, np.int32)
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._name: list[int | None] = [None] * num_blocks  # a cached block's hash
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # ... and its tokens, compared on a hit
        self._cached: dict[int, int] = {}  # hash -> block
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones among them)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- taking and giving back

    def _take(self, count: int) -> list[int]:
        """Pops `count` blocks off the front of the free queue (least recently freed), forgetting the
        cached ones' names."""
        if count > len(self._free):
            raise NoFreeBlocks(f"{count} blocks needed, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            if self._name[block] is not None:
                del self._cached[self._name[block]]
                self._name[block] = self._tokens[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def free(self, seq: SeqBlocks) -> None:
        """Drops a sequence's reference to each of its blocks. Blocks left with none join the free
        queue: cached ones at its back (kept longest, the sequence's first blocks last), others at
        its front (handed out first)."""
        for block in reversed(seq.blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed with no reference held")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._name[block] is None:
                    self._free.move_to_end(block, last=False)

    # -- prompts, growth, fork

    def cached_prefix(self, prompt: list[int]) -> tuple[list[int], int | None]:
        """The blocks of the longest cached run of the prompt's full blocks (its last token excluded),
        and the last one's name."""
        blocks, name, last = [], None, None
        if not self.enable_prefix_caching:
            return blocks, None
        for i in range((len(prompt) - 1) // self.block_size):
            tokens = tuple(prompt[i * self.block_size:(i + 1) * self.block_size])
            name = chain_hash(name, tokens)
            block = self._cached.get(name)
            if block is None or self._tokens[block] != tokens:
                break
            blocks.append(block)
            last = name
        return blocks, last

    def allocate_prompt(self, prompt: list[int], num_tokens: int | None = None) -> SeqBlocks:
        """Blocks for a new sequence's first num_tokens positions (default: the whole prompt), its cached
        prefix shared. The result's `num_cached` says how many positions the cache already holds.
        Raises NoFreeBlocks, taking nothing, when the rest does not fit."""
        num_tokens = len(prompt) if num_tokens is None else num_tokens
        hits, name = self.cached_prefix(prompt)
        needed = max(self.blocks_for(num_tokens) - len(hits), 0)
        free_hits = sum(int(self.ref_counts[b] == 0) for b in hits)  # a hit waiting in the free queue leaves it
        if needed > len(self._free) - free_hits:
            raise NoFreeBlocks(f"{needed} blocks needed, {len(self._free) - free_hits} free")
        if self.enable_prefix_caching:
            self.stats.queried_blocks += (len(prompt) - 1) // self.block_size
            self.stats.hit_blocks += len(hits)
        for block in hits:
            self._hold(block)
        cached = len(hits) * self.block_size
        return SeqBlocks(hits + self._take(needed), num_cached=cached, num_named=len(hits), last_name=name)

    def blocks_to_grow(self, seq: SeqBlocks, num_tokens: int, num_held_tokens: int) -> int:
        """Free blocks `grow` would take: new ones past the table's end, and a copy of a shared tail
        block about to be written."""
        return max(self.blocks_for(num_tokens) - len(seq.blocks), 0) + int(self.shares_tail(seq, num_tokens,
                                                                                               num_held_tokens))

    def shares_tail(self, seq: SeqBlocks, num_tokens: int, num_held_tokens: int) -> bool:
        """Whether growing to num_tokens writes into a partly filled block another sequence holds."""
        return (num_tokens > num_held_tokens and num_held_tokens % self.block_size != 0
                and self.ref_counts[seq.blocks[(num_held_tokens - 1) // self.block_size]] > 1)

    def grow(self, seq: SeqBlocks, num_tokens: int, num_held_tokens: int) -> list[tuple[int, int]]:
        """Extends a sequence's blocks to hold num_tokens positions, all or nothing.

        Before writing into a partly filled block it shares (after a fork), the sequence gets its own
        copy. num_held_tokens: positions whose K/V the sequence holds now.

        Returns the (source, destination) block copies the device must make before the step.
        Raises NoFreeBlocks, changing nothing, when the pool is short.
        """
        shared_tail = self.shares_tail(seq, num_tokens, num_held_tokens)
        needed = self.blocks_to_grow(seq, num_tokens, num_held_tokens)
        if needed > len(self._free):
            raise NoFreeBlocks(f"{needed} blocks needed, {len(self._free)} free")
        copies = []
        if shared_tail:
            tail = (num_held_tokens - 1) // self.block_size
            (own,) = self._take(1)
            copies.append((seq.blocks[tail], own))
            self.ref_counts[seq.blocks[tail]] -= 1  # the others still hold it: it stays out of the free queue
            seq.blocks[tail] = own
        seq.blocks.extend(self._take(needed - int(shared_tail)))
        return copies

    def fork(self, seq: SeqBlocks) -> SeqBlocks:
        """A child sequence sharing every block of its parent (a reference each)."""
        for block in seq.blocks:
            self._hold(block)
        return dataclasses.replace(seq, blocks=list(seq.blocks))

    def cache_full_blocks(self, seq: SeqBlocks, tokens: list[int], num_computed: int) -> None:
        """Names the sequence's full blocks whose K/V are now computed (the first num_computed
        positions of tokens), so later prompts can share them. Incremental: each block is hashed once.
        A name already cached for another block stays with that block."""
        if not self.enable_prefix_caching:
            return
        while seq.num_named < num_computed // self.block_size:
            i = seq.num_named
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            seq.last_name = name = chain_hash(seq.last_name, chunk)
            block = seq.blocks[i]
            if self._name[block] is None and name not in self._cached:
                self._name[block], self._tokens[block] = name, chunk
                self._cached[name] = block
            seq.num_named += 1

    # -- the integrity check

    def check(self, live: list[SeqBlocks]) -> None:
        """Raises AssertionError unless ownership is consistent with the live sequences' block lists:
        every block's reference count equals the lists that hold it, the free queue is exactly the
        blocks with none, free + used = N, and every cached name points at a block carrying it."""
        holders = np.zeros(self.num_blocks, np.int32)
        for seq in live:
            np.add.at(holders, np.asarray(seq.blocks, np.int64), 1)
        assert np.array_equal(holders, self.ref_counts), "reference counts disagree with the block tables"
        free = set(self._free)
        assert len(free) == len(self._free)
        assert free == set(np.flatnonzero(self.ref_counts == 0).tolist()), "free queue != blocks with no reference"
        assert len(self._free) + self.num_used_blocks == self.num_blocks
        for name, block in self._cached.items():
            assert self._name[block] == name and self._tokens[block] is not None, "a cached name lost its block"
        assert sum(n is not None for n in self._name) == len(self._cached)

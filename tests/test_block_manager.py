"""The engine's block manager against a pure-Python model of what each block holds.

The model writes every sequence's tokens into a shadow of the pool (block -> position -> token), as
the device writes K/V. After every operation: the manager's integrity check holds, and every live
sequence reads back exactly its own tokens — so no block was handed to two owners, a cached block
holds what its name says, and a forked sequence never wrote into a block its sibling reads.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxpaged.engine import BlockManager, NoFreeBlocks, chain_hash

BLOCK = 4
PREFIXES = ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9], [7, 7, 7, 7, 7])  # shared beginnings


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=14, block_size=BLOCK)
        self.live = {}  # id -> (SeqBlocks, tokens, positions held)
        self.shadow = {}  # block -> {offset: token}: what the device would hold
        self.next_id = 0

    def _write(self, seq, tokens, start, stop):
        for position in range(start, stop):
            block = seq.blocks[position // BLOCK]
            assert self.manager.ref_counts[block] == 1, "a write into a block another sequence holds"
            self.shadow.setdefault(block, {})[position % BLOCK] = tokens[position]

    def _unchanged(self, before):
        assert np.array_equal(self.manager.ref_counts, before[0]) and self.manager.num_free_blocks == before[1]

    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 9), max_size=6))
    def add(self, prefix, suffix):
        prompt = prefix + suffix
        before = (self.manager.ref_counts.copy(), self.manager.num_free_blocks)
        try:
            seq = self.manager.allocate_prompt(prompt)
        except NoFreeBlocks:
            self._unchanged(before)
            return
        assert seq.num_cached % BLOCK == 0 and seq.num_cached <= len(prompt) - 1
        for position in range(seq.num_cached):  # a hit holds exactly these tokens
            assert self.shadow[seq.blocks[position // BLOCK]][position % BLOCK] == prompt[position]
        self._write(seq, prompt, seq.num_cached, len(prompt))
        self.manager.cache_full_blocks(seq, prompt, len(prompt))
        self.live[self.next_id] = (seq, list(prompt), len(prompt))
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 6))
    def grow(self, data, count):
        key = data.draw(st.sampled_from(sorted(self.live)))
        seq, tokens, held = self.live[key]
        new_tokens = data.draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))
        before = (self.manager.ref_counts.copy(), self.manager.num_free_blocks)
        needed = self.manager.blocks_to_grow(seq, held + count, held)
        try:
            copies = self.manager.grow(seq, held + count, held)
        except NoFreeBlocks:
            assert needed > before[1]
            self._unchanged(before)
            return
        assert self.manager.num_free_blocks == before[1] - needed
        for source, destination in copies:  # the device copies a shared block before writing
            self.shadow[destination] = dict(self.shadow[source])
        tokens.extend(new_tokens)
        self._write(seq, tokens, held, held + count)
        self.manager.cache_full_blocks(seq, tokens, held + count)
        self.live[key] = (seq, tokens, held + count)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        key = data.draw(st.sampled_from(sorted(self.live)))
        seq, tokens, held = self.live[key]
        self.live[self.next_id] = (self.manager.fork(seq), list(tokens), held)
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        key = data.draw(st.sampled_from(sorted(self.live)))
        self.manager.free(self.live.pop(key)[0])

    @invariant()
    def ownership_is_consistent_and_every_sequence_reads_its_own_tokens(self):
        self.manager.check([seq for seq, _, _ in self.live.values()])
        for seq, tokens, held in self.live.values():
            read = [self.shadow[seq.blocks[p // BLOCK]][p % BLOCK] for p in range(held)]
            assert read == tokens[:held]


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


def test_a_shared_prefix_is_computed_once_and_its_blocks_outlive_their_sequences():
    manager = BlockManager(num_blocks=8, block_size=4)
    system = list(range(100, 108))  # two full blocks
    first = manager.allocate_prompt(system + [1, 2])
    assert first.num_cached == 0
    manager.cache_full_blocks(first, system + [1, 2], 10)
    second = manager.allocate_prompt(system + [3])
    assert second.num_cached == 8 and second.blocks[:2] == first.blocks[:2]
    assert manager.ref_counts[first.blocks[0]] == 2
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 8  # free, yet still cached:
    third = manager.allocate_prompt(system + [4, 5])
    assert third.num_cached == 8 and third.blocks[:2] == first.blocks[:2]
    assert manager.stats.hit_blocks == 4 and manager.stats.queried_blocks == 6
    manager.check([third])


def test_the_last_prompt_token_is_always_computed():
    manager = BlockManager(num_blocks=8, block_size=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    seq = manager.allocate_prompt(prompt)
    manager.cache_full_blocks(seq, prompt, 8)
    again = manager.allocate_prompt(prompt)  # both blocks cached, but the last token must run
    assert again.num_cached == 4 and again.blocks[0] == seq.blocks[0] and again.blocks[1] != seq.blocks[1]


def test_a_hash_collision_is_not_a_hit():
    manager = BlockManager(num_blocks=8, block_size=2)
    seq = manager.allocate_prompt([1, 2, 3])
    manager.cache_full_blocks(seq, [1, 2, 3], 3)
    block = seq.blocks[0]
    manager._tokens[block] = (9, 9)  # as if another block's tokens had the same name
    assert manager.allocate_prompt([1, 2, 3]).num_cached == 0


def test_eviction_takes_uncached_blocks_first_then_the_least_recently_freed():
    manager = BlockManager(num_blocks=5, block_size=2)
    a = manager.allocate_prompt([1, 2, 3])  # a full block (cached) and a partial one
    manager.cache_full_blocks(a, [1, 2, 3], 3)
    c = manager.allocate_prompt([4, 5, 6])
    manager.cache_full_blocks(c, [4, 5, 6], 3)
    manager.free(a)
    manager.free(c)  # free queue: a's partial, c's partial at the front; a's full, then c's full at the back
    b = manager.allocate_prompt([7, 8, 9])
    assert sorted(b.blocks) == sorted([a.blocks[1], c.blocks[1]])  # the uncached ones went first
    d = manager.allocate_prompt([9, 9, 9])  # two blocks: the one never used, then the least recently freed
    assert a.blocks[0] in d.blocks and c.blocks[0] not in d.blocks
    assert manager.cached_prefix([4, 5, 6])[0] == [c.blocks[0]] and manager.cached_prefix([1, 2, 3])[0] == []
    assert chain_hash(None, [1, 2]) == chain_hash(None, (1, 2)) != chain_hash(None, [2, 1])
    manager.check([b, d])


def test_running_out_of_blocks_takes_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    seq = manager.allocate_prompt([1] * 8)
    with pytest.raises(NoFreeBlocks, match="2 blocks needed, 1 free"):
        manager.allocate_prompt([2] * 8)
    with pytest.raises(NoFreeBlocks):
        manager.grow(seq, 13, 8)
    assert manager.num_free_blocks == 1 and len(seq.blocks) == 2
    manager.check([seq])

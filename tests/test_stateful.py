"""A stateful property test: random allocate / append / get / free against a pure-Python model."""

import numpy as np
from conftest import assert_bit_equal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import jaxpaged as jp
from jaxpaged import ops

OPS_RUN = {"count": 0}  # operations executed over all examples, checked after the run
NUM_BLOCKS, BLOCK_SIZE, LAYERS, HEADS, HEAD_DIM, MAX_SEQS = 12, 4, 2, 2, 3, 5
SEQ_IDS = st.integers(0, 7)


class PagedCacheMachine(RuleBasedStateMachine):
    """The model: for each live sequence and layer, the list of K/V rows written, in order."""

    def __init__(self):
        super().__init__()
        config = jp.CacheConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, num_blocks=NUM_BLOCKS)
        self.cache = jp.PagedKVCache(config, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_seqs=MAX_SEQS)
        self.model: dict[int, list[list[np.ndarray]]] = {}
        self.ever_used: set[int] = set()
        self.counter = 0

    def _fresh(self, length):
        """Distinct values every call, so a stale read can never look right."""
        self.counter += 1
        base = np.arange(HEADS * length * HEAD_DIM, dtype=np.float32).reshape(HEADS, length, HEAD_DIM)
        return base / 7 + self.counter * 1000

    def _blocks_needed(self, seq_id):
        return -(-max(len(rows) for rows in self.model[seq_id]) // BLOCK_SIZE)

    @rule(seq_id=SEQ_IDS)
    def allocate(self, seq_id):
        if seq_id in self.model:
            try:
                self.cache.allocate_sequence(seq_id)
                raise AssertionError("a duplicate id must be refused")
            except ValueError:
                return
        if len(self.model) == MAX_SEQS:
            try:
                self.cache.allocate_sequence(seq_id)
                raise AssertionError("a full table must be refused")
            except jp.CacheFullError:
                return
        self.cache.allocate_sequence(seq_id)
        self.model[seq_id] = [[] for _ in range(LAYERS)]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1), length=st.sampled_from([1, 1, 1, 2, 3, 4, 5, 9]))
    def append(self, data, layer, length):
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        k, v = self._fresh(length), -self._fresh(length)
        free_before = self.cache.num_free_blocks
        held = len(self.cache.block_table(seq_id))
        new_len = len(self.model[seq_id][layer]) + length
        fits = max(0, -(-new_len // BLOCK_SIZE) - held) <= free_before
        blocks_before = set(self.cache.block_table(seq_id))
        free_and_used_before = self.ever_used - self._owned()
        assert self.cache.append_tokens(seq_id, layer, k, v) == fits
        if not fits:
            assert self.cache.num_free_blocks == free_before
            return
        new_blocks = set(self.cache.block_table(seq_id)) - blocks_before
        if new_blocks - self.ever_used:
            assert free_and_used_before <= new_blocks, "took a never-used block while a freed one waited"
        self.ever_used |= new_blocks
        self.model[seq_id][layer].extend(zip(k.transpose(1, 0, 2), v.transpose(1, 0, 2)))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1))
    def get(self, data, layer):
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        k, v = self.cache.get_kv(seq_id, layer)
        rows = self.model[seq_id][layer]
        expected_k = np.stack([r[0] for r in rows], axis=1) if rows else np.zeros((HEADS, 0, HEAD_DIM), np.float32)
        expected_v = np.stack([r[1] for r in rows], axis=1) if rows else np.zeros((HEADS, 0, HEAD_DIM), np.float32)
        assert_bit_equal(k, expected_k, f"k of {seq_id}")
        assert_bit_equal(v, expected_v, f"v of {seq_id}")

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_past_the_end(self, data):
        """Slots past a sequence's length, in its last block possibly reused, read as zeros."""
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        row = self.cache._rows[seq_id]
        k, _, _ = ops.gather_kv(self.cache.state, 0, np.asarray([row], np.int32), max_len=NUM_BLOCKS * BLOCK_SIZE)
        assert not np.any(np.asarray(k[0, len(self.model[seq_id][0]):]))

    @rule(seq_id=SEQ_IDS)
    def free(self, seq_id):
        if seq_id not in self.model:
            try:
                self.cache.free_sequence(seq_id)
                raise AssertionError("freeing an unknown or freed sequence must be refused")
            except jp.UnknownSequenceError:
                return
        self.cache.free_sequence(seq_id)
        del self.model[seq_id]

    def _owned(self):
        return {b for s in self.model for b in self.cache.block_table(s)}

    @invariant()
    def blocks_are_owned_once_and_counted(self):
        OPS_RUN["count"] += 1  # invariants run after every step
        tables = [self.cache.block_table(s) for s in self.model]
        owned = [b for t in tables for b in t]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        stats = self.cache.memory_stats()
        assert stats.used_blocks + stats.free_blocks == NUM_BLOCKS
        assert stats.used_blocks == len(owned)
        for seq_id, table in zip(self.model, tables):
            assert len(table) == self._blocks_needed(seq_id) if any(self.model[seq_id]) else len(table) == 0
        free = np.asarray(self.cache.state.allocator.free_ids[: stats.free_blocks])
        assert set(free.tolist()) == set(range(NUM_BLOCKS)) - set(owned), "the free list is exactly the unowned blocks"


def test_thousands_of_random_operations_match_the_model():
    OPS_RUN["count"] = 0
    run_state_machine_as_test(PagedCacheMachine, settings=settings(
        max_examples=80, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
    print("operations run:", OPS_RUN["count"])
    assert OPS_RUN["count"] >= 2000, f"only {OPS_RUN['count']} operations ran"

"""The pure layer against a NumPy oracle: round trips, failure without change, reuse, jit-ability."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPES, assert_bit_equal, random_array

import jaxpaged as jp
from jaxpaged import ops

RAGGED = (0, 1, 7, 8, 9, 16, 17, 32, 33)  # empty, single, around multiples of 8, 16 and 32


def make_state(dtype="float32", block_size=8, num_blocks=64, max_seqs=6, num_layers=2, heads=3, head_dim=5):
    config = jp.CacheConfig(num_layers=num_layers, num_kv_heads=heads, head_dim=head_dim, num_blocks=num_blocks,
                            block_size=block_size, max_seqs=max_seqs, dtype=dtype)
    return jp.init_state(config)


def state_bytes(state):
    """Host copies of every leaf, to compare a state before and after a refused operation."""
    return [np.asarray(leaf).copy() for leaf in jax.tree.leaves(state)]


def assert_same_bytes(expected: list, state) -> None:
    """state's leaves equal `expected` (a `state_bytes` list), leaf for leaf."""
    for a, b in zip(expected, state_bytes(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_round_trip_ragged_chunks(dtype, block_size, rng):
    """Prefill chunks of ragged lengths, then more chunks, read back bit for bit against NumPy."""
    state = make_state(dtype, block_size, num_blocks=48, max_seqs=len(RAGGED))
    seq_idx = jnp.arange(len(RAGGED), dtype=jnp.int32)
    oracle = {(layer, b): [] for layer in range(2) for b in range(len(RAGGED))}
    for lengths in (RAGGED, RAGGED[::-1]):  # two chunks per sequence: starts land mid-block
        chunk = max(lengths)
        for layer in range(2):
            k = random_array(rng, (len(RAGGED), chunk, 3, 5), dtype)
            v = random_array(rng, (len(RAGGED), chunk, 3, 5), dtype)
            state, ok = ops.append(state, layer, seq_idx, k, v, jnp.asarray(lengths, jnp.int32))
            assert bool(ok)
            for b, n in enumerate(lengths):
                oracle[layer, b].append((np.asarray(k[b, :n]), np.asarray(v[b, :n])))
    max_len = 2 * max(RAGGED) + 3  # read past every length: the tail must be zeros
    for layer in range(2):
        k_all, v_all, lens = ops.gather_kv(state, layer, seq_idx, max_len=max_len)
        for b in range(len(RAGGED)):
            expected_k = np.concatenate([k for k, _ in oracle[layer, b]])
            expected_v = np.concatenate([v for _, v in oracle[layer, b]])
            n = expected_k.shape[0]
            assert int(lens[b]) == n
            assert_bit_equal(k_all[b, :n], expected_k, f"k layer {layer} seq {b}")
            assert_bit_equal(v_all[b, :n], expected_v, f"v layer {layer} seq {b}")
            assert not np.any(np.asarray(k_all[b, n:], np.float32)), "positions past the length must read as 0"
    held = np.asarray((state.table.block_ids < state.config.num_blocks).sum(1))
    assert list(held) == [-(-(a + b) // block_size) for a, b in zip(RAGGED, RAGGED[::-1])]


def test_out_of_blocks_changes_nothing(rng):
    state = make_state(block_size=8, num_blocks=4, max_seqs=2)
    seq_idx = jnp.arange(2, dtype=jnp.int32)
    k = random_array(rng, (2, 12, 3, 5), "float32")
    state, ok = ops.append(state, 0, seq_idx, k, k)  # 2 blocks each: the pool is now full
    assert bool(ok)
    before = state_bytes(state)
    state, ok = ops.append(state, 0, seq_idx, k[:, :5], k[:, :5])  # needs 2 more blocks
    assert not bool(ok)
    assert_same_bytes(before, state)
    k_all, _, lens = ops.gather_kv(state, 0, seq_idx, max_len=16)
    assert list(np.asarray(lens)) == [12, 12]
    assert_bit_equal(k_all[:, :12], k, "earlier data intact")


def test_row_width_limit_is_reported(rng):
    config = jp.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=16, block_size=8, max_seqs=1,
                            max_blocks_per_seq=2)
    state = jp.init_state(config)
    k = random_array(rng, (1, 17, 1, 2), "float32")
    state, ok = ops.append(state, 0, jnp.zeros((1,), jnp.int32), k, k)
    assert not bool(ok)
    assert int(state.allocator.num_free) == 16 and int(state.table.seq_lens[0, 0]) == 0


def test_freed_blocks_are_reused_and_never_leak(rng):
    state = make_state(block_size=8, num_blocks=6, max_seqs=2)
    one = jnp.zeros((1,), jnp.int32)
    secret = random_array(rng, (1, 24, 3, 5), "float32")
    state, ok = ops.append(state, 0, one, secret, secret)
    owned = set(np.asarray(state.table.block_ids[0, :3]).tolist())
    state, ok = ops.free_seqs(state, one)
    assert bool(ok) and int(state.allocator.num_free) == 6
    short = random_array(rng, (1, 3, 3, 5), "float32")
    state, ok = ops.append(state, 0, one + 1, short, short)  # another sequence reuses a freed block
    assert int(state.table.block_ids[1, 0]) in owned
    k_all, v_all, _ = ops.gather_kv(state, 0, one + 1, max_len=24)
    assert_bit_equal(k_all[0, :3], short[0], "new owner's data")
    assert not np.any(np.asarray(k_all[0, 3:])), "the previous owner's data must not show"
    state, ok = ops.free_seqs(state, one + 1)
    state, ok = ops.free_seqs(state, one + 1)  # an emptied row frees nothing, twice is harmless
    assert bool(ok) and int(state.allocator.num_free) == 6


def test_double_free_of_a_block_changes_nothing():
    alloc = jp.state.init_allocator(4)
    alloc, ids, ok = ops.allocate_blocks(alloc, count=2)
    assert bool(ok) and sorted(np.asarray(ids).tolist()) == [0, 1]
    alloc, ok = ops.free_blocks(alloc, ids[:1])
    assert bool(ok)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(alloc)]
    alloc, ok = ops.free_blocks(alloc, ids)  # ids[0] is already free
    assert not bool(ok)
    for a, b in zip(before, jax.tree.leaves(alloc)):
        np.testing.assert_array_equal(a, np.asarray(b))
    alloc, ids2, ok = ops.allocate_blocks(alloc, count=4)
    assert not bool(ok) and np.all(np.asarray(ids2) == 4), "3 free blocks cannot serve 4"


def test_bad_shapes_and_dtypes_raise():
    state = make_state("bfloat16")
    seq_idx = jnp.zeros((1,), jnp.int32)
    good = jnp.ones((1, 2, 3, 5), jnp.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        ops.append(state, 0, seq_idx, good.astype(jnp.float32), good.astype(jnp.float32))
    with pytest.raises(ValueError, match="K=3"):
        ops.append(state, 0, seq_idx, jnp.ones((1, 2, 4, 5), jnp.bfloat16), jnp.ones((1, 2, 4, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match="seq_idx"):
        ops.append(state, 0, jnp.zeros((2,), jnp.int32), good, good)
    state, ok = ops.append(state, 0, seq_idx, good, good)  # the state was not consumed by the refusals
    assert bool(ok)


def test_padding_rows_write_nothing(rng):
    state = make_state(num_blocks=8, max_seqs=2)
    seq_idx = jnp.asarray([0, 2], jnp.int32)  # row 2 == max_seqs: a padding row
    k = random_array(rng, (2, 5, 3, 5), "float32")
    state, ok = ops.append(state, 0, seq_idx, k, k)
    assert bool(ok) and int(state.allocator.num_free) == 7
    k_all, _, lens = ops.gather_kv(state, 0, seq_idx, max_len=8)
    assert list(np.asarray(lens)) == [5, 0] and not np.any(np.asarray(k_all[1]))


@functools.partial(jax.jit, donate_argnames=("state",))
def decode_loop(state, seq_idx, k_steps, v_steps, num_steps):
    """Appends one token per sequence to every layer for num_steps steps, in one jitted call."""

    def step(i, carry):
        state, all_ok = carry
        for layer in range(state.config.num_layers):
            state, ok = ops.append(state, layer, seq_idx, k_steps[i], v_steps[i])
            all_ok &= ok
        return state, all_ok

    return jax.lax.fori_loop(0, num_steps, step, (state, jnp.asarray(True)))


def test_decode_loop_in_one_jit_crosses_blocks_with_bounded_compilations(rng):
    block_size, batch = 8, 3
    state = make_state(block_size=block_size, num_blocks=32, max_seqs=batch)
    seq_idx = jnp.arange(batch, dtype=jnp.int32)
    prompt = [5, 8, 1]  # mid-block, exactly one block, one token
    k0 = random_array(rng, (batch, 8, 3, 5), "float32")
    for layer in range(2):
        state, ok = ops.append(state, layer, seq_idx, k0, k0 + 1, jnp.asarray(prompt, jnp.int32))
    max_steps = 3 * block_size
    k_steps = random_array(rng, (max_steps, batch, 1, 3, 5), "float32")
    v_steps = random_array(rng, (max_steps, batch, 1, 3, 5), "float32")
    done = 0
    for num_steps in (max_steps // 2, max_steps - max_steps // 2):  # two calls, different step counts
        ks, vs = (jnp.roll(x, -done, axis=0) for x in (k_steps, v_steps))  # same shape every call
        state, ok = decode_loop(state, seq_idx, ks, vs, jnp.asarray(num_steps))
        assert bool(ok)
        done += num_steps
    assert decode_loop._cache_size() == 1, "one compilation, none per step or call"
    for layer in range(2):
        k_all, v_all, lens = ops.gather_kv(state, layer, seq_idx, max_len=8 + max_steps)
        for b, n in enumerate(prompt):
            assert int(lens[b]) == n + max_steps
            assert_bit_equal(k_all[b, :n], k0[b, :n], "prompt")
            assert_bit_equal(k_all[b, n:n + max_steps], k_steps[:, b, 0], "decoded k")
            assert_bit_equal(v_all[b, n:n + max_steps], v_steps[:, b, 0], "decoded v")
    used = 32 - int(state.allocator.num_free)
    assert used == sum(-(-(n + max_steps) // block_size) for n in prompt)


def test_decode_loop_compiles_once_for_any_number_of_steps(rng):
    state = make_state(block_size=8, num_blocks=32, max_seqs=2)
    seq_idx = jnp.arange(2, dtype=jnp.int32)
    k_steps = random_array(rng, (24, 2, 1, 3, 5), "float32")
    before = decode_loop._cache_size()
    for num_steps in (1, 5, 11, 7):
        state, ok = decode_loop(state, seq_idx, k_steps, k_steps, jnp.asarray(num_steps))
        assert bool(ok)
    assert decode_loop._cache_size() - before <= 1
    assert list(np.asarray(state.table.seq_lens[1])) == [24, 24]


def test_append_updates_pools_in_place():
    """The pools are donated: the compiled append aliases each pool to its output, and the old buffer is gone."""
    state = make_state(num_blocks=8, max_seqs=2)
    k = jnp.ones((2, 3, 3, 5), jnp.float32)
    seq_idx = jnp.arange(2, dtype=jnp.int32)
    hlo = ops.append.lower(state, 0, seq_idx, k, k).compile().as_text()
    header = hlo.splitlines()[0]
    assert "{0}: (0, {}, may-alias)" in header and "{1}: (1, {}, may-alias)" in header
    old_pool = state.pools.k
    state, _ = ops.append(state, 0, seq_idx, k, k)
    assert old_pool.is_deleted()


def test_allocate_slots_once_then_write_every_layer(rng):
    """The model's path: one slot mapping per step, then each layer only scatters."""
    state = make_state(block_size=8, num_blocks=6, max_seqs=3)
    seq_idx = jnp.asarray([2, 0, 3], jnp.int32)  # row 3 == max_seqs: padding
    written = {layer: [[], [], []] for layer in range(2)}
    for lengths in ((5, 8, 4), (1, 1, 1), (9, 3, 2)):
        chunk = max(lengths)
        state, slots, ok = ops.allocate_slots(state, seq_idx, jnp.asarray(lengths, jnp.int32), num_chunk_tokens=chunk)
        assert bool(ok) and slots.shape == (3, chunk)
        for layer in range(2):
            k = random_array(rng, (3, chunk, 3, 5), "float32")
            state = ops.write_slots(state, layer, slots, k, -k)
            for b in range(2):
                written[layer][b].append(np.asarray(k[b, : lengths[b]]))
    for layer in range(2):
        k_all, v_all, lens = ops.gather_kv(state, layer, seq_idx, max_len=24)
        assert list(np.asarray(lens)) == [15, 12, 0]
        for b in range(2):
            expected = np.concatenate(written[layer][b])
            assert_bit_equal(k_all[b, : len(expected)], expected, f"layer {layer} row {b}")
            assert_bit_equal(v_all[b, : len(expected)], -expected, f"v layer {layer} row {b}")
    before = state_bytes(state)
    state, slots, ok = ops.allocate_slots(state, seq_idx, jnp.asarray([25, 0, 0], jnp.int32), num_chunk_tokens=32)
    assert not bool(ok) and np.all(np.asarray(slots) >= 6 * 8), "refused: every slot is a dropped sentinel"
    assert_same_bytes(before, state)


def test_reserved_slots_equal_allocate_slots_in_blocks_the_host_gave(rng):
    """With the host's blocks in the table (the engine's case), `reserved_slots` gives the slots and
    lengths `allocate_slots` gives, takes no block, refuses a row whose positions pass its blocks
    (nothing changes), and is the path `begin_step` takes for a state with `host_blocks`."""
    state = make_state(block_size=8, num_blocks=12, max_seqs=3)
    seq_idx = jnp.asarray([2, 0, 3], jnp.int32)  # row 3 == max_seqs: padding
    state, ok = ops.reserve(state, seq_idx, jnp.asarray([20, 9, 0], jnp.int32), max_new_tokens=24)  # 3 and 2 blocks
    assert bool(ok)
    for lengths in ((5, 8, 4), (1, 1, 1), (14, 7, 3)):  # up to 20 and 16 positions: the blocks held
        chunk = max(lengths)
        copy = jax.tree.map(jnp.copy, state)
        state, slots, ok = ops.reserved_slots(state, seq_idx, jnp.asarray(lengths, jnp.int32), num_chunk_tokens=chunk)
        expected_state, expected, expected_ok = ops.allocate_slots(copy, seq_idx, jnp.asarray(lengths, jnp.int32),
                                                                   num_chunk_tokens=chunk)
        assert bool(ok) and bool(expected_ok)
        np.testing.assert_array_equal(np.asarray(slots), np.asarray(expected))
        assert_same_bytes(state_bytes(expected_state), state)
    assert list(np.asarray(state.table.seq_lens[1])) == [16, 0, 20], "every layer's lengths advanced"
    before = state_bytes(state)
    state, slots, ok = ops.reserved_slots(state, seq_idx, jnp.asarray([0, 1, 0], jnp.int32), num_chunk_tokens=1)
    assert not bool(ok) and np.all(np.asarray(slots) >= 12 * 8), "row 0's blocks hold 16 positions: refused"
    assert_same_bytes(before, state)

    def step_ops(host_blocks):
        hosted = state.replace(host_blocks=host_blocks)
        jaxpr = jax.make_jaxpr(lambda s: s.begin_step(seq_idx, jnp.ones(3, jnp.int32), 1)[1].slots)(hosted)
        text = str(jaxpr)
        return len(re.findall(r"\bscatter[-a-z]*\[", text)), text.count("cumsum")

    assert step_ops(True) == (1, 0), "one scatter (the lengths), no free-list arithmetic"
    assert step_ops(False)[0] > 1


def test_a_scanned_loop_over_layers_writes_and_reads_the_pools_without_copying_them():
    """write_slots then gather_kv in a lax.scan over 30 layers (the model's loop on the CPU), pools in
    the carry: the compiled loop holds no copy as large as a pool, and each layer reads back what it
    wrote. (Indexing the pools through a [L, K, N * P, D] reshape, XLA on the CPU copied both pools
    4 times per layer.)"""
    import re

    config = jp.CacheConfig(num_layers=30, num_kv_heads=3, head_dim=64, num_blocks=8, block_size=16, max_seqs=1,
                            max_blocks_per_seq=8)
    state = jp.init_state(config)
    seq = jnp.asarray([0], jnp.int32)
    for layer in range(config.num_layers):  # six tokens in every layer
        state, ok = ops.append(state, layer, seq, *(jnp.zeros((1, 6, 3, 64), jnp.float32),) * 2)
    slots = ops.slot_mapping(state, seq, jnp.asarray([5]), jnp.asarray([1]), 1)  # position 5's slot

    def step(state, x):
        def body(state, layer):
            state = ops.write_slots(state, layer, slots, x * layer, -x * layer)
            k, v, _ = ops.gather_kv(state, layer, seq, max_len=128)
            return state, (k[0, 5], v[0, 5])
        return jax.lax.scan(body, state, jnp.arange(config.num_layers))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 3, 64)), jnp.float32)
    text = jax.jit(step, donate_argnums=0).lower(state, x).compile().as_text()
    copies = [int(np.prod([int(n) for n in shape.split(",")]))
              for shape in re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", text)]
    assert max(copies, default=0) < state.pools.k.size, sorted(copies)[-4:]
    _, (k5, v5) = jax.jit(step)(state, x)
    expected = np.arange(30, dtype=np.float32)[:, None, None] * np.asarray(x[0])  # [L, K, D]
    np.testing.assert_array_equal(np.asarray(k5), expected)
    np.testing.assert_array_equal(np.asarray(v5), -expected)

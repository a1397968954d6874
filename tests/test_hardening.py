"""No index, count or call pattern may corrupt another sequence's cache.

Two parts. Property tests throw adversarial index vectors at each pure op (negative rows, rows
named twice, padding rows, rows past the table, layers out of range, counts below 0, 0 and above
T) and check each result against a NumPy oracle of the ops' rule (`jaxpaged.ops`): rows not named
are bit-identical afterwards, a refused call changes nothing, and the allocator's invariant holds
(the free list is exactly the blocks with no reference, its entries distinct, free + used = total,
each block referenced once per table entry). Shapes are tiny and fixed, so each op compiles once;
each property test reports its example count, what the examples covered and its time (printed in
a "property tests" section after the run, in CI too), and fails if a kind of misuse it must meet
never came up. The examples are derandomised: the same ones every run, so CI time and coverage do
not vary. Then one regression test per case of misuse found by hand (cases 1-7 and 9; the command
line's checks live with the command).
"""

import collections
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROPERTY_REPORT, assert_bit_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxpaged as jp
from jaxpaged import ops

L, K, D, N, P, B, M = 2, 1, 2, 8, 4, 4, 4  # layers, kv heads, head dim, blocks, block size, table rows, row width
T = 4  # tokens per chunk in the ops under test
SETUP_T = 8  # tokens per chunk that build the starting state
CONFIG = jp.CacheConfig(num_layers=L, num_kv_heads=K, head_dim=D, num_blocks=N, block_size=P, max_seqs=B,
                        max_blocks_per_seq=M)
EXAMPLES = 60  # per property test; each op then runs in a few seconds on a 2-core CPU
ALL_ROWS = jnp.arange(B, dtype=jnp.int32)

ROW = st.sampled_from(range(-5, 2 * B + 1))  # negative, real, the padding row B, past it
ROWS = st.one_of(st.lists(ROW, min_size=B, max_size=B),
                 st.lists(st.sampled_from([0, 1, B, -1]), min_size=B, max_size=B),  # repeats, often
                 st.permutations(range(B)))  # every row, once
LAYER = st.sampled_from([*range(L), *range(L), -1, L, -L - 1, L + 1])  # half of them out of range
COUNTS = st.lists(st.integers(-3, T + 3), min_size=B, max_size=B)  # ragged: negative, 0, up to T, past T
ROW_LABELS = ("repeated row", "negative row", "padding row >= B")  # what each row-taking op must meet
COUNT_LABELS = ("count < 0", "count 0", "count > T")
LENGTHS = st.lists(st.sampled_from([0, 1, 4, 5, 7, SETUP_T, SETUP_T]), min_size=B, max_size=B)  # often a full pool
FULL_POOL = ([SETUP_T] * B, [SETUP_T] * B, B)  # every block taken
SETUP = st.one_of(st.tuples(LENGTHS, LENGTHS, st.integers(0, B)),  # lengths in layers 0 and 1, a row to free (B: none)
                  st.just(FULL_POOL))
EVEN_SETUP = st.one_of(SETUP, st.tuples(LENGTHS, st.integers(0, B)).map(lambda s: (s[0], s[0], s[1])))


def property_test(must_cover, **strategies):
    """Runs the decorated check as a hypothesis test of EXAMPLES examples. The check returns the
    labels of what its example covered; the test prints the count, the labels and the time, and
    fails unless every label of `must_cover` came up."""

    def decorate(check):
        def test(record_property):
            covered, start = collections.Counter(), time.perf_counter()

            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(**strategies)
            def run(**example):
                covered["examples"] += 1
                covered.update(check(**example))

            run()
            elapsed = time.perf_counter() - start
            record_property(PROPERTY_REPORT, f"{check.__name__}: {covered.pop('examples')} examples in "
                                             f"{elapsed:.1f} s; {dict(covered)}")
            missing = set(must_cover) - covered.keys()
            assert not missing, f"no example covered {sorted(missing)}"

        test.__name__ = check.__name__
        return test

    return decorate


# ----------------------------------------------------------------------------- the oracle


def values(seed, shape):
    """Distinct non-zero values, different for every seed: a stale or misplaced one cannot look right."""
    return jnp.asarray(np.arange(1, 1 + np.prod(shape), dtype=np.float32).reshape(shape) + 1000 * seed)


def build(setup):
    """A state with rows of ragged lengths per layer (a layer that did not fit stays shorter) and
    possibly one row freed, so the free list is not in its first order."""
    lens0, lens1, freed = setup
    state = jp.init_state(CONFIG)
    for layer, lens in enumerate((lens0, lens1)):
        k = values(layer + 1, (B, SETUP_T, K, D))
        state, _ = ops.append(state, layer, ALL_ROWS, k, -k, jnp.asarray(lens, jnp.int32))
    state, _ = ops.free_seqs(state, jnp.asarray([freed, B, B, B], jnp.int32))
    return state


def snapshot(state):
    """Host copies of every array of a paged state (or of an allocator alone)."""
    allocator = state.allocator if hasattr(state, "allocator") else state
    out = {name: np.asarray(x).copy() for name, x in
           (("free_ids", allocator.free_ids), ("num_free", allocator.num_free), ("ref_counts", allocator.ref_counts))}
    if hasattr(state, "pools"):
        out.update((name, np.asarray(x).copy()) for name, x in (("k", state.pools.k), ("v", state.pools.v),
                                                                ("block_ids", state.table.block_ids),
                                                                ("seq_lens", state.table.seq_lens)))
    return out


def read(s, layer, row, pool="k"):
    """A row's written positions of one layer, [S, K, D], read from a snapshot through its blocks."""
    positions = np.arange(s["seq_lens"][layer, row])
    return s[pool][layer, :, s["block_ids"][row, positions // P], positions % P]


def held(s, row):
    return int((s["block_ids"][row] < N).sum())


def assert_same(before, after, what="a refused call"):
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=f"{what} changed {name}")


def assert_rows_untouched(before, after, rows):
    for row in rows:
        np.testing.assert_array_equal(before["block_ids"][row], after["block_ids"][row], err_msg=f"row {row}'s blocks")
        np.testing.assert_array_equal(before["seq_lens"][:, row], after["seq_lens"][:, row], err_msg=f"row {row}'s lengths")
        for layer in range(L):
            for pool in ("k", "v"):
                assert_bit_equal(read(after, layer, row, pool), read(before, layer, row, pool), f"row {row} layer {layer}")


def assert_allocator_invariant(s, tables=True):
    refs, num_free = s["ref_counts"], int(s["num_free"])
    free = s["free_ids"][:num_free]
    assert 0 <= num_free <= N and np.all(refs >= 0)
    assert len(set(free.tolist())) == num_free, "free-list entries are distinct"
    assert set(free.tolist()) == set(np.flatnonzero(refs == 0).tolist()), "the free list is the blocks with no reference"
    assert num_free + int((refs > 0).sum()) == N, "free + used = total"
    if tables:
        in_tables = s["block_ids"][s["block_ids"] < N]
        np.testing.assert_array_equal(np.bincount(in_tables, minlength=N), refs, "one reference per table entry")
        for row in range(B):
            assert np.all(s["block_ids"][row, held(s, row):] == N), "a row's blocks form a prefix"
            assert held(s, row) * P >= s["seq_lens"][:, row].max(), "a row's blocks cover its positions"


def classify(rows, counts=None, layer=0):
    """The oracle's view of a call: its real rows (batch position, row) and the labels it covers."""
    real = [(b, r) for b, r in enumerate(rows) if 0 <= r < B]
    labels = {"repeated row": len({r for _, r in real}) < len(real), "negative row": min(rows) < 0,
              "padding row >= B": max(rows) >= B, "layer out of range": not 0 <= layer < L}
    if counts is not None:
        labels.update({"count < 0": min(counts) < 0, "count 0": 0 in counts, "count > T": max(counts) > T})
    return real, {label for label, hit in labels.items() if hit}


def blocks_fit(before, real, targets):
    """Whether rows growing to `targets` positions fit the pool and the table's width; blocks taken."""
    needed = [-(-target // P) for target in targets]
    extra = sum(max(need - held(before, r), 0) for need, (_, r) in zip(needed, real))
    return all(need <= M for need in needed) and extra <= int(before["num_free"]), extra


# ----------------------------------------------------------------------------- properties of each op


@property_test(ROW_LABELS + COUNT_LABELS + ("layer out of range", "refused: out of blocks"), setup=SETUP, rows=ROWS,
               counts=COUNTS, layer=LAYER)
def test_append_property(setup, rows, counts, layer):
    before = snapshot(state := build(setup))
    k = values(7, (B, T, K, D))
    state, ok = ops.append(state, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32), k, -k,
                           jnp.asarray(counts, jnp.int32))
    after = snapshot(state)
    real, labels = classify(rows, counts, layer)
    grants = [min(max(counts[b], 0), T) for b, _ in real]
    fits, extra = blocks_fit(before, real, [before["seq_lens"][layer % L, r] + n for (_, r), n in zip(real, grants)])
    expected_ok = not labels & {"repeated row", "layer out of range"} and fits
    assert bool(ok) == expected_ok
    assert_allocator_invariant(after)
    if not expected_ok:
        assert_same(before, after)
        return labels | {"refused" if fits else "refused: out of blocks"}
    assert_rows_untouched(before, after, set(range(B)) - {r for _, r in real})
    assert int(after["num_free"]) == int(before["num_free"]) - extra
    for (b, r), n in zip(real, grants):
        old = before["seq_lens"][layer, r]
        assert after["seq_lens"][layer, r] == old + n and after["seq_lens"][1 - layer, r] == before["seq_lens"][1 - layer, r]
        assert_bit_equal(read(after, layer, r)[:old], read(before, layer, r), "earlier positions")
        assert_bit_equal(read(after, layer, r)[old:], np.asarray(k[b, :n]), "appended positions")
        assert_bit_equal(read(after, layer, r, "v")[old:], -np.asarray(k[b, :n]), "appended v")
    return labels


@property_test(ROW_LABELS + COUNT_LABELS + ("layer out of range",), setup=SETUP, rows=ROWS, counts=COUNTS, layer=LAYER)
def test_reserve_property(setup, rows, counts, layer):
    before = snapshot(state := build(setup))
    state, ok = ops.reserve(state, jnp.asarray(rows, jnp.int32), jnp.asarray(counts, jnp.int32),
                            jnp.asarray(layer, jnp.int32), max_new_tokens=T)
    after = snapshot(state)
    real, labels = classify(rows, counts, layer)
    targets = [before["seq_lens"][layer % L, r] + min(max(counts[b], 0), T) for b, r in real]
    fits, extra = blocks_fit(before, real, targets)
    expected_ok = not labels & {"repeated row", "layer out of range"} and fits
    assert bool(ok) == expected_ok
    assert_allocator_invariant(after)
    if not expected_ok:
        assert_same(before, after)
        return labels | {"refused"}
    for name in ("k", "v", "seq_lens"):
        np.testing.assert_array_equal(before[name], after[name], err_msg=f"reserve changed {name}")
    assert_rows_untouched(before, after, set(range(B)) - {r for _, r in real})
    for target, (_, r) in zip(targets, real):
        assert held(after, r) == max(held(before, r), -(-target // P))
    assert int(after["num_free"]) == int(before["num_free"]) - extra
    return labels


write_slots = jax.jit(ops.write_slots, donate_argnums=0)


@property_test(ROW_LABELS + COUNT_LABELS + ("write to a layer out of range", "layers of a row differ"), setup=EVEN_SETUP, rows=ROWS, counts=COUNTS,
               layer=LAYER)
def test_allocate_slots_and_write_slots_property(setup, rows, counts, layer):
    before = snapshot(state := build(setup))
    state, slots, ok = ops.allocate_slots(state, jnp.asarray(rows, jnp.int32), jnp.asarray(counts, jnp.int32),
                                          num_chunk_tokens=T)
    after, slots = snapshot(state), np.asarray(slots)
    real, labels = classify(rows, counts)
    if any(len(set(before["seq_lens"][:, r])) > 1 for _, r in real):
        labels.add("layers of a row differ")  # then where the new positions start is not one place
    grants = [min(max(counts[b], 0), T) for b, _ in real]
    fits, extra = blocks_fit(before, real, [before["seq_lens"][0, r] + n for (_, r), n in zip(real, grants)])
    expected_ok = not labels & {"repeated row", "layers of a row differ"} and fits
    assert bool(ok) == expected_ok
    assert_allocator_invariant(after)
    assert len(set(slots.ravel().tolist())) == slots.size, "slots are distinct"
    expected_slots = np.full(slots.shape, -1)
    if expected_ok:
        assert_rows_untouched(before, after, set(range(B)) - {r for _, r in real})
        for (b, r), n in zip(real, grants):
            np.testing.assert_array_equal(after["seq_lens"][:, r], before["seq_lens"][:, r] + n)
            positions = before["seq_lens"][0, r] + np.arange(n)
            expected_slots[b, :n] = after["block_ids"][r, positions // P] * P + positions % P
    else:
        assert_same(before, after)
        labels.add("refused")
    real_slots = expected_slots >= 0
    np.testing.assert_array_equal(slots[real_slots], expected_slots[real_slots])
    assert np.all(slots[~real_slots] >= N * P), "positions with no slot get a dropped sentinel"
    # then a layer writes through the slots: only there, and nowhere for a traced layer out of range
    k = values(9, (B, T, K, D))
    state = write_slots(state, jnp.asarray(layer, jnp.int32), jnp.asarray(slots), k, -k)
    written = snapshot(state)
    expected = {name: after[name].copy() for name in ("k", "v")}
    if 0 <= layer < L:
        b, t = np.nonzero(real_slots)
        expected["k"][layer, :, slots[b, t] // P, slots[b, t] % P] = np.asarray(k)[b, t]
        expected["v"][layer, :, slots[b, t] // P, slots[b, t] % P] = -np.asarray(k)[b, t]
    for name in ("k", "v"):
        assert_bit_equal(written[name], expected[name], f"pool {name} after write_slots")
    return labels | ({"write to a layer out of range"} if not 0 <= layer < L else set())


Q = 2  # tokens per tile in allocate_packed_slots: a chunk of up to T tokens is T / Q tiles
TILE_CHANGES = st.sampled_from(["none", "none", "repeat a tile", "start off the grid", "start past the chunks",
                                "padding tile"])
_packed = jax.jit(ops.allocate_packed_slots, static_argnames=("tile_tokens", "max_tokens"))


@property_test(ROW_LABELS + COUNT_LABELS + ("repeat a tile", "start off the grid", "start past the chunks",
                                            "refused: out of blocks"),
               setup=EVEN_SETUP, rows=ROWS, counts=COUNTS, change=TILE_CHANGES, order=st.randoms(use_true_random=False))
def test_allocate_packed_slots_property(setup, rows, counts, change, order):
    """The tiles' slots are allocate_slots' slots of the same chunks, tile by tile, with the same
    state after; a bad tile list (a tile twice, a start off the tile grid or past the chunks' most
    tokens) refuses the call and leaves the state as it was."""
    tiles = [(b, q * Q) for b in range(B) for q in range(T // Q)]
    order.shuffle(tiles)
    if change == "repeat a tile":
        tiles[-1] = tiles[0]
    elif change == "start off the grid":
        tiles[-1] = (tiles[-1][0], 1)
    elif change == "start past the chunks":
        tiles[-1] = (tiles[-1][0], T)
    elif change == "padding tile":
        tiles[-1] = (B, 0)  # a chunk index past the chunks: a tile with nothing
    tile_row, tile_start = (jnp.asarray(x, jnp.int32) for x in zip(*tiles))
    state = build(setup)
    before = snapshot(state)
    state, tile_seq, positions, tile_count, slots, ok = _packed(
        state, jnp.asarray(rows, jnp.int32), jnp.asarray(counts, jnp.int32), tile_row, tile_start, tile_tokens=Q,
        max_tokens=T)
    after, slots = snapshot(state), np.asarray(slots)
    plain, plain_slots, plain_ok = ops.allocate_slots(build(setup), jnp.asarray(rows, jnp.int32),
                                                      jnp.asarray(counts, jnp.int32), num_chunk_tokens=T)
    real, labels = classify(rows, counts)
    bad_tiles = change in ("repeat a tile", "start off the grid", "start past the chunks")
    assert bool(ok) == (bool(plain_ok) and not bad_tiles)
    assert len(set(slots.ravel().tolist())) == slots.size, "slots are distinct"
    assert_allocator_invariant(after)
    if not ok:
        assert_same(before, after)
        labels.add(change if bad_tiles else "refused" if labels & {"repeated row", "layers of a row differ"}
                   else "refused: out of blocks")
        assert np.all(slots >= N * P), "a refused call gives no slot"
        return labels
    plain, plain_slots = snapshot(plain), np.asarray(plain_slots)
    for name in after:
        assert_bit_equal(after[name], plain[name], f"{name} after the packed call")
    seq = np.asarray(tile_seq)
    for i, (b, start) in enumerate(tiles):
        expected = plain_slots[b, start:start + Q] if b < B else np.full(Q, -1)
        real_slot = expected < N * P if b < B else np.zeros(Q, bool)
        real_slot &= expected >= 0
        np.testing.assert_array_equal(slots[i][real_slot], expected[real_slot])
        assert np.all(slots[i][~real_slot] >= N * P), "a position with no slot gets a dropped sentinel"
        if b < B and rows[b] in range(B) and real_slot.any():
            assert seq[i] == rows[b] and np.asarray(positions)[i, 0] == before["seq_lens"][0, rows[b]] + start
    return labels | ({change} if change != "none" else set())


@property_test(ROW_LABELS + ("layer out of range",), setup=SETUP, rows=ROWS, layer=LAYER)
def test_gather_kv_property(setup, rows, layer):
    before = snapshot(state := build(setup))
    k, v, lens = ops.gather_kv(state, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32), max_len=M * P)
    assert_same(before, snapshot(state), "a read")
    _, labels = classify(rows, layer=layer)
    for b, r in enumerate(rows):
        n = before["seq_lens"][layer, r] if 0 <= r < B and 0 <= layer < L else 0
        assert int(lens[b]) == n
        if n:
            assert_bit_equal(k[b, :n], read(before, layer, r), f"row {r}")
            assert_bit_equal(v[b, :n], read(before, layer, r, "v"), f"row {r}")
        assert not np.any(np.asarray(k[b, n:])) and not np.any(np.asarray(v[b, n:])), "past the length: zeros"
    return labels


@property_test(ROW_LABELS, setup=SETUP, rows=ROWS)
def test_free_seqs_property(setup, rows):
    before = snapshot(state := build(setup))
    state, ok = ops.free_seqs(state, jnp.asarray(rows, jnp.int32))
    after = snapshot(state)
    real, labels = classify(rows)
    assert bool(ok) == ("repeated row" not in labels)
    assert_allocator_invariant(after)
    if not ok:
        assert_same(before, after)
        return labels | {"refused"}
    assert_rows_untouched(before, after, set(range(B)) - {r for _, r in real})
    for _, r in real:
        assert np.all(after["block_ids"][r] == N) and np.all(after["seq_lens"][:, r] == 0)
    assert int(after["num_free"]) == int(before["num_free"]) + sum(held(before, r) for _, r in real)
    return labels


@property_test(("id out of range", "double free", "allocation refused"), setup=SETUP,
               count=st.sampled_from([0, 1, 3, N + 1]), ids=st.lists(st.integers(-N - 2, N + 2), min_size=B, max_size=B))
def test_allocate_blocks_and_free_blocks_property(setup, count, ids):
    state = build(setup)
    before = snapshot(state.allocator)
    alloc, taken, ok = ops.allocate_blocks(state.allocator, count=count)
    after, taken = snapshot(alloc), np.asarray(taken)
    assert bool(ok) == (count <= int(before["num_free"]))
    assert_allocator_invariant(after, tables=False)
    if ok:
        assert len(set(taken.tolist())) == count and np.all(before["ref_counts"][taken] == 0)
        assert np.all(after["ref_counts"][taken] == 1)
    else:
        assert_same(before, after)
        assert np.all(taken == N), "a refused allocation hands out no block"
    # then free an adversarial id vector: ids outside [0, N) are ignored, a double free refused
    alloc, ok = ops.free_blocks(alloc, jnp.asarray(ids, jnp.int32))
    freed = snapshot(alloc)
    drops = np.bincount([i for i in ids if 0 <= i < N], minlength=N)
    assert bool(ok) == bool(np.all(drops <= after["ref_counts"]))
    assert_allocator_invariant(freed, tables=False)
    if ok:
        np.testing.assert_array_equal(freed["ref_counts"], after["ref_counts"] - drops)
    else:
        assert_same(after, freed)
    hits = {"id out of range": any(not 0 <= i < N for i in ids), "double free": not ok,
            "allocation refused": count > int(before["num_free"])}
    return {label for label, hit in hits.items() if hit}


slot_mapping = jax.jit(ops.slot_mapping, static_argnums=4)


@property_test(ROW_LABELS + COUNT_LABELS + ("start < 0", "start past the row"), setup=SETUP, rows=ROWS, counts=COUNTS,
               starts=st.lists(st.integers(-6, M * P + 4), min_size=B, max_size=B))
def test_slot_mapping_property(setup, rows, counts, starts):
    before = snapshot(state := build(setup))
    slots = np.asarray(slot_mapping(state, jnp.asarray(rows, jnp.int32), jnp.asarray(starts, jnp.int32),
                                    jnp.asarray(counts, jnp.int32), T))
    _, labels = classify(rows, counts)
    assert len(set(slots.ravel().tolist())) == slots.size, "slots are distinct"
    for b, r in enumerate(rows):
        for t in range(T):
            position = starts[b] + t
            named = 0 <= r < B and "repeated row" not in labels and 0 <= position < M * P
            block = before["block_ids"][r, position // P] if named else N
            if t < counts[b] and block < N:
                assert slots[b, t] == block * P + position % P, "a slot lies in the row's own block"
            else:
                assert slots[b, t] >= N * P, "no slot: a dropped sentinel"
    hits = {"start < 0": min(starts) < 0, "start past the row": max(starts) + T > M * P}
    return labels | {label for label, hit in hits.items() if hit}


S = 8  # the contiguous cache's max_len


@property_test(COUNT_LABELS + ("layer out of range", "refused"), lens=st.lists(st.integers(0, S), min_size=B, max_size=B),
               counts=COUNTS, layer=LAYER)
def test_contiguous_append_and_read_property(lens, counts, layer):
    state = jp.init_contiguous(L, B, K, S, D, jnp.float32)
    for setup_layer in range(L):
        k = jnp.swapaxes(values(setup_layer + 1, (B, S, K, D)), 1, 2)
        state, _ = jp.contiguous_append(state, setup_layer, k, -k, jnp.asarray(lens, jnp.int32))
    before = {name: np.asarray(getattr(state, name)).copy() for name in ("k", "v", "seq_lens")}
    k = jnp.swapaxes(values(7, (B, T, K, D)), 1, 2)  # [B, K, T, D]
    state, ok = jp.contiguous_append(state, jnp.asarray(layer, jnp.int32), k, -k, jnp.asarray(counts, jnp.int32))
    after = {name: np.asarray(getattr(state, name)).copy() for name in ("k", "v", "seq_lens")}
    _, labels = classify(list(range(B)), counts, layer)
    grants = np.clip(counts, 0, T)
    expected_ok = 0 <= layer < L and bool(np.all(np.asarray(lens) + grants <= S))
    assert bool(ok) == expected_ok
    expected = {name: before[name].copy() for name in before}
    if expected_ok:
        for b in range(B):
            expected["k"][layer, b, :, lens[b]:lens[b] + grants[b]] = np.asarray(k)[b, :, :grants[b]]
            expected["v"][layer, b, :, lens[b]:lens[b] + grants[b]] = -np.asarray(k)[b, :, :grants[b]]
        expected["seq_lens"][layer] += grants
    for name in expected:
        assert_bit_equal(after[name], expected[name], name)
    k_all, _, seq_lens = jp.contiguous_read(state, jnp.asarray(layer, jnp.int32))
    if 0 <= layer < L:
        np.testing.assert_array_equal(np.asarray(seq_lens), expected["seq_lens"][layer])
        live = np.arange(S)[None, None, :, None] < expected["seq_lens"][layer][:, None, None, None]
        assert_bit_equal(k_all, np.where(live, expected["k"][layer], 0), "read")
    else:
        assert not np.any(np.asarray(seq_lens)) and not np.any(np.asarray(k_all)), "a layer out of range reads as empty"
    return labels | ({"refused"} if not expected_ok else set())


# ----------------------------------------------------------------------------- the cases of misuse, one test each


def two_rows_of_data():
    """Rows 0 and B-1 hold 5 positions in both layers; a snapshot to compare against."""
    state = jp.init_state(CONFIG)
    rows = jnp.asarray([0, B - 1], jnp.int32)
    for layer in range(L):
        state, ok = ops.append(state, layer, rows, values(layer, (2, 5, K, D)), values(layer + 5, (2, 5, K, D)))
        assert bool(ok)
    return state, snapshot(state)


def test_case_1_a_negative_sequence_index_is_a_padding_row():
    state, before = two_rows_of_data()
    minus_one = jnp.asarray([-1], jnp.int32)
    k = values(3, (1, 2, K, D))
    state, ok = ops.append(state, 0, minus_one, k, k)
    assert bool(ok), "a padding row does not fail the call"
    state, ok = ops.reserve(state, minus_one, jnp.asarray([9], jnp.int32), max_new_tokens=16)
    assert bool(ok)
    state, slots, ok = ops.allocate_slots(state, minus_one, jnp.asarray([2], jnp.int32), num_chunk_tokens=2)
    assert bool(ok) and np.all(np.asarray(slots) >= N * P)
    state, ok = ops.free_seqs(state, minus_one)
    assert bool(ok)
    k_read, _, lens = ops.gather_kv(state, 0, minus_one, max_len=8)
    assert int(lens[0]) == 0 and not np.any(np.asarray(k_read)), "reads as empty, not as row B-1"
    assert_same(before, snapshot(state), "calls through row -1")


def test_case_2_a_row_named_twice_is_refused_and_leaks_nothing():
    state, before = two_rows_of_data()
    twice = jnp.asarray([0, 0], jnp.int32)
    k = values(3, (2, 6, K, D))
    state, ok = ops.append(state, 0, twice, k, k)
    assert not bool(ok)
    state, ok = ops.reserve(state, twice, jnp.asarray([6, 6], jnp.int32), max_new_tokens=8)
    assert not bool(ok)
    state, _, ok = ops.allocate_slots(state, twice, jnp.asarray([1, 1], jnp.int32), num_chunk_tokens=1)
    assert not bool(ok)
    state, ok = ops.free_seqs(state, twice)
    assert not bool(ok)
    assert_same(before, snapshot(state), "calls naming row 0 twice")
    padding = jnp.asarray([B, 1, B, -3], jnp.int32)  # padding rows may repeat
    state, ok = ops.append(state, 0, padding, values(4, (4, 3, K, D)), values(4, (4, 3, K, D)))
    assert bool(ok) and int(state.table.seq_lens[0, 1]) == 3
    state, ok = ops.free_seqs(state, jnp.arange(B, dtype=jnp.int32))
    assert bool(ok) and int(state.allocator.num_free) == N, "every block back"


def test_case_3_negative_counts_and_block_ids_are_refused_or_ignored():
    alloc = jp.state.init_allocator(N)
    alloc, ids, ok = ops.allocate_blocks(alloc, count=N)
    assert bool(ok)
    with pytest.raises(ValueError, match="count must be an int >= 0, got -2"):
        ops.allocate_blocks(alloc, count=-2)
    alloc, ok = ops.free_blocks(alloc, jnp.asarray([-1, -N, N, 2 * N], jnp.int32))
    assert bool(ok) and int(alloc.num_free) == 0, "ids outside [0, N) free nothing, not block N-1"
    alloc, taken, ok = ops.allocate_blocks(alloc, count=1)
    assert not bool(ok) and int(taken[0]) == N, "no sentinel handed out as a block"
    assert_allocator_invariant(snapshot(alloc), tables=False)


def test_case_4_the_cache_allocator_refuses_a_block_a_sequence_holds(rng):
    cache = jp.PagedKVCache(CONFIG, block_size=P, num_blocks=N, max_seqs=B)
    cache.allocate_sequence("A")
    k = values(1, (K, 6, D))
    assert cache.append_tokens("A", 0, k, k)
    before = snapshot(cache.state)
    for block in cache.block_table("A"):
        with pytest.raises(ValueError, match=f"block {block} is held by sequence 'A'"):
            cache.allocator.free(block)
    assert_same(before, snapshot(cache.state), "a refused free")
    own = cache.allocator.allocate()  # what the allocator hands out, it may give back
    cache.allocator.free(own)
    cache.allocate_sequence("B")
    assert cache.append_tokens("B", 0, -k, -k)
    assert not set(cache.block_table("A")) & set(cache.block_table("B"))
    assert_bit_equal(cache.get_kv("A", 0)[0], k, "A's data")


def test_case_5_a_layer_out_of_range_is_refused():
    state, before = two_rows_of_data()
    rows = jnp.asarray([0], jnp.int32)
    k = values(3, (1, 2, K, D))
    for layer in (L, -1, 5):
        with pytest.raises(IndexError, match=rf"layer must be an int in \[0, {L}\), got {layer}"):
            ops.append(state, layer, rows, k, k)
        for call in (lambda: ops.gather_kv(state, layer, rows, max_len=8),
                     lambda: ops.reserve(state, rows, jnp.asarray([1], jnp.int32), layer, max_new_tokens=1),
                     lambda: ops.write_slots(state, layer, jnp.zeros((1, 2), jnp.int32), k, k)):
            with pytest.raises(IndexError):
                call()
    assert_same(before, snapshot(state), "refusals before any work")
    for layer in (jnp.asarray(L), jnp.asarray(-1)):  # traced: ok=False, nothing written, reads empty
        state, ok = ops.append(state, layer, rows, k, k)
        assert not bool(ok)
        state, ok = ops.reserve(state, rows, jnp.asarray([8], jnp.int32), layer, max_new_tokens=8)
        assert not bool(ok)
        k_read, _, lens = ops.gather_kv(state, layer, rows, max_len=8)
        assert int(lens[0]) == 0 and not np.any(np.asarray(k_read))
        state = jax.jit(ops.write_slots)(state, layer, jnp.asarray([[0, 1]], jnp.int32), k, k)
    assert_same(before, snapshot(state), "traced layers out of range")
    dense = jp.init_contiguous(L, 1, K, 8, D, jnp.float32)
    with pytest.raises(IndexError):
        jp.contiguous_append(dense, L, jnp.swapaxes(k, 1, 2), jnp.swapaxes(k, 1, 2))
    with pytest.raises(IndexError):
        jp.contiguous_read(dense, -1)
    dense, ok = jp.contiguous_append(dense, jnp.asarray(-1), jnp.swapaxes(k, 1, 2), jnp.swapaxes(k, 1, 2))
    assert not bool(ok) and not np.any(np.asarray(dense.k)) and not np.any(np.asarray(dense.seq_lens))


def test_case_6_the_adapter_clips_num_tokens_as_kvcache_does_and_both_refuse_bad_ones(rng):
    adapter = jp.create_paged_kv_cache(CONFIG, batch_size=2, block_size=P, blocks_per_seq=4)
    dense = jp.KVCache(CONFIG, batch_size=2, max_len=16)
    k = values(1, (2, K, 3, D))
    for num_tokens in ([4, 9], [3, 0]):  # past T = 3: clipped to 3
        paged_k, paged_v = adapter.update(0, k, -k, jnp.asarray(num_tokens, jnp.int32))
        dense_k, dense_v = dense.update(0, k, -k, jnp.asarray(num_tokens, jnp.int32))
        assert_bit_equal(paged_k, dense_k, "k")
        assert_bit_equal(paged_v, dense_v, "v")
    np.testing.assert_array_equal(adapter.seq_lens(0), [6, 3])
    np.testing.assert_array_equal(dense.seq_lens(0), [6, 3])
    bad = [(ValueError, "num_tokens must be >= 0", jnp.asarray([-1, 2], jnp.int32)),
           (TypeError, "num_tokens must be an integer array, got float32", jnp.asarray([1.0, 2.0])),
           (ValueError, r"num_tokens must be \[B=2\], got shape \(3,\)", jnp.asarray([1, 2, 3], jnp.int32)),
           (ValueError, r"num_tokens must be \[B=2\], got shape \(\)", 2)]
    for cache in (adapter, dense):
        lens = cache.seq_lens(0)
        for error, message, num_tokens in bad:
            with pytest.raises(error, match=message):
                cache.update(0, k, -k, num_tokens)
        np.testing.assert_array_equal(cache.seq_lens(0), lens)


def run_in_threads(targets, threaded=True):
    """Runs each target in a thread of its own (or one after another); re-raises the first error."""
    errors = []

    def run(target):
        try:
            target()
        except BaseException as error:  # a thread's error would otherwise only be printed
            errors.append(error)

    if threaded:
        threads = [threading.Thread(target=run, args=(target,)) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for target in targets:
            run(target)
    if errors:
        raise errors[0]


@pytest.mark.slow
def test_case_7_threads_share_one_cache():
    """4 threads x 40 appends through one PagedKVCache, and 4 x 10 updates through one adapter: none
    fails, and the lengths and data equal a serial run's."""
    config = jp.CacheConfig(num_layers=L, num_kv_heads=K, head_dim=D, num_blocks=256, block_size=P, max_seqs=4)
    lengths = [3 + i % 2 for i in range(40)]  # one bucket of chunk lengths: one compilation

    def appends(cache, seq_id):
        for i, n in enumerate(lengths):
            k = values(seq_id * 100 + i, (K, n, D))
            assert cache.append_tokens(seq_id, i % L, k, -k)

    caches = []
    for threaded in (False, True):
        cache = jp.PagedKVCache(config, block_size=P, num_blocks=256, max_seqs=4)
        for seq_id in range(4):
            cache.allocate_sequence(seq_id)
        run_in_threads([lambda seq_id=seq_id: appends(cache, seq_id) for seq_id in range(4)], threaded)
        caches.append(cache)
    serial, threaded = caches
    for seq_id in range(4):
        for layer in range(L):
            assert threaded.get_seq_len(seq_id, layer) == serial.get_seq_len(seq_id, layer) == sum(lengths[layer::L])
            assert_bit_equal(threaded.get_kv(seq_id, layer)[0], serial.get_kv(seq_id, layer)[0], f"seq {seq_id}")
    assert threaded.memory_stats().used_blocks == serial.memory_stats().used_blocks

    adapter = jp.create_paged_kv_cache(config, batch_size=2, block_size=P, blocks_per_seq=32)
    for layer in range(L):  # 40 positions first, so every read below pads to one bucket (64)
        adapter.update(layer, values(1, (2, K, 40, D)), values(1, (2, K, 40, D)))
    one = values(0, (2, K, 1, D))
    run_in_threads([lambda: [adapter.update(i % L, one, one) for i in range(10)]] * 4)
    for layer in range(L):
        np.testing.assert_array_equal(adapter.seq_lens(layer), [60, 60])


def test_case_9_clear_messages_before_any_change():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got -1"):
        jp.KVCache(CONFIG, batch_size=-1, max_len=8)
    with pytest.raises(ValueError, match="max_len must be an int >= 1, got 0"):
        jp.KVCache(CONFIG, batch_size=1, max_len=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        jp.create_paged_kv_cache(CONFIG, batch_size=0)
    state, _ = two_rows_of_data()
    rows = jnp.asarray([0], jnp.int32)
    with pytest.raises(TypeError, match="num_tokens must be an integer array, got float32"):
        ops.append(state, 0, rows, values(1, (1, 2, K, D)), values(1, (1, 2, K, D)), jnp.asarray([1.0]))
    with pytest.raises(ValueError, match=r"num_tokens must be \[B=1\], got shape \(2,\)"):
        ops.append(state, 0, rows, values(1, (1, 2, K, D)), values(1, (1, 2, K, D)), jnp.asarray([1, 1], jnp.int32))
    new_state, ok = ops.append(state, 0, rows, values(1, (1, 2, K, D)), values(1, (1, 2, K, D)))
    assert bool(ok)
    with pytest.raises(ValueError, match="state was donated to an earlier call"):
        ops.append(state, 0, rows, values(1, (1, 2, K, D)), values(1, (1, 2, K, D)))
    alloc = jp.state.init_allocator(N)
    ops.allocate_blocks(alloc, count=1)
    with pytest.raises(ValueError, match="alloc was donated"):
        ops.free_blocks(alloc, jnp.asarray([0], jnp.int32))

"""The paged kernels against the reference, in Pallas interpret mode on the CPU (and natively on a
GPU); their launch rules at given GPU numbers; the package's answer where the Triton lowering is missing."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged import kernels
from jaxpaged.attention import attend
from jaxpaged.kernels import launch
from jaxpaged.kernels.decode import paged_decode_attention
from jaxpaged.kernels.prefill import paged_prefill_attention

ON_GPU = jax.default_backend() == "gpu"


def _random_cache(rng, *, batch, kv_heads, head_dim, block_size, lengths, num_layers=2, dtype=jnp.float32,
                  max_blocks=8, poison=True):
    """Pools in jaxpaged's layout, [L, K, N, P, D], with random data, NaN in every slot no sequence
    holds, and a shuffled block table."""
    num_blocks = batch * max_blocks + 3
    shape = (num_layers * num_blocks, block_size, kv_heads, head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    live = np.zeros(shape[:2], bool)
    tables = np.full((batch, max_blocks), num_blocks, np.int32)  # N: the sentinel
    order = rng.permutation(num_blocks)
    taken = 0
    for b, n in enumerate(lengths):
        count = -(-n // block_size)
        tables[b, :count] = order[taken:taken + count]
        taken += count
        for layer in range(num_layers):
            for pos in range(n):
                live[layer * num_blocks + tables[b, pos // block_size], pos % block_size] = True
    if poison:
        k[~live], v[~live] = np.nan, np.nan
    head_major = (num_layers, num_blocks, block_size, kv_heads, head_dim), (0, 3, 1, 2, 4)
    k, v = (jnp.asarray(x.reshape(head_major[0]).transpose(head_major[1]), dtype) for x in (k, v))
    return k, v, tables, num_blocks


def _flat_blocks(pool):
    """A [L, K, N, P, D] pool as float32 numpy blocks of all layers, [L * N, P, K, D], for the references."""
    blocks = np.asarray(jnp.transpose(pool, (0, 2, 3, 1, 4)).astype(jnp.float32))
    return blocks.reshape(-1, *blocks.shape[2:])


def _reference(q, k_pool, v_pool, tables, lengths, layer, num_blocks):
    block_size = k_pool.shape[3]
    positions = np.arange(tables.shape[1] * block_size)
    blocks = np.minimum(tables[:, positions // block_size], num_blocks - 1) + layer * num_blocks
    k = _flat_blocks(k_pool)[blocks, positions % block_size]
    v = _flat_blocks(v_pool)[blocks, positions % block_size]
    live = (positions[None, :] < np.asarray(lengths)[:, None])[..., None, None]
    k, v = np.where(live, k, 0), np.where(live, v, 0)
    lens = jnp.asarray(lengths, jnp.int32)
    return np.asarray(attend(q.astype(jnp.float32)[:, None], jnp.asarray(k), jnp.asarray(v), lens[:, None] - 1, lens))[:, 0]


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    pytest.param(4, 4, 64, 8, marks=pytest.mark.slow), pytest.param(8, 2, 64, 16, marks=pytest.mark.slow), (9, 3, 64, 16),
    (32, 4, 128, 32)])
def test_decode_kernel_matches_the_reference(heads, kv_heads, head_dim, block_size):
    rng = np.random.default_rng(heads * 100 + block_size)
    lengths = [1, block_size, 3 * block_size + 5, 0]
    k, v, tables, num_blocks = _random_cache(rng, batch=4, kv_heads=kv_heads, head_dim=head_dim,
                                             block_size=block_size, lengths=lengths)
    q = jnp.asarray(rng.standard_normal((4, heads, head_dim)), jnp.float32)
    variants = [(0, 1, False, False), (1, 3, False, False), (1, 4, True, False), (1, 1, True, False),
                (0, 3, False, True), (1, 1, True, True), (0, 3, True, True)]
    for layer, splits, transposed, row_gather in variants:
        out = paged_decode_attention(q, k, v, layer, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                                     blocks_per_step=2, num_splits=splits, transposed=transposed,
                                     row_gather=row_gather, interpret=not ON_GPU)
        out = np.asarray(out)
        assert np.isfinite(out).all(), "a NaN in an unused slot reached the output"
        expected = _reference(q, k, v, tables, lengths, layer, num_blocks)
        np.testing.assert_allclose(out[:3], expected[:3], atol=2e-3 if ON_GPU else 1e-5, rtol=0)
        assert not out[3].any(), "an empty sequence attends to nothing"


def test_decode_kernel_in_bfloat16_with_either_gather():
    rng = np.random.default_rng(3)
    lengths = [17, 40]
    k, v, tables, num_blocks = _random_cache(rng, batch=2, kv_heads=2, head_dim=64, block_size=8, lengths=lengths,
                                             dtype=jnp.bfloat16, poison=False)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.bfloat16)
    expected = _reference(q, k, v, tables, lengths, 1, num_blocks)
    for row_gather in (True, False):
        out = paged_decode_attention(q, k, v, 1, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                                     blocks_per_step=4, row_gather=row_gather, interpret=not ON_GPU)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=0)


@pytest.mark.parametrize("heads, kv_heads, packed", [(16, 4, 4), (8, 8, 2), (32, 2, 2)])
def test_decode_kernel_packs_kv_heads_into_one_program(heads, kv_heads, packed):
    """With `packed` kv heads per program (their G query heads each in one tile, each row seeing only
    its own kv head's positions), against the reference: plain and transposed products, one split
    and three (merged), G from 1 to 16, ragged lengths and NaN in every unused slot."""
    rng = np.random.default_rng(heads + packed)
    lengths = [1, 16, 3 * 16 + 5, 0]
    k, v, tables, num_blocks = _random_cache(rng, batch=4, kv_heads=kv_heads, head_dim=64, block_size=16,
                                             lengths=lengths)
    q = jnp.asarray(rng.standard_normal((4, heads, 64)), jnp.float32)
    expected = _reference(q, k, v, tables, lengths, 1, num_blocks)
    for splits, transposed in [(1, False), (1, True), (3, False)]:
        out = np.asarray(paged_decode_attention(q, k, v, 1, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                                                blocks_per_step=2, num_splits=splits, transposed=transposed,
                                                heads_per_program=packed, interpret=not ON_GPU))
        assert np.isfinite(out).all(), "a NaN in an unused slot reached the output"
        np.testing.assert_allclose(out[:3], expected[:3], atol=2e-3 if ON_GPU else 1e-5, rtol=0)
        assert not out[3].any(), "an empty sequence attends to nothing"
    assert _decode_launches(4, kv_heads, 64, max_blocks=8, heads_per_program=packed)[0][1][:2] == (4, kv_heads // packed)


def test_decode_kernel_packs_kv_heads_by_default_only_for_many_short_programs():
    """`default_heads_per_program`: 1,024 sequence-kv-head pairs over tables of 512 positions run as
    256 programs of 4 kv heads; 64 x 8 as 256 of 2; wider tables, fewer pairs or the block gather,
    one kv head a program (an H100's numbers)."""
    assert _decode_launches(128, 8, 64, max_blocks=32) == [("jaxpaged_decode", (128, 2, 1), 5)]
    assert _decode_launches(64, 8, 128, max_blocks=32)[0][1] == (64, 4, 1)
    assert _decode_launches(128, 8, 64, max_blocks=128)[0][1] == (128, 8, 1), "2,048 positions"
    assert _decode_launches(32, 8, 64, max_blocks=32)[0][1] == (32, 8, 1), "256 pairs"
    assert _decode_launches(128, 8, 64, max_blocks=32, row_gather=False)[0][1] == (128, 8, 1)
    assert _decode_launches(128, 8, 64, max_blocks=32, heads_per_program=1)[0][1] == (128, 8, 1)


@pytest.mark.parametrize("options, message", [
    (dict(heads_per_program=3), "power of two dividing the 4 kv heads"),
    (dict(heads_per_program=8), "power of two dividing the 4 kv heads"),
    (dict(heads_per_program=2, row_gather=False), "the row gather"),
])
def test_decode_kernel_refuses_kv_heads_it_can_not_pack(options, message):
    pool = jax.ShapeDtypeStruct((1, 4, 16, 16, 64), jnp.float32)
    q = jax.ShapeDtypeStruct((2, 8, 64), jnp.float32)
    tables, lengths = jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda q, k, v, t, n: paged_decode_attention(q, k, v, 0, t, n, **options), q, pool, pool,
                       tables, lengths)


def test_paged_attention_uses_the_kernel_on_a_gpu_and_agrees_with_the_reference():
    """Through the cache state: the dispatching function against the gather reference, the same inputs."""
    rng = np.random.default_rng(4)
    config = jp.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=32, block_size=16, max_seqs=3,
                            max_blocks_per_seq=8)
    state = jp.init_state(config)
    seq_idx = jnp.arange(3, dtype=jnp.int32)
    kv = jnp.asarray(rng.standard_normal((3, 70, 2, 64)), jnp.float32)
    for layer in range(2):
        state, ok = jp.append(state, layer, seq_idx, kv, -kv, jnp.asarray([70, 16, 1], jnp.int32))
    q = jnp.asarray(rng.standard_normal((3, 1, 8, 64)), jnp.float32)
    positions = (state.table.seq_lens[1, :3] - 1)[:, None]
    out = jp.paged_attention(q, state, 1, seq_idx, positions)
    k, v, lens = jp.gather_kv(state, 1, seq_idx, max_len=128)
    np.testing.assert_allclose(np.asarray(out), np.asarray(attend(q, k, v, positions, lens)),
                               atol=2e-3 if ON_GPU else 1e-6, rtol=0)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (8, 2, 64, 16), (9, 3, 64, 8), (4, 4, 128, 16),
    (10, 2, 64, 16),  # 5 heads a group: 6 tokens fill 30 of the 32 rows, the last 2 repeat the 30th
    (64, 1, 64, 16),  # a group wider than the 32-row tile: the tile widened to 64 rows, 1 token a program
])
def test_prefill_kernel_matches_the_reference_on_a_cached_prefix(heads, kv_heads, head_dim, block_size):
    """T new queries per sequence on top of a cached prefix, causal, ragged, with padding queries."""
    rng = np.random.default_rng(heads + block_size)
    lengths = [37, 5, 16, 0, 77]  # after the chunk was appended
    chunk = [20, 5, 3, 0, 9]  # how many of those are this chunk's queries (the last has unmasked steps)
    k, v, tables, num_blocks = _random_cache(rng, batch=5, kv_heads=kv_heads, head_dim=head_dim,
                                             block_size=block_size, lengths=lengths, max_blocks=16)
    num_q = max(chunk)
    q = jnp.asarray(rng.standard_normal((5, num_q, heads, head_dim)), jnp.float32)
    positions = np.full((5, num_q), -1, np.int32)
    for b, (n, c) in enumerate(zip(lengths, chunk)):
        positions[b, :c] = np.arange(n - c, n)
    outs = [np.asarray(paged_prefill_attention(q, k, v, 1, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                                               jnp.asarray(positions), blocks_per_step=2, query_rows=32,
                                               num_splits=splits, interpret=not ON_GPU))
            for splits in (1, 3)]
    assert all(np.isfinite(out).all() for out in outs)
    block = np.asarray(tables)
    pos = np.arange(block.shape[1] * block_size)
    slots = np.minimum(block[:, pos // block_size], num_blocks - 1) + num_blocks
    dense_k = jnp.asarray(np.nan_to_num(_flat_blocks(k)[slots, pos % block_size]))
    dense_v = jnp.asarray(np.nan_to_num(_flat_blocks(v)[slots, pos % block_size]))
    expected = np.asarray(attend(q, dense_k, dense_v, jnp.asarray(positions), jnp.asarray(lengths, jnp.int32)))
    for out in outs:  # one split, three splits merged
        for b, c in enumerate(chunk):
            np.testing.assert_allclose(out[b, :c], expected[b, :c], atol=2e-3 if ON_GPU else 1e-5, rtol=0)
            assert not out[b, c:].any(), "padding queries return zeros"


def test_prefill_kernel_on_tiles_equals_each_chunk_as_one_row():
    """The engine's packed prefill: each chunk cut into tiles of Q tokens, every tile a row of the
    kernel naming its chunk's table row (rows repeat), and padding tiles. With Q the tokens of one
    program, the tiles run the very programs of the chunk as one row: the same output bit for bit."""
    rng = np.random.default_rng(3)
    lengths, chunk = [45, 30], [29, 16]  # after the chunks were appended; the first starts mid-block
    k, v, tables, sentinel = _random_cache(rng, batch=2, kv_heads=2, head_dim=64, block_size=8, lengths=lengths,
                                           num_layers=1, max_blocks=8)
    tokens = 8  # query_rows 16 over G = 2 heads: 8 tokens a program
    q = jnp.asarray(rng.standard_normal((2, 32, 4, 64)), jnp.float32)
    positions = np.full((2, 32), -1, np.int32)
    for b, (n, c) in enumerate(zip(lengths, chunk)):
        positions[b, :c] = np.arange(n - c, n)
    run = functools.partial(paged_prefill_attention, k_pool=k, v_pool=v, layer=0, blocks_per_step=2, query_rows=16,
                            num_splits=1, interpret=not ON_GPU)
    rows = np.asarray(run(q, block_tables=jnp.asarray(tables), lengths=jnp.asarray(lengths, jnp.int32),
                          q_positions=jnp.asarray(positions)))
    tile_of = [(b, j) for b, c in enumerate(chunk) for j in range(-(-c // tokens))] + [(None, 0)] * 2
    pick = lambda x, fill: np.stack([x[b] if b is not None else fill for b, _ in tile_of])  # noqa: E731
    tile_q = np.stack([np.asarray(q)[b, tokens * j:tokens * (j + 1)] if b is not None else np.zeros((tokens, 4, 64))
                       for b, j in tile_of]).astype(np.float32)
    tile_pos = np.stack([positions[b, tokens * j:tokens * (j + 1)] if b is not None else np.full(tokens, -1)
                         for b, j in tile_of]).astype(np.int32)
    tiles = np.asarray(run(jnp.asarray(tile_q), block_tables=jnp.asarray(pick(np.asarray(tables), np.full(8, sentinel))),
                           lengths=jnp.asarray(pick(np.asarray(lengths), 0), jnp.int32),
                           q_positions=jnp.asarray(tile_pos)))
    assert len(tile_of) == 8 and np.isfinite(tiles).all()
    for i, (b, j) in enumerate(tile_of):
        if b is None:
            assert not tiles[i].any(), "a padding tile writes zeros"
        else:
            assert np.array_equal(tiles[i], rows[b, tokens * j:tokens * (j + 1)]), (b, j)


def test_prefill_queries_placed_past_the_length_see_only_the_positions_before_it():
    """A query position at or past its sequence's length (its own K/V not cached: a caller's error)
    sees the positions below the length and no further: the slots past it hold NaN here, and the
    output equals that of queries placed at the last cached position."""
    rng = np.random.default_rng(7)
    lengths = [21, 40]
    k, v, tables, _ = _random_cache(rng, batch=2, kv_heads=2, head_dim=64, block_size=8, lengths=lengths,
                                    num_layers=1)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 64)), jnp.float32)
    past = np.array([[19, 25, 60], [39, 40, 47]], np.int32)  # within, then past each length
    clamped = np.minimum(past, np.asarray(lengths)[:, None] - 1)
    outs = [np.asarray(paged_prefill_attention(q, k, v, 0, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                                               jnp.asarray(positions), blocks_per_step=2, query_rows=16,
                                               interpret=not ON_GPU))
            for positions in (past, clamped)]
    assert np.isfinite(outs[0]).all(), "a NaN past the length reached the output"
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-3 if ON_GPU else 1e-6, rtol=0)


_REL_TOL = {jnp.float32: 2e-3 if ON_GPU else 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _rel_err(out, expected):
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    return np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30)


@pytest.mark.parametrize("draw", range(24 if ON_GPU else 3))
def test_kernels_on_random_shapes_lengths_and_launches(draw):
    """Decode and prefill against the reference over random head shapes, block sizes, dtypes, ragged
    lengths (0 and full included) and launch choices (splits, blocks per step, the gather, the
    products, packed kv heads; for prefill, tiles and splits of the positions too)."""
    rng = np.random.default_rng(1000 + draw)
    kv_heads = int(rng.choice([1, 2, 4, 8]))
    heads = kv_heads * int(rng.choice([1, 2, 3, 4, 8]))
    head_dim = int(rng.choice([64, 128]))
    block_size = int(rng.choice([8, 16, 32]))
    max_blocks = int(rng.choice([4, 8, 16]))
    batch = int(rng.integers(1, 6))
    dtype = [jnp.float32, jnp.bfloat16, jnp.float16][int(rng.integers(3))]
    lengths = rng.integers(0, max_blocks * block_size + 1, size=batch)
    lengths[rng.integers(batch)] = max_blocks * block_size if rng.random() < 0.5 else 0
    k, v, tables, num_blocks = _random_cache(rng, batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                                             block_size=block_size, lengths=lengths.tolist(), dtype=dtype,
                                             max_blocks=max_blocks)
    layer = int(rng.integers(2))
    blocks_per_step = int(rng.choice([b for b in (1, 2, 4, 8) if max_blocks % b == 0 and b * block_size <= 64]))
    options = dict(num_splits=[None, 1, 2, 3][int(rng.integers(4))], blocks_per_step=blocks_per_step,
                   transposed=[None, True, False][int(rng.integers(3))],
                   row_gather=[None, True, False][int(rng.choice(3, p=[0.4, 0.4, 0.2]))],
                   gpu=[None, launch.H100, launch.Gpu(sm_count=78)][int(rng.integers(3))])
    if options["row_gather"] is not False and rng.random() < 0.4:  # kv heads packed: a power of two dividing K
        options["heads_per_program"] = int(rng.choice([i for i in (1, 2, 4, 8) if kv_heads % i == 0]))
    lens = jnp.asarray(lengths, jnp.int32)
    row_bytes = head_dim * jnp.dtype(dtype).itemsize

    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    out = paged_decode_attention(q, k, v, layer, jnp.asarray(tables), lens, interpret=not ON_GPU, **options)
    assert out.shape == q.shape and out.dtype == q.dtype and np.isfinite(np.asarray(out, np.float32)).all(), options
    expected = _reference(q, k, v, tables, lengths, layer, num_blocks)
    live = lengths > 0
    assert _rel_err(np.asarray(out)[live], expected[live]) < _REL_TOL[dtype], options
    assert not np.asarray(out, np.float32)[~live].any(), "an empty sequence attends to nothing"

    # Prefill: the last `chunk` positions of each sequence as queries, causal, padded to the longest chunk.
    chunk = np.minimum(lengths, rng.integers(1, 2 * block_size + 1, size=batch))
    num_q = max(int(chunk.max()), 1)
    positions = np.full((batch, num_q), -1, np.int32)
    for b in range(batch):
        positions[b, : chunk[b]] = np.arange(lengths[b] - chunk[b], lengths[b])
    q = jnp.asarray(rng.standard_normal((batch, num_q, heads, head_dim)), dtype)
    out = np.asarray(paged_prefill_attention(q, k, v, layer, jnp.asarray(tables), lens, jnp.asarray(positions),
                                             blocks_per_step=blocks_per_step,
                                             query_rows=int(rng.choice([16, 32, 64] + [128] * (row_bytes <= 256))),
                                             num_splits=options["num_splits"], gpu=options["gpu"],
                                             interpret=not ON_GPU),
                     np.float32)
    pos = np.arange(max_blocks * block_size)
    slots = np.minimum(tables[:, pos // block_size], num_blocks - 1) + layer * num_blocks
    dense = [jnp.asarray(np.nan_to_num(_flat_blocks(pool)[slots, pos % block_size])) for pool in (k, v)]
    expected = np.asarray(attend(q.astype(jnp.float32), *dense, jnp.asarray(positions), lens))
    real = positions >= 0
    assert np.isfinite(out).all()
    if real.any():
        assert _rel_err(out[real], expected[real]) < _REL_TOL[dtype]
    assert not out[~real].any(), "padding queries return zeros"


def test_pools_are_addressable_below_2_31_elements_or_past_2_32_bytes():
    """Pallas's Triton lowering offsets a ref in 64 bits past 2^32 bytes and in signed 32 bits
    otherwise: only 8-bit pools of 2^31 to 2^32 elements fall between, and the engine's pool sizing
    steps below them (as it does below the kernels' 2^31 rows)."""
    assert launch.pool_addressable(2**31 + 1, 2, 128) and launch.pool_addressable(2**33, 4, 64)
    assert launch.pool_addressable(2**31 - 1, 1, 64) and launch.pool_addressable(2**32 + 1, 1, 64)
    assert not launch.pool_addressable(2**31, 1, 64) and not launch.pool_addressable(2**32, 1, 64)
    assert not launch.pool_addressable(2**31 * 64, 2, 64), "2^31 rows of D"
    block = 16 * 28 * 8 * 128  # a block of every layer and kv head of Qwen3-0.6B's shape
    assert launch.addressable_blocks(20_000, block, 2, 128) == 20_000
    assert launch.addressable_blocks(4_000, block, 1, 128) == 4_000
    gap = launch.addressable_blocks(8_000, block, 1, 128)  # 3.7e9 elements: between
    assert gap == (2**31 - 1) // block and launch.pool_addressable(gap * block, 1, 128)
    assert launch.addressable_blocks(10_000, block, 1, 128) == 10_000  # 4.6e9: past 2^32 bytes
    rows = launch.addressable_blocks(2**40 // block, block, 2, 128)
    assert launch.pool_addressable(rows * block, 2, 128) and not launch.pool_addressable((rows + 1) * block, 2, 128)


def test_addressable_blocks_refuses_what_is_not_a_count():
    for args, error, name in (((-5, 16, 1, 64), ValueError, "num_blocks must be an int >= 0"),
                              ((2.5, 16, 1, 64), TypeError, "num_blocks must be an int >= 0"),
                              ((8, 0, 1, 64), ValueError, "block_elements must be an int >= 1"),
                              ((8, -16, 1, 64), ValueError, "block_elements must be an int >= 1"),
                              ((8, 16, 1, 0), ValueError, "head_dim must be an int >= 1")):
        with pytest.raises(error, match=name):
            launch.addressable_blocks(*args)


def test_the_kernels_are_chosen_for_one_devices_shard_of_the_pools():
    """Under a tensor axis each device holds its kv heads of every block: an int8 pool sized for
    two devices is in the 8-bit gap as a whole but not per device, and the choice follows the
    device's shard (`device_config`), as the kernels under shard_map see it."""
    import types

    from jaxpaged.attention import choose_impl
    from jaxpaged.parallel import TENSOR_AXIS, device_config

    if kernels.unavailable_reason() is not None:
        pytest.skip(kernels.unavailable_reason())
    block = 16 * 32 * 8 * 128  # a block of every layer and kv head of an 8B shape
    num_blocks = launch.addressable_blocks(8191, block // 2, 1, 128)
    config = jp.CacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=num_blocks, block_size=16,
                            max_seqs=8, max_blocks_per_seq=64, kv_dtype="int8")
    with pytest.raises(ValueError, match="pool of"):
        choose_impl("kernel", config, backend="gpu")
    two = types.SimpleNamespace(shape={TENSOR_AXIS: 2})
    assert device_config(config, two).num_kv_heads == 4 and device_config(config, None) is config
    assert choose_impl("kernel", device_config(config, two), backend="gpu") == "kernel"


def test_kernels_refuse_an_8_bit_pool_they_can_not_address_and_the_model_falls_back():
    """An int8 pool of 2^31 to 2^32 elements is refused with a clear error (checked while tracing,
    nothing allocated), and the dispatch takes the reference path for it."""
    kv_heads, head_dim, block_size = 8, 128, 16
    blocks = 2**31 // (block_size * kv_heads * head_dim) + 1
    pool = jax.ShapeDtypeStruct((1, kv_heads, blocks, block_size, head_dim), jnp.int8)
    v_pool = jax.ShapeDtypeStruct((1, kv_heads, blocks, head_dim, block_size), jnp.int8)  # 8-bit V's blocks transposed
    scale = jax.ShapeDtypeStruct(pool.shape[:-1], jnp.float16)
    tables, lengths = jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    q = jax.ShapeDtypeStruct((2, 32, head_dim), jnp.bfloat16)
    with pytest.raises(ValueError, match="beyond the kernels' offsets"):
        jax.eval_shape(lambda q, k, v, t, n, s: paged_decode_attention(q, k, v, 0, t, n, k_scale=s, v_scale=s),
                       q, pool, v_pool, tables, lengths, scale)
    q = jax.ShapeDtypeStruct((2, 3, 32, head_dim), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="beyond the kernels' offsets"):
        jax.eval_shape(lambda q, k, v, t, n, p, s: paged_prefill_attention(q, k, v, 0, t, n, p, k_scale=s, v_scale=s),
                       q, pool, v_pool, tables, lengths, positions, scale)

    def traced_attention(num_blocks):
        config = jp.CacheConfig(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                                block_size=block_size, max_seqs=2, max_blocks_per_seq=4, dtype="bfloat16",
                                kv_dtype="int8")
        state = jax.eval_shape(lambda: jp.init_state(config))
        q = jax.ShapeDtypeStruct((2, 1, 32, head_dim), jnp.bfloat16)
        seq_idx, positions = jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2, 1), jnp.int32)
        return str(jax.make_jaxpr(lambda q, s, i, p: jp.paged_attention(q, s, 0, i, p))(q, state, seq_idx, positions))

    assert "pallas_call" not in traced_attention(blocks), "an unaddressable pool must take the reference path"
    assert ("pallas_call" in traced_attention(64)) == ON_GPU


@pytest.mark.skipif(not ON_GPU, reason="a 4.3 GB pool, read by the compiled kernels: GPU only")
def test_kernels_read_a_bfloat16_pool_past_2_31_elements():
    """Blocks at the far end of a pool of more than 2^31 elements (64-bit offsets) read right, by
    both kernels, against the reference over the same blocks gathered."""
    kv_heads, head_dim, block_size, heads = 8, 128, 16, 32
    num_blocks = 2**31 // (kv_heads * block_size * head_dim) + 64
    shape = (1, kv_heads, num_blocks, block_size, head_dim)
    key_k, key_v, key_q = jax.random.split(jax.random.key(0), 3)
    ids = jnp.arange(num_blocks - 12, num_blocks, dtype=jnp.int32)  # the last 12 blocks, two rows of 6
    values = lambda key: jax.random.normal(key, (1, kv_heads, 12, block_size, head_dim), jnp.bfloat16)
    k_pool = jnp.zeros(shape, jnp.bfloat16).at[:, :, ids].set(values(key_k))
    v_pool = jnp.zeros(shape, jnp.bfloat16).at[:, :, ids].set(values(key_v))
    assert k_pool.size > 2**31
    tables, lengths = ids.reshape(2, 6), jnp.asarray([90, 70], jnp.int32)
    dense = lambda pool: pool[0][:, tables].transpose(1, 2, 3, 0, 4).reshape(2, 6 * block_size, kv_heads, head_dim)
    dense_k, dense_v = dense(k_pool).astype(jnp.float32), dense(v_pool).astype(jnp.float32)
    q = jax.random.normal(key_q, (2, 4, heads, head_dim), jnp.bfloat16)
    positions = lengths[:, None] - 4 + jnp.arange(4)[None, :]
    expected = attend(q.astype(jnp.float32), dense_k, dense_v, positions, lengths)
    prefill = paged_prefill_attention(q, k_pool, v_pool, 0, tables, lengths, positions)
    decode = paged_decode_attention(q[:, -1], k_pool, v_pool, 0, tables, lengths)
    assert _rel_err(np.asarray(prefill, np.float32), np.asarray(expected)) < _REL_TOL[jnp.bfloat16]
    assert _rel_err(np.asarray(decode, np.float32), np.asarray(expected[:, -1])) < _REL_TOL[jnp.bfloat16]


_GOOD = dict(q=((2, 4, 64), jnp.float32), k=((2, 2, 8, 8, 64), jnp.float32), v=((2, 2, 8, 8, 64), jnp.float32),
             tables=((2, 4), jnp.int32), lengths=((2,), jnp.int32))


@pytest.mark.parametrize("change, message", [
    (dict(q=((2, 4, 32), jnp.float32)), "head dims must agree"),
    (dict(q=((2, 3, 64), jnp.float32)), "multiple of the 2 kv heads"),
    (dict(q=((3, 4, 64), jnp.float32)), "block_tables must be integers of shape"),
    (dict(lengths=((1,), jnp.int32)), "lengths must be integers of shape"),
    (dict(tables=((2, 4), jnp.float32)), "block_tables must be integers"),
    (dict(v=((2, 2, 8, 8, 32), jnp.float32)), "k_pool and v_pool differ"),
    (dict(k=((16, 8, 2, 64), jnp.float32), v=((16, 8, 2, 64), jnp.float32)), r"pools must be \[L, K, N, P, D\]"),
])
def test_kernels_reject_inconsistent_inputs_with_a_clear_error(change, message):
    """Inputs the kernels would read out of bounds or group wrongly fail while tracing, saying what is wrong."""
    spec = {name: jax.ShapeDtypeStruct(*shape_dtype) for name, shape_dtype in {**_GOOD, **change}.items()}
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda q, k, v, t, n: paged_decode_attention(q, k, v, 0, t, n), spec["q"],
                       spec["k"], spec["v"], spec["tables"], spec["lengths"])
    q = jax.ShapeDtypeStruct((spec["q"].shape[0], 3, *spec["q"].shape[1:]), jnp.float32)
    positions = jax.ShapeDtypeStruct((spec["q"].shape[0], 3), jnp.int32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda q, k, v, t, n, p: paged_prefill_attention(q, k, v, 0, t, n, p), q,
                       spec["k"], spec["v"], spec["tables"], spec["lengths"], positions)


def test_decode_kernel_gathers_whole_blocks_only_where_each_split_is_one_step():
    """The default gather: rows of positions (the pools viewed [L * K * N * P, D]) where a split walks
    several loop steps, whole blocks ([L * K * N, P, D]) where it walks one (`default_row_gather`)."""
    def pool_operand_ndims(max_blocks):
        pool = jax.ShapeDtypeStruct((1, 2, 64 * max_blocks, 16, 64), jnp.bfloat16)
        q = jax.ShapeDtypeStruct((32, 4, 64), jnp.bfloat16)  # 32 x 2 programs: four splits by default
        tables, lengths = jax.ShapeDtypeStruct((32, max_blocks), jnp.int32), jax.ShapeDtypeStruct((32,), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda q, k, v, t, n: paged_decode_attention(q, k, v, 0, t, n))(q, pool, pool, tables, lengths)
        calls = [e for e in _pallas_calls(jaxpr.jaxpr) if e.params["name"] == "jaxpaged_decode"]
        return [v.aval.ndim for v in calls[0].invars[-2:]]

    assert pool_operand_ndims(8) == [3, 3], "one step of 8 blocks (128 positions): whole blocks"
    assert pool_operand_ndims(64) == [2, 2], "8 steps in 4 splits: rows"


def _decode_launches(batch, kv_heads, head_dim, max_blocks=128, gpu=launch.H100, **options):
    """(name, grid, num_stages) of each launch of the decode kernel's default path at this shape, on
    `gpu` (an H100's numbers unless given)."""
    pool = jax.ShapeDtypeStruct((1, kv_heads, batch * max_blocks, 16, head_dim), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((batch, 3 * kv_heads, head_dim), jnp.bfloat16)
    tables, lengths = jax.ShapeDtypeStruct((batch, max_blocks), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q, k, v, t, n: paged_decode_attention(q, k, v, 0, t, n, gpu=gpu, **options))(
        q, pool, pool, tables, lengths)
    return [(e.params["name"], tuple(e.params["grid_mapping"].grid), e.params["compiler_params"].num_stages)
            for e in _pallas_calls(jaxpr.jaxpr)]


def test_decode_kernel_runs_one_program_per_sm_from_96_to_132_programs():
    """Where the sequences and kv heads alone make 96 to 132 programs (an H100's SMs), the default is one
    split (no merge launch) walking 32 KiB steps with 7 stages; below and above, the split launch. On
    a card of 78 SMs the same holds from 56 to 78 programs; where the SM count is unknown, never."""
    assert _decode_launches(32, 3, 64) == [("jaxpaged_decode", (32, 3, 1), 7)]
    assert _decode_launches(33, 4, 128) == [("jaxpaged_decode", (33, 4, 1), 7)]
    assert _decode_launches(31, 3, 64)[0][1:] == ((31, 3, 3), 5), "93 programs: three splits"
    assert [name for name, *_ in _decode_launches(31, 3, 64)] == ["jaxpaged_decode", "jaxpaged_merge"]
    assert _decode_launches(48, 3, 64)[0][1:] == ((48, 3, 2), 5), "144 programs: two splits"
    assert _decode_launches(32, 3, 64, num_splits=1) == [("jaxpaged_decode", (32, 3, 1), 5)], "as asked"
    small = launch.Gpu(sm_count=78, shared_memory_per_block=227 * 1024)
    assert _decode_launches(26, 3, 64, gpu=small) == [("jaxpaged_decode", (26, 3, 1), 7)], "78 programs"
    assert _decode_launches(32, 3, 64, gpu=small)[0][1] == (32, 3, 2), "96 programs: beyond 78 SMs"
    assert _decode_launches(32, 3, 64, gpu=launch.Gpu())[0][1:] == ((32, 3, 3), 2), "unknown card: splits, 2 stages"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_kernel_with_one_program_per_sm_matches_the_reference(dtype):
    """The one-program-per-SM launch (96 programs, steps of 32 KiB: 128 positions in bfloat16, 64 in
    float32) against the reference, ragged lengths (0, one position, a partial step, the whole table)
    and NaN in every unused slot."""
    rng = np.random.default_rng(96)
    batch, heads, kv_heads, head_dim = 32, 9, 3, 64
    lengths = rng.integers(0, 16 * 16 + 1, size=batch)
    lengths[:4] = [0, 1, 16 * 16, 130]
    k, v, tables, num_blocks = _random_cache(rng, batch=batch, kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                                             lengths=lengths.tolist(), max_blocks=16, num_layers=1, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    assert _decode_launches(batch, kv_heads, head_dim, max_blocks=16) == [("jaxpaged_decode", (batch, kv_heads, 1), 7)]
    out = np.asarray(paged_decode_attention(q, k, v, 0, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                                            gpu=launch.H100, interpret=not ON_GPU), np.float32)
    expected = _reference(q, k, v, tables, lengths, 0, num_blocks)
    assert np.isfinite(out).all()
    assert _rel_err(out[1:], expected[1:]) < _REL_TOL[dtype]
    assert not out[0].any(), "an empty sequence attends to nothing"


def _pallas_calls(jaxpr):
    """Every pallas_call equation in a jaxpr, nested jaxprs (jit) included."""
    calls = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            calls.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                calls += _pallas_calls(getattr(inner, "jaxpr", inner))
    return calls


def test_prefill_splits_only_where_programs_are_few_and_steps_many():
    splits = launch.default_prefill_splits
    assert splits(147, 128, 128, 132) == 4  # 49 query blocks x 3 kv heads over an 8k table, head dim 64
    assert splits(256, 128, 256, 132) == 1  # 32 query blocks x 8 kv heads at head dim 128: not split
    assert splits(176, 128, 128, 132) == 3 and splits(177, 128, 128, 132) == 1  # a third of the programs that fit
    assert splits(8, 1000, 128, 132) == 8  # at most 8
    assert splits(147, 16, 128, 132) == 2  # each split keeps >= 8 steps
    assert splits(147, 7, 128, 132) == 1
    assert splits(105, 128, 128, 78) == 1 and splits(105, 128, 128, None) == 6  # 78 SMs: 312 fit; unknown: 528


def test_prefill_kernel_is_one_launch_on_q_as_it_comes():
    """The prefill kernel reads q and writes its output as [B, T * H, D] (reshapes of [B, T, H, D], no
    copies), ragged tokens and a group of three heads included: no transpose, pad or slice around it."""
    pool = jax.ShapeDtypeStruct((2, 3, 40, 16, 64), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((2, 37, 9, 64), jnp.bfloat16)  # 37 tokens: not a multiple of the tile
    tables, lengths = jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    positions = jax.ShapeDtypeStruct((2, 37), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q, k, v, t, n, p: paged_prefill_attention(q, k, v, 0, t, n, p))(
        q, pool, pool, tables, lengths, positions)
    calls = _pallas_calls(jaxpr.jaxpr)
    assert [c.params["name"] for c in calls] == ["jaxpaged_prefill"]
    assert calls[0].outvars[0].aval.shape == (2, 37 * 9, 64)
    assert (2, 37 * 9, 64) in [v.aval.shape for v in calls[0].invars]
    primitives = _primitives(jaxpr.jaxpr)
    assert not primitives & {"transpose", "pad", "slice", "dynamic_slice", "concatenate"}, primitives


def _primitives(jaxpr):
    """The primitives of a jaxpr outside pallas_call kernels, nested jaxprs (jit) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                names |= _primitives(getattr(inner, "jaxpr", inner))
    return names


def test_prefill_kernel_rejects_a_query_tile_that_is_not_a_power_of_two():
    spec = {name: jax.ShapeDtypeStruct(*shape_dtype) for name, shape_dtype in _GOOD.items()}
    q, positions = jax.ShapeDtypeStruct((2, 3, 4, 64), jnp.float32), jax.ShapeDtypeStruct((2, 3), jnp.int32)
    for rows in (8, 48):
        with pytest.raises(ValueError, match="query_rows must be a power of two >= 16"):
            jax.eval_shape(lambda q, k, v, t, n, p: paged_prefill_attention(q, k, v, 0, t, n, p, query_rows=rows), q,
                           spec["k"], spec["v"], spec["tables"], spec["lengths"], positions)


@pytest.mark.parametrize("layer", [jnp.zeros((2,), jnp.int32), jnp.float32(1)])
def test_decode_kernel_rejects_a_bad_layer(layer):
    spec = {name: jax.ShapeDtypeStruct(*shape_dtype) for name, shape_dtype in _GOOD.items()}
    with pytest.raises(ValueError, match="layer must be a scalar integer"):
        jax.eval_shape(lambda q, k, v, t, n: paged_decode_attention(q, k, v, layer, t, n),
                       spec["q"], spec["k"], spec["v"], spec["tables"], spec["lengths"])


def test_kernels_clamp_a_traced_layer_into_the_pools_layers():
    """A traced layer index past the last layer reads the last layer (as the reference's gather
    does), never memory past the pools."""
    rng = np.random.default_rng(7)
    lengths = [21, 9]
    k, v, tables, _ = _random_cache(rng, batch=2, kv_heads=2, head_dim=64, block_size=8, lengths=lengths)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    args = (jnp.asarray(tables), jnp.asarray(lengths, jnp.int32))
    decode = [np.asarray(paged_decode_attention(q, k, v, jnp.int32(layer), *args,
                                                interpret=not ON_GPU)) for layer in (1, 5)]
    np.testing.assert_array_equal(decode[0], decode[1])
    positions = jnp.asarray([[19, 20], [7, 8]], jnp.int32)
    prefill = [np.asarray(paged_prefill_attention(q[:, None].repeat(2, 1), k, v, jnp.int32(layer), *args, positions,
                                                  interpret=not ON_GPU)) for layer in (1, 5)]
    np.testing.assert_array_equal(prefill[0], prefill[1])


def test_launch_rules_scale_the_tuned_cards_program_counts_by_the_sm_count():
    """The rules are functions of the SM count: an H100's (132) gives the tuned launches, a card of 78
    SMs proportionally fewer programs a wave, an unknown one the tuned card's wave and no one-per-SM."""
    assert [launch.programs_per_wave(sms) for sms in (132, 78, None)] == [256, 151, 256]
    assert launch.default_splits(24, 128, 132) == 11 and launch.default_splits(24, 128, 78) == 7
    assert launch.default_splits(24, 4, 132) == 4, "never more splits than steps"
    assert launch.default_one_per_sm(96, 132) and launch.default_one_per_sm(132, 132)
    assert not launch.default_one_per_sm(95, 132) and not launch.default_one_per_sm(133, 132)
    assert launch.default_one_per_sm(56, 78) and not launch.default_one_per_sm(96, 78)
    assert not launch.default_one_per_sm(96, None), "unknown SM count: the split launch"
    assert launch.default_heads_per_program(1024, 8, 4, 512, 132) == 4
    assert launch.default_heads_per_program(512, 8, 4, 512, 132) == 2
    assert launch.default_heads_per_program(302, 8, 4, 512, 78) == 2 and launch.default_heads_per_program(302, 8, 4, 512, 132) == 1
    assert launch.default_transposed(600, 128, True, 1, 132) and not launch.default_transposed(600, 128, True, 1, 400)
    assert launch.default_loads_ahead(64, 128, False, 132) and not launch.default_loads_ahead(64, 128, True, 132)
    assert launch.default_loads_ahead(256, 256, False, 132) and not launch.default_loads_ahead(257, 256, False, 132)
    assert launch.default_loads_ahead(257, 256, False, 264) and not launch.default_loads_ahead(8, 512, False, 132)


def test_decode_steps_read_32_kib_of_k_and_v_and_at_least_64_positions():
    """A decode loop step covers 32 KiB of K and V in 16 bits (128 positions at head dim 64, 64 at
    128), at least 64 positions with the split launch, shared by a program's packed kv heads."""
    def blocks_per_step(batch, head_dim, max_blocks=128):
        return launch.decode_launch(batch, 32, 8, head_dim, 16, max_blocks, 2, launch.H100).blocks_per_step

    assert launch.default_step_positions(128, False) == 128 and launch.default_step_positions(256, False) == 64
    assert launch.default_step_positions(512, False) == 64 and launch.default_step_positions(512, True) == 32
    assert blocks_per_step(256, 64) == 8 and blocks_per_step(256, 128) == 4 and blocks_per_step(256, 256) == 4
    plan = launch.decode_launch(128, 32, 8, 64, 16, 32, 2, launch.H100)  # 1,024 programs of 512 positions
    assert (plan.heads_per_program, plan.blocks_per_step) == (4, 2), "4 kv heads x 32 positions a step"
    assert blocks_per_step(256, 64, max_blocks=36) == 4, "the most that divide the table's width"


def test_decode_stages_fit_the_cards_shared_memory():
    """Three or four 32 KiB steps in flight only where the block's shared memory holds them; 2 stages
    where it does not (99 KiB: an RTX 4090's) or is unknown."""
    hopper, ada = 227 * 1024, 99 * 1024
    assert launch.default_stages(True, 32 * 1024, False, hopper) == 5
    assert launch.default_stages(True, 32 * 1024, True, hopper) == 7
    assert launch.default_stages(True, 16 * 1024, False, ada) == 5
    assert launch.default_stages(True, 32 * 1024, True, ada) == 2
    assert launch.default_stages(True, 16 * 1024, False, None) == 2
    assert launch.default_stages(False, 16 * 1024, False, hopper) == 2, "the block gather"


def test_this_gpu_says_unknown_where_the_device_does_not_say():
    gpu = launch.this_gpu()
    if ON_GPU:
        assert gpu.sm_count == jax.devices()[0].core_count
    else:
        assert gpu == launch.Gpu(sm_count=None, shared_memory_per_block=None)


def test_kernels_say_why_they_can_not_run_where_the_lowering_is_missing(monkeypatch):
    """unavailable_reason: None where the Triton lowering imports; where it does not, one line that
    names it and this jax's version."""
    def missing():
        raise ImportError("cannot import name 'triton' from 'jax.experimental.pallas'")

    kernels.unavailable_reason.cache_clear()
    try:
        assert kernels.unavailable_reason() is None
        kernels.unavailable_reason.cache_clear()
        monkeypatch.setattr(kernels, "_import_lowering", missing)
        reason = kernels.unavailable_reason()
        assert reason.startswith(f"this jax ({jax.__version__}) has no Pallas Triton lowering") and "\n" not in reason
    finally:
        kernels.unavailable_reason.cache_clear()


def test_importing_the_library_imports_no_triton_module():
    code = ("import sys, jaxpaged, jaxpaged.kernels as k; k.supported(64, 16); "
            "print(sorted(m for m in sys.modules if 'pallas.triton' in m or m.startswith('jaxpaged.kernels.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['jaxpaged.kernels.launch']"]

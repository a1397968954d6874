"""8-bit K/V pools (CacheConfig.kv_dtype int8 and float8_e4m3fn): the round trip within the format's
bound, every write path against quantise-dequantise, the facades, a tiny model against its float32
cache, memory statistics, and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bit_equal
from flax import nnx

import jaxpaged as jp
from jaxpaged import attention, kernels
from jaxpaged.models.cli import main
from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM
from jaxpaged.quant import (QUANTIZED_DTYPES, decode, dequantise, encode, hadamard, quantise, rotate, round_half_even,
                            up_to_float16, v_blocks)

FORMATS = tuple(QUANTIZED_DTYPES)  # int8, float8_e4m3fn


def outlier_data(rng, shape) -> np.ndarray:
    """Standard normal [..., D] with what real K/V shows: two outlier channels (x20), outlier positions
    (x30, as attention sinks), scattered outlier elements (x50), one all-zero position and one tiny one."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., :2] *= 20.0
    x[rng.random(shape[:-1]) < 0.05] *= 30.0
    x[rng.random(shape) < 0.002] *= 50.0
    x.reshape(-1, shape[-1])[0] = 0.0
    x.reshape(-1, shape[-1])[1] *= 1e-6
    return x


def format_bound(x: np.ndarray, scale: np.ndarray, kv_dtype: str) -> np.ndarray:
    """The largest round-trip error each element may have (module docstring of jaxpaged.quant):
    int8 half a step, s / 2; float8_e4m3fn (3 mantissa bits) |x| / 16 in the normal range of x / s,
    half the subnormal step 2^-10 s below it. Slack of 1e-5 relative for float32's own rounding."""
    s = scale.astype(np.float32)[..., None]
    if kv_dtype == "int8":
        bound = s / 2
    else:
        bound = np.maximum(np.abs(x) / 16, s * 2.0**-10)
    return bound * (1 + 1e-5) + 1e-30


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_round_trip_within_the_formats_bound(kv_dtype, rng):
    x = outlier_data(rng, (512, 4, 64))  # [positions, K, D]
    values, scale = quantise(jnp.asarray(x), kv_dtype)
    assert values.dtype == jnp.dtype(kv_dtype) and scale.shape == (512, 4) and scale.dtype == jnp.float16
    exact = np.abs(x).max(axis=-1) / QUANTIZED_DTYPES[kv_dtype]
    stored = np.asarray(scale, np.float32)  # rounded up to float16: at most one step above, subnormals too
    assert np.all(stored >= exact) and np.all(stored - exact <= np.maximum(exact * 2.0**-10, 2.0**-24))
    back = np.asarray(dequantise(values, scale, jnp.float32))
    err = np.abs(back - x)
    bound = format_bound(x, np.asarray(scale), kv_dtype)
    assert np.all(err <= bound), f"worst error / bound {np.max(err / bound):.3f}"
    assert np.all(back.reshape(-1, 64)[0] == 0), "a zero position comes back zero"
    assert np.all(np.isfinite(back))
    # the bound is not loose: the worst element comes near it
    assert np.max(err / bound) > 0.5


def test_scales_round_up_to_float16_by_exact_operations(rng):
    """up_to_float16 against numpy's float16 (nearest, then one step up where below), bit for bit,
    over normal and subnormal float16 values, values on the grid, just off it, and float16's largest."""
    x = np.concatenate([rng.random(20000) * 65504, 10 ** rng.uniform(-12, 4.8, 20000),
                        [0, 2**-24, 2**-25, 2**-14, 2**-14 * (1 - 2**-20), 1.0, 1 + 2**-23, 2047.5, 65503.9, 65504, 1e-30]])
    x = np.minimum(x, 65504).astype(np.float32)
    nearest = x.astype(np.float16)
    expected = np.where(nearest.astype(np.float32) < x, np.nextafter(nearest, np.float16(65504)), nearest)
    got = jax.jit(up_to_float16)(jnp.asarray(x))
    assert_bit_equal(got, expected.astype(np.float32), "rounded up")
    assert np.all(np.asarray(got) >= x)


def test_int8_rounds_ties_to_even_as_jnp_round_does(rng):
    """round_half_even (what quantise rounds int8 values with; it also runs inside the decode kernel)
    gives jnp.round's values, compiled and not, at ties, just off them, around 0 and at random."""
    ties = np.arange(-130, 130, dtype=np.float32) + np.float32(0.5)
    near = [np.nextafter(ties, np.float32(0)), np.nextafter(ties, ties * 2)]
    odd = [0, -0.0, 2**-149, -(2**-149), 127, -127, 2**22 + 0.5]
    x = np.concatenate([ties, *near, rng.uniform(-128, 128, 20000), rng.normal(0, 1e-3, 1000), odd]).astype(np.float32)
    expected = np.asarray(jnp.round(jnp.asarray(x)))
    for got in (jax.jit(round_half_even)(jnp.asarray(x)), round_half_even(jnp.asarray(x))):
        assert np.array_equal(np.asarray(got), expected), x[np.asarray(got) != expected][:8]


@pytest.mark.parametrize("head_dim", [1, 2, 16, 64, 128, 256])
def test_the_rotation_is_orthonormal_symmetric_and_its_own_inverse(head_dim, rng):
    h = hadamard(head_dim)
    assert h.shape == (head_dim, head_dim) and np.array_equal(h, h.T)
    np.testing.assert_allclose(h @ h, np.eye(head_dim), atol=1e-6)
    assert np.allclose(np.abs(h), head_dim**-0.5)
    x = rng.standard_normal((5, head_dim)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rotate(rotate(jnp.asarray(x)))), x, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rotate(jnp.asarray(x))), x.astype(np.float64) @ h.astype(np.float64),
                               rtol=0, atol=1e-6 * np.abs(x).max() * np.sqrt(head_dim))
    assert hadamard(96) is None and hadamard(0) is None
    assert np.array_equal(np.asarray(rotate(jnp.asarray(x[:, :1].repeat(3, 1)))), x[:, :1].repeat(3, 1)), \
        "a head dim that is not a power of two is left as it is"


def test_a_row_rotates_to_the_same_bits_alone_in_a_batch_and_inside_any_program(rng):
    """K written by different paths (a chunk, one position, the model's step: different programs,
    different row counts) must store the same 8-bit values, so each row's rotation may not depend on
    the program or on the rows beside it."""
    x = jnp.asarray(rng.standard_normal((37, 4, 128)).astype(np.float32) * 3)
    one_row = jax.jit(rotate)  # a program of its own for a [1, D] row
    alone = np.stack([np.asarray(one_row(x[i:i + 1, j]))[0] for i in (0, 17, 36) for j in (0, 3)])
    batched = np.asarray(jax.jit(rotate)(x))[[0, 0, 17, 17, 36, 36], [0, 3, 0, 3, 0, 3]]
    fused = np.asarray(jax.jit(lambda y: rotate(y * 1.0 + 0.0)[::-1])(x))[::-1][[0, 0, 17, 17, 36, 36], [0, 3, 0, 3, 0, 3]]
    assert_bit_equal(batched, alone, "a batch's rows against each alone")
    assert_bit_equal(fused, alone, "inside a jitted program")


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_rotated_k_round_trips_within_the_formats_bound_in_length(kv_dtype, rng):
    """K is quantised rotated: each row's error vector is as long as the rotated row's, so within the
    format's per-element bound summed in squares. Against unrotated storage of data whose few
    features are far larger than the rest (outlier_data's two channels): int8's error is smaller
    (the row's largest value, which sets its step, falls), float8's larger (its error is relative to
    each value, and the rotation moves the large ones' onto every feature); what the rotation buys is
    where the error lies, not its length (DESIGN.md)."""
    x = outlier_data(rng, (512, 4, 64))
    values, scale = encode(jnp.asarray(x), kv_dtype, rotated=True)
    back = np.asarray(decode(values, scale, jnp.float32, rotated=True))
    err = np.linalg.norm(back - x, axis=-1)
    bound = np.linalg.norm(np.broadcast_to(format_bound(np.asarray(rotate(jnp.asarray(x))), np.asarray(scale), kv_dtype),
                                           x.shape), axis=-1)
    assert np.all(err <= bound * (1 + 1e-4) + 1e-6)
    plain = np.linalg.norm(np.asarray(dequantise(*quantise(jnp.asarray(x), kv_dtype), jnp.float32)) - x, axis=-1)
    assert np.array_equal(back, np.asarray(decode(*encode(jnp.asarray(x), kv_dtype, True), jnp.float32, True)))
    if kv_dtype == "int8":
        assert err.mean() < plain.mean() / 2
    else:
        assert err.mean() > plain.mean()


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_a_row_with_nan_or_inf_reads_back_as_nan_and_float16_stays_finite(kv_dtype):
    """8 bits can not hold a non-finite value: its row reads back NaN throughout (not a large finite
    number beside zeros), the other rows as they were; float16's largest value comes back finite
    through the rounded-up scale, K rotated or not."""
    x = np.ones((3, 16), np.float32)
    x[0, 3], x[1, 5] = np.nan, np.inf
    for rotated in (False, True):
        back = np.asarray(decode(*encode(jnp.asarray(x), kv_dtype, rotated), jnp.float32, rotated))
        assert np.isnan(back[:2]).all() and np.allclose(back[2], 1, rtol=0.07)
    config = jp.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=2, block_size=4, max_seqs=1,
                            dtype="float16", kv_dtype=kv_dtype)
    big = np.ones((1, 2, 1, 16), np.float16)
    big[0, 0, 0, 0] = 65504
    state, ok = jp.append(jp.init_state(config), 0, jnp.zeros(1, jnp.int32), jnp.asarray(big), jnp.asarray(big))
    k, v, _ = jp.gather_kv(state, 0, jnp.zeros(1, jnp.int32), max_len=2)
    assert bool(ok) and np.isfinite(np.asarray(k, np.float32)).all() and np.isfinite(np.asarray(v, np.float32)).all()
    assert float(v[0, 0, 0, 0]) == 65504
    out = jp.paged_attention(jnp.ones((1, 2, 1, 16), jnp.float16), state, 0, jnp.zeros(1, jnp.int32),
                             jnp.asarray([[0, 1]], jnp.int32), impl="reference")
    assert np.isfinite(np.asarray(out, np.float32)).all()


def _config(kv_dtype, **changes):
    fields = dict(num_layers=2, num_kv_heads=3, head_dim=16, num_blocks=24, block_size=4, max_seqs=3, kv_dtype=kv_dtype)
    return jp.CacheConfig(**{**fields, **changes})


def _kv_and_expected(rng, kv_dtype, lens):
    """Random k, v [B, T=16, K=3, D=16] with outliers, and what gather_kv must read back of them:
    decode(encode(x)) (K rotated), zero past each row's length."""
    x = outlier_data(rng, (2, 3, 16, 3, 16))  # [k or v, B, T, K, D]
    k, v = jnp.asarray(x[0]), jnp.asarray(x[1])
    expected = [np.where((np.arange(16) < lens[:, None])[..., None, None],
                         np.asarray(decode(*encode(y, kv_dtype, rotated), jnp.float32, rotated)), 0)
                for y, rotated in ((k, True), (v, False))]
    return k, v, expected


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_every_write_path_stores_quantise_dequantise_and_gather_reads_it(kv_dtype, rng):
    """One chunk (append), one position at a time (decode: blocks fill position by position, each
    position's scale its own) and the model's path (begin_step's slots, attend's write_slots):
    gather_kv reads back exactly decode(encode(x)), zero past each length."""
    config = _config(kv_dtype)
    lens = np.array([13, 6, 9])
    k, v, expected = _kv_and_expected(rng, kv_dtype, lens)
    seq_idx = jnp.arange(3, dtype=jnp.int32)

    chunked, ok = jp.append(jp.init_state(config), 1, seq_idx, k, v, jnp.asarray(lens, jnp.int32))
    assert bool(ok)
    one_at_a_time = jp.init_state(config)
    for t in range(16):
        one_at_a_time, ok = jp.append(one_at_a_time, 1, seq_idx, k[:, t:t + 1], v[:, t:t + 1],
                                      jnp.asarray(lens > t, jnp.int32))
        assert bool(ok)
    stepped, step = jp.init_state(config).begin_step(seq_idx, jnp.asarray(lens, jnp.int32), 16)
    stepped = jax.jit(lambda state, slots: jp.write_slots(state, 1, slots, k, v))(stepped, step.slots)

    for state in (chunked, one_at_a_time, stepped):
        assert state.pools.k.dtype == jnp.dtype(kv_dtype) and state.pools.k_scale.shape == (2, 3, 24, 4)
        k_all, v_all, seq_lens = jp.gather_kv(state, 1, seq_idx, max_len=16)
        assert k_all.dtype == jnp.float32 and np.array_equal(np.asarray(seq_lens), lens)
        assert_bit_equal(k_all, expected[0], "k")
        assert_bit_equal(v_all, expected[1], "v")


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_the_facades_read_8_bit_pools_dequantised(kv_dtype, rng):
    k, v, expected = _kv_and_expected(rng, kv_dtype, np.array([16, 16, 16]))
    cache = jp.PagedKVCache(_config(None), block_size=4, num_blocks=24, kv_dtype=kv_dtype)
    assert cache.config.kv_dtype == kv_dtype
    cache.allocate_sequence("a")
    for start in (0, 5):  # two appends, the second mid-block
        assert cache.append_tokens("a", 0, jnp.swapaxes(k[0, start:start + 5], 0, 1), jnp.swapaxes(v[0, start:start + 5], 0, 1))
    k_seq, v_seq = cache.get_kv("a", 0)  # [K, S, D]
    assert_bit_equal(jnp.swapaxes(k_seq, 0, 1), expected[0][0, :10], "get_kv k")
    block = cache.get_block(cache.block_table("a")[0], 0)
    assert_bit_equal(jnp.swapaxes(block.v_data, 0, 1), expected[1][0, :4], "get_block v")


@pytest.fixture(scope="module")
def model():
    return MiniLLM(preset("tiny", vocab_size=97), rngs=nnx.Rngs(3))


# Logits of the tiny model (random weights; its float32 logits have std 1.0 and reach 3.6 here) from an
# 8-bit cache against its float32 cache, over a prefill of 3 ragged rows of up to 24 tokens: bounds on the
# max abs difference, about twice what was measured (int8 0.075, float8_e4m3fn 0.23; medians 0.005, 0.025).
LOGIT_ATOL = {"int8": 0.15, "float8_e4m3fn": 0.45}
LENS = np.array([24, 7, 17])
PROMPTS = [[5, 9, 2, 7, 7, 1], [3], [8, 8, 8, 1, 2, 3, 4, 5, 6, 7, 9]]


def _prefill_logits(model, kv_dtype):
    """The logits [B, T, V] of one jitted prefill of 3 ragged rows into a paged cache of kv_dtype."""
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, 97, (3, 24)), jnp.int32)
    config = jp.CacheConfig.from_model_config(model.config, num_blocks=24, block_size=8, max_seqs=3, kv_dtype=kv_dtype)
    graphdef, params = nnx.split(model.scanned())

    @jax.jit
    def prefill(params, state):
        return nnx.merge(graphdef, params).step(tokens, state, seq_idx=jnp.arange(3, dtype=jnp.int32),
                                                num_tokens=jnp.asarray(LENS, jnp.int32))

    logits, _, ok = prefill(params, jp.init_state(config))
    assert bool(ok)
    return np.asarray(logits)


@pytest.fixture(scope="module")
def float32_logits(model):
    return _prefill_logits(model, None)


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_a_tiny_model_on_an_8_bit_cache_matches_its_float32_cache(model, float32_logits, kv_dtype):
    logits = _prefill_logits(model, kv_dtype)
    real = np.arange(24) < LENS[:, None]
    diff = np.abs(logits - float32_logits)[real]
    assert 0 < diff.max() <= LOGIT_ATOL[kv_dtype], diff.max()
    last = (np.arange(3), LENS - 1)  # each row's last prompt token: the greedy first token comes from there
    assert np.array_equal(logits[last].argmax(-1), float32_logits[last].argmax(-1))


def test_greedy_generate_on_an_int8_cache_gives_the_float32_caches_first_tokens(model):
    base = generate(model, PROMPTS, max_new_tokens=4, block_size=8, chunk_size=4)
    quant = generate(model, PROMPTS, max_new_tokens=4, block_size=8, chunk_size=4, kv_dtype="int8")
    assert [t[:2] for t in quant.tokens] == [t[:2] for t in base.tokens]
    per_position = 2 * 2 * 2 * (16 + 2)  # K and V, 2 layers, 2 kv heads, 16 bytes and a 2-byte scale each
    assert quant.peak_memory.bytes_per_token == per_position
    assert base.peak_memory.bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_memory_statistics_count_the_scales():
    config = _config("int8")
    assert config.bytes_per_token == 2 * 2 * 3 * (16 + 2) and config.itemsize == 1
    assert _config(None).bytes_per_token == 2 * 2 * 3 * 16 * 4
    state = jp.init_state(config)
    state, _ = jp.append(state, 0, jnp.arange(2, dtype=jnp.int32), jnp.ones((2, 5, 3, 16)), jnp.ones((2, 5, 3, 16)),
                         jnp.asarray([5, 3], jnp.int32))
    stats = jp.paged_memory_stats(state)
    assert stats.bytes_reserved == sum(x.nbytes for x in jax.tree.leaves(state.pools)) == config.pool_bytes
    assert stats.bytes_per_token == config.bytes_per_token
    assert stats.bytes_live == 8 * config.bytes_per_token // 2  # 8 positions written in layer 0 of 2
    assert "216 bytes per position" in stats.format()  # every layer


def test_bad_kv_dtypes_and_combinations_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"unsupported kv_dtype 'int4'.*float8_e4m3fn.*int8"):
        _config("int4")
    with pytest.raises(ValueError, match="kv_dtype 'bfloat16' differs from the cache dtype 'float32'"):
        _config("bfloat16")
    assert _config("float32").kv_dtype is None and not _config("float32").quantized  # the same as None
    with pytest.raises(ValueError, match="contiguous cache"):
        jp.KVCache(_config("int8"), batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="needs cache='paged'"):
        generate(model, [[1, 2]], max_new_tokens=2, cache="contiguous", kv_dtype="int8")


ON_GPU = jax.default_backend() == "gpu"


def assert_close(out, expected, float16=False):
    """Within float32 rounding of the output's norm in interpret mode (the outliers reach hundreds,
    so elements near 0 carry their sums' rounding); on a GPU, whose products round q and the
    probabilities (tf32, bfloat16), or with float16 products, within 1% of it."""
    tolerance = 1e-2 if ON_GPU or float16 else 1e-5
    assert np.linalg.norm(out - expected) <= tolerance * np.linalg.norm(expected)


def _quantised_cache(rng, kv_dtype, *, lengths, kv_heads=2, head_dim=64, block_size=8, max_blocks=8, layers=2):
    """8-bit pools as a cache holds them (K [L, K, N, P, D], V's blocks transposed [L, K, N, D, P]) and
    scales [L, K, N, P] of random K/V with outliers, a shuffled block table, and every slot no sequence
    holds filled with large garbage (values and scales) that would show in the output if a masked
    position were read. Returns (k, v, k_scale, v_scale, tables, N)."""
    num_blocks = len(lengths) * max_blocks + 3
    shape = (layers, kv_heads, num_blocks, block_size, head_dim)
    (k, k_scale), (v, v_scale) = (quantise(jnp.asarray(outlier_data(rng, shape)), kv_dtype) for _ in range(2))
    tables = np.full((len(lengths), max_blocks), num_blocks, np.int32)
    order, live = rng.permutation(num_blocks), np.zeros(shape[:-1], bool)
    for b, n in enumerate(lengths):
        count = -(-n // block_size)
        tables[b, :count] = order[b * max_blocks:b * max_blocks + count]
        for pos in range(n):
            live[:, :, tables[b, pos // block_size], pos % block_size] = True
    garbage = jnp.asarray(~live)
    k_scale, v_scale = (jnp.where(garbage, jnp.float16(6e4), x) for x in (k_scale, v_scale))
    return k, v_blocks(v), k_scale, v_scale, tables, num_blocks


def _dequantised(k, v, k_scale, v_scale):
    """The float32 pools [L, K, N, P, D] that 8-bit pools (V's blocks transposed) stand for."""
    return dequantise(k, k_scale, jnp.float32), dequantise(v_blocks(v), v_scale, jnp.float32)


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_the_decode_kernel_reads_8_bit_pools_as_the_reference_reads_them_dequantised(kv_dtype, rng):
    """The decode kernel on 8-bit pools, its tiles converted for the products (one split and three,
    two and four blocks a step), equals attention over the dequantised pools, with garbage in every
    slot past the lengths; the launches that are for float pools only are refused."""
    from test_kernels import _reference

    from jaxpaged.kernels.decode import paged_decode_attention

    lengths = [1, 8, 29, 0]
    k, v, k_scale, v_scale, tables, num_blocks = _quantised_cache(rng, kv_dtype, lengths=lengths)
    q = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    expected = _reference(q, *_dequantised(k, v, k_scale, v_scale), tables, lengths, 1, num_blocks)
    call = functools.partial(paged_decode_attention, q, k, v, 1, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                             k_scale=k_scale, v_scale=v_scale, interpret=not ON_GPU)
    for splits, blocks_per_step, dot in [(1, 2, "float32"), (3, 2, "float32"), (1, 4, "float16")]:
        out = np.asarray(call(blocks_per_step=blocks_per_step, num_splits=splits, dot_dtype=dot))
        assert_close(out[:3], expected[:3], float16=dot == "float16")
        assert not out[3].any(), "an empty sequence attends to nothing"
    for option in (dict(transposed=True), dict(row_gather=False), dict(heads_per_program=2)):
        with pytest.raises(ValueError, match="8-bit pools take the plain products"):
            call(**option)
    with pytest.raises(ValueError, match=rf"must be \(2, 2, 35, 64, 8\) {kv_dtype} \(8-bit V's blocks transposed"):
        paged_decode_attention(q, k, v_blocks(v), 1, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                               k_scale=k_scale, v_scale=v_scale, interpret=True)


def _weights_rounding_bound(q, k, v, v_scale, tables, lengths, layer, chunk):
    """[B, H, D]: how far rounding each loop step's weights (probability times V's scale) onto
    0..127 of their row's largest can move attention at most: per step, half a step (its largest
    weight / 254) times |V's int8 values| summed over its positions, over the softmax's sum. q and
    k: float32 (k dequantised, [L, K, N, P, D]); v: int8 as a cache holds it."""
    v = np.asarray(v_blocks(v), np.float32)[layer]  # [K, N, P, D]
    k, v_scale, q = np.asarray(k)[layer], np.asarray(v_scale, np.float32)[layer], np.asarray(q)
    batch, heads, head_dim = q.shape
    group, block_size = heads // k.shape[0], k.shape[2]
    bound = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        positions = np.arange(n)
        blocks, offsets = tables[b, positions // block_size], positions % block_size
        for h in range(heads):
            g = h // group
            logits = k[g, blocks, offsets] @ q[b, h] / np.sqrt(head_dim)
            p = np.exp(logits - logits.max(initial=0))
            weights, values = p * v_scale[g, blocks, offsets], np.abs(v[g, blocks, offsets])  # [S], [S, D]
            for start in range(0, n, chunk):
                bound[b, h] += weights[start:start + chunk].max() / 254 * values[start:start + chunk].sum(axis=0)
            bound[b, h] /= max(p.sum(), 1e-30)
    return bound


@pytest.mark.parametrize("splits, blocks_per_step", [(1, 4), (3, 4), (1, 8)])
def test_int8_products_attend_with_q_and_the_weights_quantised_per_row(splits, blocks_per_step, rng):
    """int8 pools' default products (dot_dtype "int8"): q quantised per row in the kernel (as
    `quantise` does), q . k on int8 operands (int32) scaled back by q's row scales and K's position
    scales, and the weights rounded onto 0..127 per row and loop step for an int8 product with V:
    within the weights' rounding bound of attention of q as quantised per row over the dequantised
    pools, and not equal to it (the weights are rounded); float8 pools refuse int8 products."""
    from test_kernels import _reference

    from jaxpaged.kernels.decode import paged_decode_attention

    lengths = [1, 8, 29, 0]
    k, v, k_scale, v_scale, tables, num_blocks = _quantised_cache(rng, "int8", lengths=lengths)
    q = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    as_quantised = dequantise(*quantise(q, "int8"), jnp.float32)
    dense_k, dense_v = _dequantised(k, v, k_scale, v_scale)
    expected = _reference(as_quantised, dense_k, dense_v, tables, lengths, 1, num_blocks)
    call = functools.partial(paged_decode_attention, layer=1, block_tables=jnp.asarray(tables),
                             lengths=jnp.asarray(lengths, jnp.int32), v_scale=v_scale, blocks_per_step=blocks_per_step,
                             num_splits=splits, interpret=not ON_GPU)
    out = np.asarray(call(q, k, v, k_scale=k_scale))
    assert out.dtype == np.float32
    bound = _weights_rounding_bound(as_quantised, dense_k, v, v_scale, tables, lengths, 1, blocks_per_step * 8)
    error = np.abs(out - expected)
    assert np.all(error <= bound + 1e-4 * np.abs(expected).max()), (error - bound).max()
    assert error[1:3].max() > 0, "the weights were rounded"
    assert not out[3].any(), "an empty sequence attends to nothing"
    with pytest.raises(ValueError, match="takes int8 pools"):
        call(q, k.astype(jnp.float8_e4m3fn), v.astype(jnp.float8_e4m3fn), k_scale=k_scale, dot_dtype="int8")


def test_int8_pools_take_their_tiles_in_q_dtype_where_a_step_is_too_short_for_int8_products(rng):
    """A loop step of fewer than 32 positions (on an H200, int8 products over 16 came out wrong):
    int8 pools' default products convert the tiles to q's dtype there, equal to attention over the
    dequantised pools, and asking for int8 products is an error."""
    from test_kernels import _reference

    from jaxpaged.kernels.decode import paged_decode_attention

    lengths = [1, 8, 29, 0]
    k, v, k_scale, v_scale, tables, num_blocks = _quantised_cache(rng, "int8", lengths=lengths)
    q = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    call = functools.partial(paged_decode_attention, q, k, v, 1, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32),
                             k_scale=k_scale, v_scale=v_scale, blocks_per_step=2, interpret=not ON_GPU)
    expected = _reference(q, *_dequantised(k, v, k_scale, v_scale), tables, lengths, 1, num_blocks)
    assert_close(np.asarray(call())[:3], expected[:3])
    with pytest.raises(ValueError, match="takes loop steps of >= 32 positions, not 2 blocks of 8"):
        call(dot_dtype="int8")


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_the_prefill_kernel_reads_8_bit_pools_as_the_reference_reads_them_dequantised(kv_dtype, rng):
    from jaxpaged.attention import attend
    from jaxpaged.kernels.prefill import paged_prefill_attention

    lengths, chunk = [21, 5, 0], [9, 5, 0]  # after the chunk was appended; this chunk's queries
    k, v, k_scale, v_scale, tables, num_blocks = _quantised_cache(rng, kv_dtype, lengths=lengths)
    q = jnp.asarray(rng.standard_normal((3, 9, 8, 64)), jnp.float32)
    positions = np.full((3, 9), -1, np.int32)
    for b, (n, c) in enumerate(zip(lengths, chunk)):
        positions[b, :c] = np.arange(n - c, n)
    args = (q, k, v, 0, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32), jnp.asarray(positions))
    outs = [np.asarray(paged_prefill_attention(*args, k_scale=k_scale, v_scale=v_scale, blocks_per_step=2,
                                               query_rows=32, num_splits=splits, interpret=not ON_GPU))
            for splits in (1, 2)]
    slots = np.minimum(tables, num_blocks - 1)  # [B, M]: layer 0's blocks, then positions in order
    dense_k, dense_v = (np.asarray(x)[0][:, slots].transpose(1, 2, 3, 0, 4).reshape(3, -1, 2, 64)
                        for x in _dequantised(k, v, k_scale, v_scale))  # [B, S, K, D]
    expected = np.asarray(attend(q, jnp.asarray(dense_k), jnp.asarray(dense_v), jnp.asarray(positions),
                                 jnp.asarray(lengths, jnp.int32)))
    for out in outs:
        for b, c in enumerate(chunk):
            assert_close(out[b, :c], expected[b, :c])
            assert not out[b, c:].any(), "padding queries return zeros"


def test_the_kernels_take_8_bit_pools_only_with_their_scales(rng):
    """Clear errors for 8-bit pools without their scales (or float pools with them), scales of the
    wrong shape or dtype, unknown 8-bit formats, integer q, and a dot_dtype the products can not take."""
    from jaxpaged.kernels.decode import paged_decode_attention

    k, v, k_scale, v_scale, tables, _ = _quantised_cache(rng, "int8", lengths=[3])
    q, args = jnp.ones((1, 4, 64)), (0, jnp.asarray(tables), jnp.asarray([3], jnp.int32))
    with pytest.raises(ValueError, match="pools of int8 take k_scale and v_scale both"):
        paged_decode_attention(q, k, v, *args, interpret=True)
    with pytest.raises(ValueError, match="pools of float32 take k_scale and v_scale neither"):
        paged_decode_attention(q, k.astype(jnp.float32), v_blocks(v).astype(jnp.float32), *args, k_scale=k_scale,
                               v_scale=v_scale, interpret=True)
    with pytest.raises(ValueError, match=r"k_scale and v_scale must be floats of shape \(2, 2, 11, 8\)"):
        paged_decode_attention(q, k, v, *args, k_scale=k_scale[0], v_scale=v_scale[0], interpret=True)
    with pytest.raises(ValueError, match="8-bit pools are int8 or float8_e4m3fn"):
        paged_decode_attention(q, k.view(jnp.uint8), v.view(jnp.uint8), *args, k_scale=k_scale, v_scale=v_scale,
                               interpret=True)
    with pytest.raises(ValueError, match=r"must be floats .* got float16\[2, 2, 11, 8\] and int16\[2, 2, 11, 8\]"):
        paged_decode_attention(q, k, v, *args, k_scale=k_scale, v_scale=v_scale.astype(jnp.int16), interpret=True)
    with pytest.raises(ValueError, match="q must be floats"):
        paged_decode_attention(q.astype(jnp.int32), k, v, *args, k_scale=k_scale, v_scale=v_scale, interpret=True)
    for bad in ("int32", "uint8", "bool", "float8_e4m3fn", "foo"):
        with pytest.raises(ValueError, match=f"dot_dtype must be one of .*got '{bad}'"):
            paged_decode_attention(q, k, v, *args, k_scale=k_scale, v_scale=v_scale, dot_dtype=bad, interpret=True)
    with pytest.raises(ValueError, match="dot_dtype is for 8-bit pools; pools of float32 take q's dtype"):
        paged_decode_attention(q, k.astype(jnp.float32), v_blocks(v).astype(jnp.float32), *args, dot_dtype="float16",
                               interpret=True)
    config = _config("float8_e4m3fn", head_dim=64, block_size=8)  # 8-bit pools change nothing in the choice
    assert attention.choose_impl("auto", config, backend="cpu") == "reference"
    if kernels.unavailable_reason() is None:
        assert attention.choose_impl("kernel", config, backend="gpu") == "kernel"


def test_the_command_takes_kv_dtype(tmp_path, capsys, monkeypatch):
    from jaxpaged.models import cli
    from jaxpaged.models.checkpoint import save_checkpoint
    from jaxpaged.models.tokenizer import Tokenizer

    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda path: None)
    for flags, message in ((["--cache", "contiguous"], "8-bit K/V is for the paged cache"),):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "hello", "--kv-dtype", "int8", *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    tokenizer = Tokenizer.byte_level()
    path = str(tmp_path / "tiny")
    save_checkpoint(MiniLLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=32),
                            rngs=nnx.Rngs(0)), path, tokenizer)
    assert main(["generate", "--model", path, "hello", "--kv-dtype", "int8", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello") and "paged cache in int8, peak memory" in err, err


@pytest.mark.parametrize("kv_dtype", FORMATS)
def test_paged_attention_turns_q_for_the_kernels_as_k_was_stored(kv_dtype, rng, monkeypatch):
    """The kernels read K as the pools hold it, rotated: paged_attention's kernel path (here in
    interpret mode, the decode kernel's products on float32 tiles so that only the rotation is
    tested: int8 products have tests of their own) turns q by the same rotation and agrees with the
    reference path, which reads K rotated back; the kernels given q as it is do not."""
    import functools

    from jaxpaged.kernels.decode import paged_decode_attention
    from jaxpaged.kernels.prefill import paged_prefill_attention

    config = jp.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=16, block_size=8, max_seqs=2,
                            kv_dtype=kv_dtype)
    k, v = (jnp.asarray(outlier_data(rng, (2, 20, 2, 64))) for _ in range(2))
    lens = jnp.asarray([20, 13], jnp.int32)
    seq_idx = jnp.arange(2, dtype=jnp.int32)
    state, ok = jp.append(jp.init_state(config), 0, seq_idx, k, v, lens)
    assert bool(ok)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 64)), jnp.float32)
    positions = lens[:, None] - 3 + jnp.arange(3)[None, :]
    expected = {t: np.asarray(jp.paged_attention(q[:, -t:], state, 0, seq_idx, positions[:, -t:], impl="reference"))
                for t in (1, 3)}
    monkeypatch.setattr(attention, "choose_impl", lambda *args, **kwargs: "kernel")
    monkeypatch.setattr(kernels, "paged_decode_attention",
                        functools.partial(paged_decode_attention, interpret=True, dot_dtype="float32"))
    monkeypatch.setattr(kernels, "paged_prefill_attention", functools.partial(paged_prefill_attention, interpret=True))
    for t in (1, 3):
        out = np.asarray(jp.paged_attention(q[:, -t:], state, 0, seq_idx, positions[:, -t:]))
        assert_close(out, expected[t], float16=True)
    rows = state.table.block_ids[seq_idx]
    unturned = paged_decode_attention(q[:, -1], state.pools.k, state.pools.v, 0, rows, lens, interpret=True,
                                      k_scale=state.pools.k_scale, v_scale=state.pools.v_scale)
    assert np.linalg.norm(np.asarray(unturned) - expected[1][:, 0]) > 0.1 * np.linalg.norm(expected[1])

"""The seed's stateful API: PagedKVCache, BlockAllocator, KVCache, the adapter and the factory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPES, assert_bit_equal, random_array

import jaxpaged as jp
from jaxpaged import ops


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """Stands in for a model's config: the cache reads only the fields it needs."""

    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 5
    hidden_size: int = 20
    dtype: str = "float32"


def leaves(state):
    return [np.asarray(x).copy() for x in jax.tree.leaves(state)]


def assert_unchanged(before, state):
    for a, b in zip(before, leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_config_from_model_config_and_hf_names():
    config = jp.CacheConfig.from_model_config(TinyModelConfig(), num_blocks=10, block_size=8)
    assert (config.num_layers, config.num_kv_heads, config.head_dim, config.dtype) == (3, 2, 5, "float32")
    hf = dataclasses.make_dataclass("HF", [("num_hidden_layers", int, 2), ("num_key_value_heads", int, 1),
                                           ("num_attention_heads", int, 4), ("hidden_size", int, 32)])()
    config = jp.CacheConfig.from_model_config(hf, num_blocks=4, dtype=jnp.bfloat16)
    assert (config.num_layers, config.num_kv_heads, config.head_dim, config.dtype) == (2, 1, 8, "bfloat16")
    assert hash(config) == hash(dataclasses.replace(config))
    with pytest.raises(ValueError, match="power of two"):
        jp.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=1, block_size=12)
    with pytest.raises(ValueError, match="unsupported"):
        jp.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=1, dtype="int8")
    with pytest.raises(ValueError, match="missing"):
        jp.CacheConfig.from_model_config(object(), num_blocks=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_cache_seed_usage(dtype, rng):
    cache = jp.PagedKVCache(TinyModelConfig(), block_size=16, num_blocks=64, dtype=dtype)
    written = {}
    for seq_id, length in ((0, 1), (1, 16), (2, 33)):
        cache.allocate_sequence(seq_id)
        for layer in range(3):
            k, v = random_array(rng, (2, length, 5), dtype), random_array(rng, (2, length, 5), dtype)
            assert cache.append_tokens(seq_id, layer, k, v)
            written[seq_id, layer] = (k, v)
    for (seq_id, layer), (k, v) in written.items():
        k_got, v_got = cache.get_kv(seq_id, layer)
        assert_bit_equal(k_got, k, "k")
        assert_bit_equal(v_got, v, "v")
    assert [len(cache.block_table(s)) for s in range(3)] == [1, 1, 3]
    block = cache.get_block(cache.block_table(1)[0], layer_idx=2)
    assert block.k_data.shape == (2, 16, 5)
    assert_bit_equal(block.v_data, written[1, 2][1], "a block view")
    cache.free_sequence(1)
    assert cache.num_free_blocks == 64 - 4


def test_allocate_sequence_reserves_blocks(rng):
    cache = jp.PagedKVCache(TinyModelConfig(), block_size=8, num_blocks=4)
    cache.allocate_sequence("a", initial_len=20)
    assert len(cache.block_table("a")) == 3 and cache.get_seq_len("a") == 0
    k = random_array(rng, (2, 20, 5), "float32")
    assert cache.append_tokens("a", 0, k, k)
    assert cache.num_free_blocks == 1, "the reserved blocks are used first"
    with pytest.raises(jp.OutOfBlocksError):
        cache.allocate_sequence("b", initial_len=9)
    assert "b" not in cache.seq_ids and cache.num_free_blocks == 1


def test_bad_input_raises_and_changes_nothing(rng):
    cache = jp.PagedKVCache(TinyModelConfig(), block_size=8, num_blocks=4, max_seqs=2)
    cache.allocate_sequence("a")
    k = random_array(rng, (2, 9, 5), "float32")
    assert cache.append_tokens("a", 0, k, k)
    before = leaves(cache.state)
    cases = [
        (jp.UnknownSequenceError, lambda: cache.append_tokens("nope", 0, k, k)),
        (jp.UnknownSequenceError, lambda: cache.get_kv("nope", 0)),
        (jp.UnknownSequenceError, lambda: cache.free_sequence("nope")),
        (ValueError, lambda: cache.allocate_sequence("a")),
        (IndexError, lambda: cache.append_tokens("a", 3, k, k)),
        (IndexError, lambda: cache.get_kv("a", -1)),
        (TypeError, lambda: cache.append_tokens("a", 0, k.astype(jnp.float16), k.astype(jnp.float16))),
        (TypeError, lambda: cache.append_tokens("a", 0, np.asarray(k, np.float64), np.asarray(k, np.float64))),
        (ValueError, lambda: cache.append_tokens("a", 0, k[:1], k[:1])),
        (ValueError, lambda: cache.append_tokens("a", 0, k, k[:, :3])),
        (ValueError, lambda: cache.allocate_sequence("b", initial_len=-1)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert_unchanged(before, cache.state)
    big = random_array(rng, (2, 40, 5), "float32")
    assert cache.append_tokens("a", 0, big, big) is False, "out of blocks is reported"
    assert_unchanged(before, cache.state)
    cache.allocate_sequence("b")
    with pytest.raises(jp.CacheFullError):
        cache.allocate_sequence("c")
    cache.free_sequence("b")
    with pytest.raises(jp.UnknownSequenceError, match="already freed"):
        cache.free_sequence("b")
    assert_unchanged(before, cache.state)
    k_got, _ = cache.get_kv("a", 0)
    assert_bit_equal(k_got, k, "data intact after every refusal")


def test_block_allocator(rng):
    allocator = jp.BlockAllocator(3)
    ids = [allocator.allocate() for _ in range(3)]
    assert sorted(ids) == [0, 1, 2] and allocator.num_free_blocks == 0
    with pytest.raises(jp.OutOfBlocksError):
        allocator.allocate()
    allocator.free(ids[1])
    with pytest.raises(jp.DoubleFreeError):
        allocator.free(ids[1])
    with pytest.raises(IndexError, match=r"block_id must be an int in \[0, 3\)"):
        allocator.free(7)
    assert allocator.allocate() == ids[1], "a freed block is reused"
    assert allocator.stats() == {"total_blocks": 3, "used_blocks": 3, "free_blocks": 0, "utilisation": 1.0}


def test_cache_allocator_shares_the_free_list(rng):
    cache = jp.PagedKVCache(TinyModelConfig(), block_size=8, num_blocks=2)
    held = cache.allocator.allocate()
    cache.allocate_sequence(0)
    k = random_array(rng, (2, 9, 5), "float32")
    assert not cache.append_tokens(0, 0, k, k), "the block the allocator handed out is not free"
    cache.allocator.free(held)
    assert cache.append_tokens(0, 0, k, k)


@pytest.mark.parametrize("dtype", [d if d == "float32" else pytest.param(d, marks=pytest.mark.slow) for d in DTYPES])
@pytest.mark.parametrize("block_size", [8, 16])
def test_adapter_equals_contiguous_cache_bit_for_bit(dtype, block_size, rng):
    batch, layers = 3, 3
    adapter = jp.create_paged_kv_cache(TinyModelConfig(), batch_size=batch, block_size=block_size, blocks_per_seq=8,
                                       dtype=dtype)
    contiguous = jp.KVCache(TinyModelConfig(), batch_size=batch, max_len=8 * block_size, dtype=dtype)
    prompt_lens = jnp.asarray([block_size + 1, block_size, 1], jnp.int32)  # ragged prefill: rows differ in length
    for step in range(2 * block_size + 3):
        chunk, num_tokens = (block_size + 1, prompt_lens) if step == 0 else (1, None)
        for layer in range(layers):
            k, v = random_array(rng, (batch, 2, chunk, 5), dtype), random_array(rng, (batch, 2, chunk, 5), dtype)
            paged = adapter.update(layer, k, v, num_tokens)
            dense = contiguous.update(layer, k, v, num_tokens)
            assert_bit_equal(paged[0], dense[0], f"k step {step} layer {layer}")
            assert_bit_equal(paged[1], dense[1], f"v step {step} layer {layer}")
    np.testing.assert_array_equal(adapter.seq_lens(2), contiguous.seq_lens(2))
    assert paged[0].shape == (batch, 2, 3 * block_size + 3, 5)
    stats, dense_stats = adapter.memory_stats(), contiguous.memory_stats()
    assert stats.bytes_live == dense_stats.bytes_live
    assert stats.used_blocks == sum(-(-int(n + 2 * block_size + 2) // block_size) for n in prompt_lens)


def test_adapter_and_contiguous_refuse_past_their_length(rng):
    adapter = jp.create_paged_kv_cache(TinyModelConfig(), batch_size=2, block_size=8, blocks_per_seq=1)
    contiguous = jp.KVCache(TinyModelConfig(), batch_size=2, max_len=8)
    k = random_array(rng, (2, 2, 6, 5), "float32")
    adapter.update(0, k, k)
    contiguous.update(0, k, k)
    for cache in (adapter, contiguous):
        with pytest.raises(jp.OutOfBlocksError):
            cache.update(0, k, k)
        np.testing.assert_array_equal(cache.seq_lens(0), [6, 6])
    with pytest.raises(ValueError):
        adapter.update(0, k[:1], k[:1])
    with pytest.raises(TypeError):
        contiguous.update(0, k.astype(jnp.bfloat16), k.astype(jnp.bfloat16))


def test_memory_stats_count_what_is_allocated(rng):
    config = TinyModelConfig()
    cache = jp.PagedKVCache(config, block_size=8, num_blocks=10, dtype="float16")
    cache.allocate_sequence("x")
    k = random_array(rng, (2, 11, 5), "float16")
    for layer in range(3):
        cache.append_tokens("x", layer, k, k)
    stats = cache.memory_stats()
    per_position = 2 * 2 * 5 * 2  # K and V, 2 heads, head dim 5, 2 bytes
    assert stats.bytes_reserved == 10 * 8 * per_position * 3
    assert stats.bytes_reserved == sum(x.nbytes for x in (cache.state.pools.k, cache.state.pools.v))
    assert (stats.used_blocks, stats.free_blocks, stats.blocks_per_seq) == (2, 8, (2,))
    assert stats.bytes_live == 11 * per_position * 3
    assert stats.fragmentation == pytest.approx(5 / 16)
    assert stats.utilisation == pytest.approx(11 / 80)
    assert "fragmentation" in stats.format()
    dense = jp.KVCache(config, batch_size=2, max_len=16).memory_stats()
    assert dense.bytes_reserved == 2 * 16 * 2 * 2 * 5 * 4 * 3 and dense.bytes_live == 0


def test_facade_compilations_grow_with_log_of_chunk_length(rng):
    cache = jp.PagedKVCache(TinyModelConfig(num_layers=1), block_size=8, num_blocks=64)
    cache.allocate_sequence(0)
    before = ops.append._cache_size()
    for length in range(1, 17):  # 16 distinct lengths, 5 buckets: 1, 2, 4, 8, 16
        k = random_array(rng, (2, length, 5), "float32")
        assert cache.append_tokens(0, 0, k, k)
    assert ops.append._cache_size() - before <= 5

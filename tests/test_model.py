"""MiniLLM through every cache kind against one full forward pass; weights round trip; the seed's one-liner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpaged as jp
from jaxpaged.models.config import ModelConfig, preset
from jaxpaged.models.llama import Linear, MiniLLM
from jaxpaged.models.weights import hf_tensor_shapes, model_from_hf_tensors, to_hf_tensors

PROMPT_LENS = (5, 1, 8)  # ragged: mid-block, a single token, exactly one block of 8
DECODE_STEPS = 11  # crosses block boundaries for every row


@pytest.fixture(scope="module")
def model():
    """test_torch_interop's twin configuration, so that operations run one by one compile once for both."""
    return MiniLLM(preset("tiny", vocab_size=101, tie_embeddings=False), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def token_rows():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 101, size=n + DECODE_STEPS).astype(np.int32) for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def full_logits(model, token_rows):
    """The oracle: one jitted causal pass, no cache, over the rows right-padded to one length (a row's
    positions never attend to the padding after them)."""
    ids = np.zeros((len(token_rows), max(len(row) for row in token_rows)), np.int32)
    for b, row in enumerate(token_rows):
        ids[b, :len(row)] = row
    graphdef, params = nnx.split(model)
    logits = np.asarray(jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))(params, jnp.asarray(ids)))
    return [logits[b, :len(row)] for b, row in enumerate(token_rows)]


def _padded_prompts(token_rows):
    width = max(PROMPT_LENS)
    tokens = np.zeros((len(token_rows), width), np.int32)
    for b, (row, n) in enumerate(zip(token_rows, PROMPT_LENS)):
        tokens[b, :n] = row[:n]
    return jnp.asarray(tokens), jnp.asarray(PROMPT_LENS, jnp.int32)


def _check(prefill_logits, decode_logits, full_logits):
    for b, n in enumerate(PROMPT_LENS):
        np.testing.assert_allclose(np.asarray(prefill_logits)[b, :n], full_logits[b][:n], atol=1e-5, rtol=0)
        for step, logits in enumerate(decode_logits):
            np.testing.assert_allclose(np.asarray(logits)[b], full_logits[b][n + step], atol=1e-5, rtol=0)


def _decode_tokens(token_rows, step):
    return jnp.asarray([[row[n + step]] for row, n in zip(token_rows, PROMPT_LENS)])


def _decode_jitted(model, state, token_rows, **step_args):
    """DECODE_STEPS one-token steps through one jitted `model.step`; returns (logits per step, state, the jitted step)."""
    graphdef, params = nnx.split(model)
    step_fn = jax.jit(lambda params, state, ids: nnx.merge(graphdef, params).step(ids, state, **step_args))
    decoded = []
    for step in range(DECODE_STEPS):
        logits, state, ok = step_fn(params, state, _decode_tokens(token_rows, step))
        assert bool(ok)
        decoded.append(logits[:, 0])
    return decoded, state, step_fn


def test_paged_state_incremental_equals_full_pass(model, token_rows, full_logits):
    config = jp.CacheConfig.from_model_config(model.config, num_blocks=12, block_size=8, max_seqs=4)
    state = jp.init_state(config)
    seq_idx = jnp.asarray([2, 0, 3], jnp.int32)  # any rows of the block table
    tokens, lens = _padded_prompts(token_rows)
    prefill, state, ok = model.step(tokens, state, seq_idx=seq_idx, num_tokens=lens, max_len=32)
    assert bool(ok)
    decoded, state, step_fn = _decode_jitted(model, state, token_rows, seq_idx=seq_idx, max_len=32)
    _check(prefill, decoded, full_logits)
    assert step_fn._cache_size() == 1
    lens = np.asarray(state.table.seq_lens)  # [L, B]: the model path advances every layer together
    np.testing.assert_array_equal(lens, np.broadcast_to(lens[0], lens.shape))
    np.testing.assert_array_equal(lens[0, [2, 0, 3]], np.asarray(PROMPT_LENS) + DECODE_STEPS)


def test_contiguous_state_incremental_equals_full_pass(model, token_rows, full_logits):
    c = model.config
    state = jp.init_contiguous(c.num_layers, 3, c.num_kv_heads, 32, c.head_dim, jnp.float32)
    tokens, lens = _padded_prompts(token_rows)
    prefill, state, ok = model.step(tokens, state, num_tokens=lens)
    decoded, _, _ = _decode_jitted(model, state, token_rows)
    _check(prefill, decoded, full_logits)


@pytest.mark.parametrize("kind", ["KVCache", "PagedKVCacheAdapter"])
def test_stateful_caches_incremental_equal_full_pass(kind, model, token_rows, full_logits):
    if kind == "KVCache":
        cache = jp.KVCache(model.config, batch_size=3, max_len=32)
    else:
        cache = jp.create_paged_kv_cache(model.config, batch_size=3, block_size=8, blocks_per_seq=4)
    tokens, lens = _padded_prompts(token_rows)
    prefill = model(tokens, kv_cache=cache, num_tokens=lens)  # the seed's one-liner, ragged
    decoded = [model(_decode_tokens(token_rows, step), kv_cache=cache)[:, 0] for step in range(DECODE_STEPS)]
    _check(prefill, decoded, full_logits)
    np.testing.assert_array_equal(cache.seq_lens(1), np.asarray(PROMPT_LENS) + DECODE_STEPS)


def test_step_reports_out_of_blocks(model):
    config = jp.CacheConfig.from_model_config(model.config, num_blocks=1, block_size=8, max_seqs=1)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda params, ids, state: nnx.merge(graphdef, params).step(ids, state,
                                                                                 seq_idx=jnp.zeros((1,), jnp.int32)))
    _, state, ok = step(params, jnp.ones((1, 9), jnp.int32), jp.init_state(config))  # one program, not op by op
    assert not bool(ok)
    assert int(state.allocator.num_free) == 1 and not np.any(np.asarray(state.table.seq_lens))


@pytest.mark.parametrize("tied", [True, False])
def test_weights_round_trip_through_hf_names(tied):
    model = MiniLLM(preset("tiny", tie_embeddings=tied), rngs=nnx.Rngs(3))
    tensors = {k: np.asarray(v) for k, v in to_hf_tensors(model).items()}
    assert ("lm_head.weight" in tensors) is not tied
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # [out, in]
    rebuilt = model_from_hf_tensors(model.config, tensors)
    ids = jnp.arange(12)[None] % 256
    np.testing.assert_array_equal(np.asarray(rebuilt(ids)), np.asarray(model(ids)))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="missing model.layers.0.mlp.up_proj.weight.*model.norm.weight: shape"):
        model_from_hf_tensors(model.config, tensors)


def test_projections_side_by_side_are_the_hugging_face_ones_in_one_kernel():
    """q, k and v are one kernel [E, K, G + 2, D] (each kv head's query heads, then its k and v), gate
    and up one [E, 2, F]: each part of the product is the product with the Hugging Face tensor it
    came from, and the model's q head h reads kv head h // G (as Hugging Face's grouping)."""
    config = preset("tiny", num_heads=4, num_kv_heads=2)  # G = 2
    model = MiniLLM(config, rngs=nnx.Rngs(5))
    tensors = {k: np.asarray(v) for k, v in to_hf_tensors(model).items()}
    x = np.random.default_rng(0).standard_normal((3, config.hidden_size)).astype(np.float32)
    attention, mlp = model.layers[1].self_attn, model.layers[1].mlp
    qkv = np.asarray(attention.qkv_proj(jnp.asarray(x)))  # [3, K, G + 2, D]
    assert qkv.shape == (3, 2, 4, config.head_dim)
    hf = {name: x @ tensors[f"model.layers.1.self_attn.{name}_proj.weight"].T for name in "qkv"}
    np.testing.assert_allclose(qkv[:, :, :2].reshape(3, -1), hf["q"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, :, 2].reshape(3, -1), hf["k"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, :, 3].reshape(3, -1), hf["v"], rtol=1e-5, atol=1e-5)
    gate_up = np.asarray(mlp.gate_up_proj(jnp.asarray(x)))  # [3, 2, F]
    for part, name in enumerate(("gate", "up")):
        np.testing.assert_allclose(gate_up[:, part], x @ tensors[f"model.layers.1.mlp.{name}_proj.weight"].T,
                                   rtol=1e-5, atol=1e-5)
    assert hf_tensor_shapes(config)["model.layers.0.self_attn.q_proj.weight"] == (4 * config.head_dim,
                                                                                config.hidden_size)


def test_model_config_validates():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4,
                    intermediate_size=8)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-5")
    big = preset("llama-1b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads, big.head_dim, big.intermediate_size,
            big.vocab_size) == (16, 2048, 32, 8, 64, 8192, 128256)


def test_scanned_view_equals_the_unrolled_layers_and_the_tree_is_one_everywhere(model, token_rows):
    """The parameter tree is a list of layers whatever the backend (a checkpoint loads anywhere); the
    scanned() view stacks them for lax.scan and gives the same logits."""
    assert isinstance(model.layers, nnx.List) and len(model.layers) == model.config.num_layers
    names = set(to_hf_tensors(model))
    assert "model.layers.1.self_attn.k_proj.weight" in names
    view = model.scanned()
    assert not isinstance(view.layers, nnx.List)
    assert view.layers.self_attn.qkv_proj.kernel[...].shape[0] == model.config.num_layers  # [L, E, K, G + 2, D]
    with pytest.raises(ValueError, match="scanned"):
        to_hf_tensors(view)
    assert isinstance(model.layers, nnx.List), "the view leaves the model as it was"
    config = jp.CacheConfig.from_model_config(model.config, num_blocks=12, block_size=8, max_seqs=3)
    tokens, lens = _padded_prompts(token_rows)
    outputs = []
    for m in (model, view):
        logits, state, ok = m.step(tokens, jp.init_state(config), seq_idx=jnp.arange(3, dtype=jnp.int32),
                                   num_tokens=lens, max_len=32)
        assert bool(ok)
        outputs.append(np.asarray(logits))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_linear_multiplies_a_single_row_as_two_on_a_gpu_and_gives_the_same_result():
    """With two_rows (the default on a GPU), a one-row input (batch-1 decode) reaches the dot as [2, in],
    so XLA's GPU compiler keeps it a GEMM rather than strength-reducing a vector-matrix product;
    other inputs, and every input without it (the default on the CPU), pass unchanged."""
    assert Linear(8, 8, rngs=nnx.Rngs(0)).two_rows == (jax.default_backend() == "gpu")
    for two_rows in (True, False):
        linear = Linear(64, 48, two_rows=two_rows, rngs=nnx.Rngs(0))
        kernel = np.asarray(linear.kernel[...])
        for shape in [(1, 1, 64), (1, 64), (3, 1, 64), (2, 5, 64)]:
            x = jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape), jnp.float32)
            np.testing.assert_allclose(np.asarray(linear(x)), np.asarray(x) @ kernel, rtol=1e-5, atol=1e-5)
            jaxpr = jax.make_jaxpr(linear)(x)
            dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
            padded = two_rows and int(np.prod(shape[:-1])) == 1
            assert dots[0].invars[0].aval.shape[:-1] == ((2,) if padded else shape[:-1]), (shape, two_rows)
        side_by_side = Linear(64, (2, 24), two_rows=two_rows, rngs=nnx.Rngs(0))  # [I, 2, O]: one product
        x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 1, 64)), jnp.float32)
        np.testing.assert_allclose(np.asarray(side_by_side(x)).reshape(1, -1),
                                   np.asarray(x[0]) @ np.asarray(side_by_side.kernel[...]).reshape(64, -1),
                                   rtol=1e-5, atol=1e-5)

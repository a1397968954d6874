"""jaxpaged against PyTorch: the reference caches bit for bit, the MiniLLM twin, and Hugging Face transformers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import DTYPES
from flax import nnx
from torch_reference import kv_cache as torch_kv, paged_kv_cache as torch_paged
from torch_reference.convert import minillm_to_state_dict, state_dict_to_minillm, to_jax, to_torch, torch_dtype
from torch_reference.minillm import TorchMiniLLM

import jaxpaged as jp
from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM

HEADS, HEAD_DIM, LAYERS = 2, 5, 2


def max_difference(ours, theirs) -> float:
    """Largest elementwise |difference| after a bit-exact conversion, NaN counted as a difference."""
    ours = to_torch(ours)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if torch.equal(ours.view(torch.uint8) if ours.numel() else ours, theirs.view(torch.uint8) if theirs.numel() else theirs):
        return 0.0
    return float((ours.float() - theirs.float()).abs().nan_to_num(float("inf")).max())


@pytest.mark.parametrize("dtype", [d if d == "float32" else pytest.param(d, marks=pytest.mark.slow) for d in DTYPES])
def test_random_operations_match_the_torch_paged_cache_bit_for_bit(dtype):
    rng = np.random.default_rng({"float32": 1, "float16": 2, "bfloat16": 3}[dtype])
    config = jp.CacheConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, num_blocks=16, dtype=dtype)
    ours = jp.PagedKVCache(config, block_size=8, num_blocks=16, max_seqs=6)
    theirs = torch_paged.PagedKVCache(LAYERS, HEADS, HEAD_DIM, 8, 16, torch_dtype(dtype))
    live, next_id, worst, checks = [], 0, 0.0, 0
    for _ in range(300):
        op = rng.choice(["allocate", "prefill", "decode", "decode", "get", "free"], p=[0.15, 0.15, 0.3, 0.1, 0.2, 0.1])
        if op == "allocate" and len(live) < 6:
            initial = int(rng.integers(0, 12))
            results = []
            for cache in (ours, theirs):
                try:
                    cache.allocate_sequence(next_id, initial_len=initial)
                    results.append(True)
                except RuntimeError:
                    results.append(False)
            assert results[0] == results[1]
            if results[0]:
                live.append(next_id)
            next_id += 1
        elif op in ("prefill", "decode") and live:
            seq = live[rng.integers(len(live))]
            length = int(rng.integers(2, 20)) if op == "prefill" else 1
            k = torch.randn(HEADS, length, HEAD_DIM).to(torch_dtype(dtype))
            v = torch.randn(HEADS, length, HEAD_DIM).to(torch_dtype(dtype))
            for layer in range(LAYERS):
                assert ours.append_tokens(seq, layer, to_jax(k), to_jax(v)) == theirs.append_tokens(seq, layer, k, v)
        elif op == "get" and live:
            seq = live[rng.integers(len(live))]
            for layer in range(LAYERS):
                for mine, ref in zip(ours.get_kv(seq, layer), theirs.get_kv(seq, layer)):
                    worst = max(worst, max_difference(mine, ref))
                    checks += 1
        elif op == "free" and live:
            seq = live.pop(rng.integers(len(live)))
            ours.free_sequence(seq)
            theirs.free_sequence(seq)
        for seq in live:
            assert ours.block_table(seq) == theirs.block_table[seq], "the same blocks for the same operations"
        assert ours.num_free_blocks == theirs.allocator.num_free_blocks
    print(f"{dtype}: largest difference over {checks} get_kv comparisons: {worst}")
    assert checks > 50 and worst == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_and_contiguous_cache_match_torch_bit_for_bit(dtype):
    rng = torch.Generator().manual_seed(5)
    batch, block_size = 3, 8
    config = jp.CacheConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, num_blocks=1, dtype=dtype)
    caches = {
        "adapter": (jp.create_paged_kv_cache(config, batch, block_size, blocks_per_seq=6),
                    torch_paged.create_paged_kv_cache(LAYERS, HEADS, HEAD_DIM, batch, block_size, 6, torch_dtype(dtype))),
        "contiguous": (jp.KVCache(config, batch, max_len=48),
                       torch_kv.KVCache(LAYERS, batch, HEADS, 48, HEAD_DIM, torch_dtype(dtype))),
    }
    lens = torch.tensor([11, 8, 1])
    worst = 0.0
    for step in range(20):
        chunk, num_tokens = (11, lens) if step == 0 else (1, None)
        for layer in range(LAYERS):
            k = torch.randn(batch, HEADS, chunk, HEAD_DIM, generator=rng).to(torch_dtype(dtype))
            v = torch.randn(batch, HEADS, chunk, HEAD_DIM, generator=rng).to(torch_dtype(dtype))
            for ours, theirs in caches.values():
                n = None if num_tokens is None else jnp.asarray(num_tokens.numpy())
                mine = ours.update(layer, to_jax(k), to_jax(v), n)
                ref = theirs.update(layer, k, v, num_tokens)
                worst = max(worst, *(max_difference(a, b) for a, b in zip(mine, ref)))
    print(f"{dtype}: largest difference of update() results: {worst}")
    assert worst == 0.0


def _twins(dtype):
    config = preset("tiny", vocab_size=101, dtype=dtype, tie_embeddings=False)
    model = MiniLLM(config, rngs=nnx.Rngs(8))
    twin = TorchMiniLLM(config).to(torch_dtype(dtype))
    twin.load_state_dict(minillm_to_state_dict(model))
    return model, twin


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), pytest.param("bfloat16", 0.1, marks=pytest.mark.slow)])
def test_minillm_matches_its_torch_twin_through_every_cache(dtype, tolerance):
    """Prefill of a ragged batch, then 16 decode steps; logits compared at every step.

    Rows of 8, 4 and 1 tokens grow to 24, 20 and 17 positions: each crosses blocks of 8, the first two
    of them. The shapes (3 rows, a prompt of 8, 32 positions) are test_model's, so that in float32 the
    operations the stateful caches run one by one are compiled once for both files.

    bfloat16 keeps 8 bits of mantissa: both sides round the same values in a different order, so
    logits of order 1 agree to about 0.1 (stated tolerance), while float32 agrees to 1e-5.
    """
    model, twin = _twins(dtype)
    c = model.config
    rng = np.random.default_rng(0)
    lens = np.array([8, 4, 1])
    prompt = rng.integers(0, c.vocab_size, size=(3, 8)).astype(np.int32)
    steps = rng.integers(0, c.vocab_size, size=(16, 3, 1)).astype(np.int32)

    def run_torch(cache):
        logits = [twin(torch.from_numpy(prompt).long(), cache, torch.from_numpy(lens))]
        return logits + [twin(torch.from_numpy(s).long(), cache) for s in steps]

    torch_runs = {"contiguous": run_torch(torch_kv.KVCache(c.num_layers, 3, c.num_kv_heads, 32, c.head_dim,
                                                           torch_dtype(dtype))),
                  "paged": run_torch(torch_paged.create_paged_kv_cache(c.num_layers, c.num_kv_heads, c.head_dim, 3, 8, 4,
                                                                       torch_dtype(dtype)))}
    for a, b in zip(*torch_runs.values()):
        assert torch.equal(a, b), "the two torch caches agree exactly"
    reference = torch_runs["paged"]

    def run_facade(cache):
        return [model(jnp.asarray(prompt), kv_cache=cache, num_tokens=jnp.asarray(lens))] + [
            model(jnp.asarray(s), kv_cache=cache) for s in steps]

    graphdef, params = nnx.split(model)

    def run_state(state, **kw):
        step = jax.jit(lambda params, state, ids, num_tokens: nnx.merge(graphdef, params).step(
            ids, state, num_tokens=num_tokens, **kw))
        logits, state, ok = step(params, state, jnp.asarray(prompt), jnp.asarray(lens, jnp.int32))
        out = [logits]
        for s in steps:
            logits, state, ok = step(params, state, jnp.asarray(s), jnp.ones((3,), jnp.int32))
            assert bool(ok)
            out.append(logits)
        return out

    paged_config = jp.CacheConfig.from_model_config(c, num_blocks=12, block_size=8, max_seqs=3)
    ours = {
        "KVCache": run_facade(jp.KVCache(c, 3, 32)),
        "PagedKVCacheAdapter": run_facade(jp.create_paged_kv_cache(c, 3, block_size=8, blocks_per_seq=4)),
        "PagedKVState": run_state(jp.init_state(paged_config), seq_idx=jnp.arange(3, dtype=jnp.int32), max_len=32),
        "ContiguousKVState": run_state(jp.init_contiguous(c.num_layers, 3, c.num_kv_heads, 32, c.head_dim, c.dtype)),
    }
    for kind, logits in ours.items():
        worst = 0.0
        for step, (mine, ref) in enumerate(zip(logits, reference)):
            mine, ref = np.asarray(mine), ref.numpy()
            rows = [(b, slice(0, lens[b])) for b in range(3)] if step == 0 else [(b, slice(0, 1)) for b in range(3)]
            for b, valid in rows:
                worst = max(worst, float(np.abs(mine[b, valid] - ref[b, valid]).max()))
        print(f"{dtype} {kind}: largest logit difference over prefill + {len(steps)} steps: {worst:.2e}")
        assert worst <= tolerance, kind


def test_state_dict_round_trip():
    model, twin = _twins("float32")
    back = state_dict_to_minillm(model.config, twin.state_dict())
    ids = jnp.arange(12)[None] % 101  # the shape of test_model's round trip: its operations are compiled already
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model(ids)))
    for dtype in DTYPES:
        x = jax.random.normal(jax.random.key(0), (4, 7), dtype)
        assert torch.equal(to_torch(to_jax(to_torch(x))), to_torch(x))


def _hf_greedy(hf_model, prompts, new_tokens):
    hf_model.generation_config.eos_token_id = None  # run the full length, as ours does with no EOS
    hf_model.generation_config.pad_token_id = 0
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


TINY_HF = {  # a small random model of each architecture, with tied and separate output projections
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=211, head_dim=8, rope_theta=10000.0,
                                                      tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=199, head_dim=16, rope_theta=1000000.0,
                                                      tie_word_embeddings=True)),
}


@pytest.mark.parametrize("architecture", sorted(TINY_HF))
def test_greedy_tokens_equal_transformers_on_a_tiny_checkpoint(architecture, tmp_path):
    import transformers

    from jaxpaged.models.checkpoint import load_checkpoint

    config_class, model_class, fields = TINY_HF[architecture]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                                    num_attention_heads=8, num_key_value_heads=2,
                                                    max_position_embeddings=256, rms_norm_eps=1e-6, **fields)
    hf_model = getattr(transformers, model_class)(hf_config).eval()
    with torch.no_grad():  # a random init with larger weights, so that tokens vary along the sequence
        for p in hf_model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path / architecture, safe_serialization=True)
    model, _ = load_checkpoint(str(tmp_path / architecture))
    assert model.config.qk_norm == (architecture == "qwen3") and model.config.rope_theta == fields["rope_theta"]
    prompts = [[5, 17, 99, 3], [190, 1, 1, 1, 7, 8, 9, 10, 42], [150]]
    ours = generate(model, prompts, max_new_tokens=40, block_size=8, eos_token_ids=[]).tokens
    theirs = _hf_greedy(hf_model, prompts, 40)
    assert ours == theirs
    assert all(len(set(t)) > 3 for t in ours), "the comparison is not on a constant sequence"


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_on_smollm2_from_the_same_gguf(
        smollm2, embedded_gguf_parsed_once):
    """Our load_gguf() (the shared `smollm2` fixture) and transformers' own GGUF loader, from the one file.

    Three prompts of at most 8 tokens and 24 new tokens (two decode chunks): the buckets of
    test_smollm2's paged run, so the two share their compilations."""
    from transformers import AutoModelForCausalLM

    from jaxpaged.models.gguf_weights import default_gguf_path

    path = default_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    torch_dtype=torch.float32).eval()
    model, tokenizer = smollm2
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "def add(a, b):",
                                             "Photosynthesis is the process by which")]
    ours = generate(model, prompts, max_new_tokens=24, eos_token_ids=[]).tokens
    theirs = _hf_greedy(hf_model, prompts, 24)
    for mine, ref in zip(ours, theirs):
        assert mine == ref, (tokenizer.decode(mine), tokenizer.decode(ref))

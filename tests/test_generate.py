"""Batched generation: paged equals contiguous, stopping, freeing, sampling, bounded compilations."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpaged.models import generate as generation
from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.sampling import SamplingParams

PROMPTS = [[5, 9, 2, 7, 7, 1], [3], [8, 8, 8, 1, 2, 3, 4, 5, 6, 7, 9]]


@pytest.fixture(scope="module")
def model():
    return MiniLLM(preset("tiny", vocab_size=64), rngs=nnx.Rngs(2))


def test_paged_and_contiguous_give_identical_greedy_tokens(model):
    paged = generate(model, PROMPTS, max_new_tokens=21, cache="paged", block_size=8, chunk_size=5)
    dense = generate(model, PROMPTS, max_new_tokens=21, cache="contiguous", chunk_size=5)
    assert paged.tokens == dense.tokens
    assert [len(t) for t in paged.tokens] == [21, 21, 21] and paged.finish_reasons == ["length"] * 3
    assert paged.decode_tokens == 3 * 20  # the first token of each comes from prefill
    # The peak is read when the pool held the most: every prompt plus 20 fed tokens, in blocks of 8.
    assert paged.peak_memory.used_blocks == sum(-(-(len(p) + 20) // 8) for p in PROMPTS)
    assert paged.peak_memory.bytes_used < dense.peak_memory.bytes_reserved


def test_eos_stops_one_sequence_and_frees_its_blocks(model):
    free_run = generate(model, PROMPTS, max_new_tokens=12, block_size=8)
    eos = free_run.tokens[1][3]  # the 4th token of the second prompt becomes its stop token
    stopped = generate(model, PROMPTS, max_new_tokens=12, block_size=8, eos_token_ids=[eos])
    for out, ref, reason in zip(stopped.tokens, free_run.tokens, stopped.finish_reasons):
        cut = ref.index(eos) if eos in ref else len(ref)
        assert out == ref[:cut]
        assert reason == ("eos" if eos in ref else "length")
    assert stopped.finish_reasons[1] == "eos"


def test_finished_sequences_give_blocks_back(model, monkeypatch):
    freed_rows = []
    original = generation.free_seqs

    def spy(state, seq_idx):
        freed_rows.append(sorted(int(r) for r in np.asarray(seq_idx) if r < state.config.max_seqs))
        return original(state, seq_idx)

    monkeypatch.setattr(generation, "free_seqs", spy)
    generate(model, PROMPTS, max_new_tokens=9, block_size=8, chunk_size=4)
    assert sorted(r for rows in freed_rows for r in rows) == [0, 1, 2], "every sequence is freed exactly once"


def test_pool_too_small_is_a_clear_error(model):
    with pytest.raises(RuntimeError, match="blocks"):
        generate(model, PROMPTS, max_new_tokens=30, block_size=8, num_blocks=4)


@pytest.mark.slow
def test_sampling_is_reproducible_and_greedy_at_its_limits(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8).tokens
    assert generate(model, PROMPTS, max_new_tokens=8, sampling=SamplingParams(temperature=1.0, top_k=1)).tokens == greedy
    assert generate(model, PROMPTS, max_new_tokens=8, sampling=SamplingParams(temperature=1.0, top_p=1e-6)).tokens == greedy
    hot = SamplingParams(temperature=2.0, top_k=40, top_p=0.95)
    first = generate(model, PROMPTS, max_new_tokens=8, sampling=hot, key=jax.random.key(1)).tokens
    assert generate(model, PROMPTS, max_new_tokens=8, sampling=hot, key=jax.random.key(1)).tokens == first
    assert generate(model, PROMPTS, max_new_tokens=8, sampling=hot, key=jax.random.key(2)).tokens != first


def test_compilations_are_bounded_by_buckets(model):
    generate(model, [[1, 2, 3]], max_new_tokens=10, block_size=8)
    prefills, decodes = generation._prefill._cache_size(), generation._decode_chunk._cache_size()
    for prompt, new in (([4, 5], 12), ([6, 7, 8, 9, 1], 9), ([2], 11)):  # same buckets: no new compilation
        generate(model, [prompt], max_new_tokens=new, block_size=8)
    assert generation._prefill._cache_size() == prefills
    assert generation._decode_chunk._cache_size() == decodes


def test_bad_arguments():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    model = MiniLLM(preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="cache"):
        generate(model, [[1]], cache="ring")


def test_generate_refuses_past_the_context_and_prefills_long_prompts_in_chunks(model):
    with pytest.raises(ValueError, match=r"\(1000 tokens\) plus max_new_tokens \(30\) is 1030 positions, past "
                                         r"the model's context of 1024"):
        generate(model, [[1] * 1000], max_new_tokens=30)
    prompt = np.random.default_rng(0).integers(0, 64, 40).tolist()
    whole = generate(model, [prompt, [3, 4]], max_new_tokens=6, block_size=8)
    chunked = generate(model, [prompt, [3, 4]], max_new_tokens=6, block_size=8, prefill_chunk=16)  # 3 chunks
    assert chunked.tokens == whole.tokens and chunked.prompt_tokens == whole.prompt_tokens == 42

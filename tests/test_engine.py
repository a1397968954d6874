"""The engine: a mixed batch equals each request alone, through preemption, prefix caching, chunked
prefill and forks; stop conditions; abort; bad input. The integrity check runs after every step."""

import numpy as np
import pytest
from flax import nnx

from jaxpaged.engine import LLM, Engine, SamplingParams
from jaxpaged.models.config import preset
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import Tokenizer

SYSTEM = [7, 3, 9, 1, 4, 4, 2, 8, 6, 5, 0, 1, 2, 3, 4, 5, 6, 7]  # a shared prefix over two blocks of 8


@pytest.fixture(scope="module")
def model():
    return MiniLLM(preset("tiny", vocab_size=256, eos_token_ids=(255,)), rngs=nnx.Rngs(5))


def _requests():
    rng = np.random.default_rng(0)
    prompts = [SYSTEM + rng.integers(0, 250, n).tolist() for n in (3, 17, 1, 9)] + [rng.integers(0, 250, 30).tolist()]
    params = [SamplingParams(temperature=0.0, max_tokens=12), SamplingParams(temperature=1.0, seed=11, max_tokens=20),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=7),
              SamplingParams(temperature=0.0, max_tokens=25), SamplingParams(temperature=1.2, top_k=5, seed=8,
                                                                             max_tokens=16)]
    return prompts, params


def _engine(model, **changes):
    args = dict(block_size=8, num_blocks=96, max_num_seqs=8, max_num_batched_tokens=64, decode_steps=4,
                check_integrity=True)
    return Engine(model, **{**args, **changes})


def _run(engine, prompts, params, arrivals=None):
    """Adds request i before step arrivals[i]; returns each request's token lists."""
    arrivals = arrivals or [0] * len(prompts)
    outputs, step = {}, 0
    while len(outputs) < len(prompts):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                engine.add_request(str(i), prompts[i], params[i])
        for output in engine.step():
            if output.finished:
                outputs[int(output.request_id)] = [c.token_ids for c in output.outputs]
        step += 1
    assert engine.scheduler.blocks.num_used_blocks == 0, "every block comes back"
    return [outputs[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def solo(model):
    """Each request alone in an engine of its own."""
    prompts, params = _requests()
    return [_run(_engine(model, enable_prefix_caching=False), [p], [q])[0] for p, q in zip(prompts, params)]


def test_a_mixed_batch_arriving_over_time_equals_each_request_alone(model, solo):
    prompts, params = _requests()
    engine = _engine(model)
    assert _run(engine, prompts, params, arrivals=[0, 0, 2, 3, 5]) == solo
    assert engine.stats().mixed_steps > 0, "no prefill step took the running sequences' decodes along"
    assert all(len(out[0]) == p.max_tokens for out, p in zip(solo, params)), "no EOS among these (checked)"


def test_packed_prefill_rows_follow_tokens_and_longest_chunk():
    """A prefill call's packed rows: set by its token count and longest chunk, not by how many chunks
    it has (up to the area rule), so recomputed prompts of varied lengths meet fewer shapes."""
    from jaxpaged.engine.runner import PACKED_ROWS_AREA, pack_chunks

    shapes = set()
    for lengths in ([1000, 900, 800], [1000, 500, 300, 200, 100, 20], [1024, 1000] + [16] * 10):
        tokens, token_at = pack_chunks([[7] * n for n in lengths])
        assert tokens.shape == (4096,) and token_at.shape[1] == 1024
        assert token_at.shape[0] >= len(lengths) and token_at.shape[0] * 1024 >= PACKED_ROWS_AREA * 4096
        filled = token_at < tokens.shape[0]
        assert filled.sum(axis=1)[: len(lengths)].tolist() == lengths and not filled[len(lengths):].any()
        assert sorted(tokens[token_at[filled]].tolist()) == [7] * sum(lengths)
        shapes.add((tokens.shape, token_at.shape))
    assert len(shapes) == 1, shapes


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("decoding", [True, False])
def test_a_mixed_step_equals_a_decode_step_then_a_prefill_step(model, scanned, decoding):
    """MiniLLM.mixed_step, its chunks packed on one token axis: the same logits and the same cache,
    bit for bit, as a decode step and a prefill step of padded rows run apart (or the prefill step
    alone, where no row decodes)."""
    import jax
    import jax.numpy as jnp

    import jaxpaged as jp
    from jaxpaged.engine.runner import pack_chunks

    net = model.scanned() if scanned else model
    state = jp.init_state(jp.CacheConfig.from_model_config(model.config, num_blocks=32, block_size=4, max_seqs=4))
    rows = lambda *r: jnp.asarray(r, jnp.int32)  # noqa: E731
    _, state, _ = net.step(jnp.asarray(np.arange(14).reshape(2, 7) % 250, jnp.int32), state, seq_idx=rows(0, 1),
                           num_tokens=rows(5, 7))
    last, active = rows(11, 12), jnp.ones(2, bool)
    chunk_lists = [list(range(40, 46)), [52, 53, 54]]
    tokens, token_at = pack_chunks(chunk_lists)
    assert tokens.shape == (16,) and token_at.shape == (4, 16), "9 tokens packed in 16, rows padded to 16; 4 rows (2 of padding: table row 4 is none)"
    chunks = jnp.asarray([c + [0] * (16 - len(c)) for c in chunk_lists], jnp.int32)
    apart = jax.tree.map(jnp.copy, state)
    decoded = np.zeros((0, model.config.vocab_size), np.float32)
    if decoding:
        decoded, apart, _ = net.decode_step(last, apart, active=active, seq_idx=rows(0, 1))
    prefilled, apart, _ = net.step(chunks, apart, seq_idx=rows(2, 3), num_tokens=rows(6, 3), logit_index=rows(5, 2))
    logits, together, ok = net.mixed_step(last if decoding else None, jnp.asarray(tokens), state,
                                          token_at=jnp.asarray(token_at), seq_idx=rows(2, 3, 4, 4),
                                          num_tokens=rows(6, 3, 0, 0),
                                          active=active, decode_idx=rows(0, 1))
    assert bool(ok)
    assert logits.shape[0] == len(decoded) + token_at.shape[0]
    assert np.array_equal(np.asarray(logits)[: len(decoded) + 2], np.concatenate([decoded, prefilled]))
    for x, y in zip(jax.tree.leaves(apart), jax.tree.leaves(together)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_overlapped_decode_calls_give_the_same_tokens_as_calls_read_one_by_one(model, solo):
    prompts, params = _requests()
    engine = _engine(model, overlap=False)
    assert _run(engine, prompts, params) == solo and engine.stats().overlapped_calls == 0
    engine = _engine(model)  # overlap is the default
    assert _run(engine, prompts, params) == solo
    assert engine.stats().overlapped_calls > 0, "no decode call was started ahead"
    engine = _engine(model, launcher_thread=False)  # calls on the engine's own thread
    assert _run(engine, prompts, params) == solo and engine.stats().overlapped_calls > 0


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_and_resumed_requests_give_the_same_tokens(model, solo, caching):
    prompts, params = _requests()
    engine = _engine(model, num_blocks=10, max_num_batched_tokens=8, enable_prefix_caching=caching)
    assert _run(engine, prompts, params) == solo
    assert engine.scheduler.num_preemptions > 0, "the pool should have been too small"
    assert engine.stats().peak_used_blocks == 10, "preemption comes only when the pool is full"


def test_prefix_caching_shares_the_system_prompt(model):
    prompts, params = _requests()
    engine = _engine(model)
    _run(engine, prompts[:1], params[:1])
    _run(engine, prompts[1:4], params[1:4])
    stats = engine.scheduler.blocks.stats
    assert stats.hit_blocks >= 6 and engine.stats().prefix_hit_rate > 0.5  # two system blocks for each of three


def test_parallel_samples_share_the_prompt_and_each_equals_a_solo_run_with_its_seed(model):
    prompt = SYSTEM + [5, 5, 5]  # 21 tokens: two full blocks and a partial one
    engine = _engine(model, enable_prefix_caching=False)
    request = engine.add_request("a", prompt, SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=9))
    engine.step()  # the prefill, then the fork
    assert [s.blocks.blocks[:3] for s in request.sequences[1:]] == [request.sequences[0].blocks.blocks[:3]] * 2
    assert engine.scheduler.blocks.num_used_blocks == 3  # three samples on the prompt's three blocks
    assert engine.stats().peak_used_blocks == 3
    outputs = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs = [c.token_ids for c in output.outputs] if output.finished else outputs
    for j, tokens in enumerate(outputs):
        alone = _run(_engine(model), [prompt], [SamplingParams(temperature=1.0, seed=40 + j, max_tokens=9)])[0][0]
        assert tokens == alone
    assert len({tuple(t) for t in outputs}) > 1


def test_stop_tokens_min_tokens_ignore_eos_and_max_tokens(model, solo):
    prompts, params = _requests()
    free_run = solo[3][0]  # greedy, 25 tokens
    stop = free_run[5]
    cut = free_run.index(stop)
    engine = _engine(model)
    cases = [SamplingParams(temperature=0.0, max_tokens=25, stop_token_ids=[stop]),
             SamplingParams(temperature=0.0, max_tokens=25, stop_token_ids=[stop], min_tokens=cut + 1),
             SamplingParams(temperature=0.0, max_tokens=4)]
    out = _run(engine, [prompts[3]] * 3, cases)
    assert out[0][0] == free_run[:cut]
    assert len(out[1][0]) > cut and stop not in out[1][0][:cut + 1]  # the stop token may not come before min_tokens
    assert out[2][0] == free_run[:4]
    eos_model = MiniLLM(preset("tiny", vocab_size=256, eos_token_ids=(free_run[0],)), rngs=nnx.Rngs(5))
    ended = _run(_engine(eos_model), [prompts[3]] * 2, [SamplingParams(temperature=0.0, max_tokens=25),
                                                        SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)])
    assert ended[0][0] == [] and ended[1][0] == free_run


def test_stop_strings_and_abort(model):
    engine = _engine(model, max_num_seqs=4)
    llm = LLM(model, Tokenizer.byte_level(), block_size=8, num_blocks=64, max_num_seqs=4, decode_steps=4)
    free = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    stop = free.text[6:8]
    stopped = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=20, stop=[stop]), use_tqdm=False)[0]
    assert stopped.outputs[0].text == free.text[:free.text.index(stop)]
    assert stopped.outputs[0].finish_reason == "stop" and free.finish_reason == "length"
    engine.add_request("long", list(range(40)), SamplingParams(temperature=0.0, max_tokens=100))
    engine.add_request("other", list(range(10)), SamplingParams(temperature=0.0, max_tokens=3))
    engine.step()
    engine.step()
    used = engine.scheduler.blocks.num_used_blocks
    engine.abort_request("long")
    assert engine.scheduler.blocks.num_used_blocks < used and "long" not in engine.requests
    engine.scheduler.check()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.blocks.num_used_blocks == 0
    with pytest.raises(KeyError, match="no such request"):
        engine.abort_request("long")


def test_bad_requests_are_refused_by_field_and_leave_the_engine_as_it_was(model):
    engine = _engine(model, num_blocks=8)
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2))
    for prompt, params, field in [([], SamplingParams(), "prompt: empty"),
                                  ([7] * 1020, SamplingParams(max_tokens=10), "max_tokens: the prompt"),
                                  ([7] * 60, SamplingParams(max_tokens=20), "never run"),
                                  ("text", SamplingParams(), "needs a tokenizer"),
                                  ([1], SamplingParams(stop=["x"]), "stop: "),
                                  ([1, 10**9], SamplingParams(), "prompt: token id 1000000000 is outside"),
                                  ([-1], SamplingParams(), "prompt: token id -1 is outside"),
                                  ([1], SamplingParams(logprobs=21), "logprobs: at most 20")]:
        with pytest.raises(ValueError, match=field):
            engine.add_request(None, prompt, params)
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("ok", [1], SamplingParams())
    assert list(engine.requests) == ["ok"] and len(engine.scheduler.waiting) == 1
    while engine.has_unfinished_requests():
        engine.step()


def test_8bit_pools_run_through_the_engine_forks_included(model):
    """int8 K/V with scales: samples forked on a partly filled shared block (copied with its scales on
    write) each equal a solo run, and a greedy request equals the static generate on the same pools."""
    from jaxpaged.models.generate import generate

    prompt = SYSTEM + [5, 5, 5]
    forked = SamplingParams(n=2, temperature=1.0, seed=40, max_tokens=9)
    out = _run(_engine(model, kv_dtype="int8", enable_prefix_caching=False), [prompt, prompt[:7]],
               [forked, SamplingParams(temperature=0.0, max_tokens=6)])
    for j, tokens in enumerate(out[0]):
        alone = _run(_engine(model, kv_dtype="int8"), [prompt], [SamplingParams(temperature=1.0, seed=40 + j,
                                                                                 max_tokens=9)])[0][0]
        assert tokens == alone
    static = generate(model, [prompt[:7]], max_new_tokens=6, kv_dtype="int8", block_size=8, eos_token_ids=[255])
    assert out[1][0] == static.tokens[0]

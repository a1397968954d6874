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


def test_scanned_prefill_calls_and_unrolled_decode_calls_give_each_requests_tokens(model, solo):
    """scan_layers="prefill" (`scan_plan`): prefill calls run the stacked layers scanned, decode calls
    the model's own unrolled layers, and the requests get the tokens they get alone (where every call
    is scanned, the CPU's default). A bad value is a clear error."""
    import jax

    from jaxpaged.engine.runner import scan_plan, scanned_bytes

    prompts, params = _requests()
    engine = _engine(model, scan_layers="prefill")
    runner = engine.runner
    assert runner.scan == (True, False) and scan_plan(model, None) == (True, True)  # the CPU's default
    assert scan_plan(model.scanned(), True) == (False, False), "a view already scanned runs as it is"
    own = jax.tree.leaves(nnx.state(model))
    assert all(any(leaf is mine for mine in own) for leaf in runner.decode_leaves), "decode runs the model's arrays"
    stacked = [leaf for leaf in runner.prefill_leaves if leaf.ndim and leaf.shape[0] == model.config.num_layers]
    assert sum(leaf.nbytes for leaf in stacked) == scanned_bytes(model, runner.scan) > 0
    assert scanned_bytes(model, (False, False)) == 0
    assert _run(engine, prompts, params, arrivals=[0, 0, 2, 3, 5]) == solo
    assert {key[0] for key in runner.programs} == {"prefill", "decode"}
    with pytest.raises(ValueError, match="scan_layers"):
        _engine(model, scan_layers="decode")


def test_no_compiled_program_copies_a_pool(model):
    """The programs of a warm-up, layers scanned (each layer a loop step) and prefill calls with decode
    rows among them: no instruction copies a pool; the pools are written in place. (A mixed call
    that wrote the chunks' K/V after the decode rows' attention had read the pools copied both
    pools in every layer, here and on an H200.)"""
    import re

    engine = _engine(model, num_blocks=160, min_prefill_tokens=64)  # a pool of a shape no other array has
    assert engine.warm_up(sampling=False) == 3
    shape = ",".join(map(str, engine.runner.state.pools.k.shape))
    copying = re.compile(rf"= f32\[{shape}\]\S* (copy|copy-start)\(")
    texts = [executable.as_text() for (_, config, _), executable in engine.runner._executables.items()
             if config == engine.cache_config]
    assert len(texts) == 3 and all(f"f32[{shape}]" in text for text in texts)
    assert not [line for text in texts for line in text.splitlines() if copying.search(line)]


def test_a_packed_prefill_call_has_one_shape_per_power_of_two_of_its_tokens():
    """Chunks packed in tiles: the shapes depend on the padded token count alone, not on how many
    chunks there are or how long the longest is; every token lies in its chunk's tiles, in order."""
    from jaxpaged.engine.runner import pack_chunks

    shapes = set()
    for lengths in ([1000, 900, 800], [1000, 500, 300, 200, 100, 20], [1024, 1000] + [16] * 10, [1] * 64):
        chunks = [[(b * 7 + t) % 250 for t in range(n)] for b, n in enumerate(lengths)]
        packed = pack_chunks(chunks, list(range(3, 3 + len(lengths))), 64, 16)
        assert packed.tokens.shape == ((4096,) if lengths[0] > 1 else (1024,))
        assert packed.tile_row.shape[0] * 16 == packed.tokens.shape[0]
        assert packed.seq_idx.tolist() == list(range(3, 3 + len(lengths))) + [64] * (64 - len(lengths))
        for b, chunk in enumerate(chunks):
            tiles = np.flatnonzero(packed.tile_row == b)
            assert packed.tile_start[tiles].tolist() == [16 * j for j in range(-(-len(chunk) // 16))]
            read = np.concatenate([packed.tokens[16 * t:16 * t + 16] for t in tiles])[: len(chunk)]
            assert read.tolist() == chunk and packed.tokens[packed.last_at[b]] == chunk[-1]
        shapes.add((packed.tokens.shape, packed.tile_row.shape))
    assert len(shapes) == 2, shapes
    assert pack_chunks([[1] * 20], [0], 4, 16).tokens.shape == (32,)
    floored = pack_chunks([[1] * 20], [0], 4, 16, minimum=128)  # a floor pads small calls up to it
    assert floored.tokens.shape == (128,) and floored.tile_row.tolist() == [0, 0] + [4] * 6


def test_the_benchmarks_timed_engine_takes_the_untimed_engines_pool_and_compiles_nothing(model, monkeypatch):
    """A pool sized from free memory comes out smaller while an earlier engine holds its own: the
    benchmark's timed engine must still get the pool, and so the programs, that the untimed one
    compiled ahead; else its calls go through jit and their compilation is timed as running."""
    import jaxpaged.engine.bench as bench
    import jaxpaged.engine.engine as engine_module

    free = iter([48, 40])  # the blocks that fit at each sizing: fewer once a pool is held
    monkeypatch.setattr(engine_module, "_blocks_that_fit", lambda *args, **kwargs: next(free))
    made, jitted, real = [], [], bench.LLM

    def llm(*args, **kwargs):
        if made:  # the timed engine: what jit had compiled by then
            jitted.extend([made[0].engine.runner._prefill._cache_size(), made[0].engine.runner._decode._cache_size()])
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(bench, "LLM", llm)
    rng = np.random.default_rng(1)
    prompts, outputs = [rng.integers(0, 250, n).tolist() for n in (5, 12, 20)], [6, 3, 9]
    run = bench.run_engine(model, prompts, outputs, dict(block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                                                         decode_steps=4, max_model_len=128))
    timed = made[1].engine.runner
    assert run.stats.total_blocks == 48, "the untimed engine's pool"
    assert [timed._prefill._cache_size(), timed._decode._cache_size()] == jitted, "the timed run compiled"
    assert [len(r.outputs[0].token_ids) for r in run.results] == outputs


def test_compiler_options_reach_every_compilation_and_keep_the_tokens(model, solo):
    """`Engine(compiler_options=)` reaches XLA (an unknown option fails the warm-up naming it), jits
    apart from the default options, and leaves each request's tokens as they are alone."""
    prompts, params = _requests()
    bad = _engine(model, compiler_options={"no_such_xla_option": "1"})
    with pytest.raises(Exception, match="no_such_xla_option"):
        bad.warm_up(sampling=False)
    engine = _engine(model, compiler_options={"xla_gpu_enable_command_buffer": ""})  # a GPU option; the CPU keeps it
    assert engine.runner._decode is not _engine(model).runner._decode, "jitted apart from the default options"
    assert _run(engine, prompts[:2], params[:2]) == solo[:2]


def test_raising_the_smallest_calls_leaves_fewer_shapes_to_compile(model):
    """The shapes the warm-up compiles (`Runner.buckets`): packed prefill tokens from the tile (32 at
    the tiny model's heads and a 64-token budget) or `min_prefill_tokens` up to the budget, decode
    rows from `min_decode_rows` up to the table's; a bad floor is a clear error."""
    assert _engine(model).runner.buckets(64) == ([32, 64], [8])
    assert _engine(model, max_num_batched_tokens=512).runner.buckets(512) == ([32, 64, 128, 256, 512], [8])
    floored = _engine(model, max_num_batched_tokens=512, min_prefill_tokens=100, min_decode_rows=2)
    assert floored.runner.buckets(512) == ([128, 256, 512], [2, 4, 8])
    for bad, error in ((0, ValueError), (-4, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="min_prefill_tokens must be an int >= 1"):
            _engine(model, min_prefill_tokens=bad)
    with pytest.raises(ValueError, match="min_decode_rows must be an int >= 1"):
        _engine(model, min_decode_rows=0)


def test_after_a_warm_up_greedy_and_sampled_requests_compile_nothing(model, solo):
    """Engine.warm_up compiles every program greedy and randomly sampled steps can need (tiles of 32
    at a budget of 64: packed prefill of 32 and 64 tokens, with and without decode rows, and decode
    of 8 rows; each greedy and with random draws); then a run with prompts arriving over time goes
    through those executables alone (no jit compilation) and gives the same tokens."""
    prompts, params = _requests()
    chosen = [0, 1, 3]  # greedy, sampled at temperature 1 with no filter, greedy
    assert params[1].temperature > 0 and params[1].top_p == 1 and not params[1].top_k
    engine = _engine(model)
    assert engine.warm_up() == 10 and engine.stats().programs == 10
    assert engine.scheduler.blocks.num_used_blocks == 0 and not engine.has_unfinished_requests()
    jitted = [engine.runner._prefill._cache_size(), engine.runner._decode._cache_size()]
    out = _run(engine, [prompts[i] for i in chosen], [params[i] for i in chosen], arrivals=[0, 1, 2])
    assert out == [solo[i] for i in chosen]
    assert engine.stats().programs == 10, "a program was compiled after the warm-up"
    assert [engine.runner._prefill._cache_size(), engine.runner._decode._cache_size()] == jitted, (
        "a call went through jit, not the executables compiled ahead")
    assert _engine(model).warm_up() == 0, "another engine of the same structure and pool shares them"
    floored = _engine(model, min_prefill_tokens=64)  # every prefill call padded to 64 tokens: compiled above
    assert floored.warm_up() == 0
    assert _run(floored, [prompts[i] for i in chosen], [params[i] for i in chosen], arrivals=[0, 1, 2]) == [
        solo[i] for i in chosen]
    assert {key[2] for key in floored.runner.programs if key[0] == "prefill"} == {(64,)}
    assert [engine.runner._prefill._cache_size(), engine.runner._decode._cache_size()] == jitted
    six = _engine(model, max_num_seqs=6, max_num_batched_tokens=192, min_prefill_tokens=256)  # 6 prompts in one call
    assert six.warm_up(sampling=False) == 3  # greedy: 256 packed tokens with and without decode rows, 6 decode rows
    jitted = [six.runner._prefill._cache_size(), six.runner._decode._cache_size()]
    rng = np.random.default_rng(3)
    _run(six, [rng.integers(0, 250, 5 + i).tolist() for i in range(6)], [params[0]] * 6)
    assert [six.runner._prefill._cache_size(), six.runner._decode._cache_size()] == jitted, (
        "six samples at a table of six rows padded past the warmed shape")


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
    chunk_lists = [list(range(40, 51)), [52, 53, 54]]
    packed = pack_chunks(chunk_lists, [2, 3], 4, 8)
    assert packed.tokens.shape == (32,) and packed.tile_row.tolist() == [0, 0, 1, 4], "tiles of 8: 2 + 1, one of padding"
    chunks = jnp.asarray([c + [0] * (16 - len(c)) for c in chunk_lists], jnp.int32)
    apart = jax.tree.map(jnp.copy, state)
    decoded = np.zeros((0, model.config.vocab_size), np.float32)
    if decoding:
        decoded, apart, _ = net.decode_step(last, apart, active=active, seq_idx=rows(0, 1))
    prefilled, apart, _ = net.step(chunks, apart, seq_idx=rows(2, 3), num_tokens=rows(11, 3), logit_index=rows(10, 2))
    logits, together, ok = net.mixed_step(
        last if decoding else None, jnp.asarray(packed.tokens), state, seq_idx=jnp.asarray(packed.seq_idx),
        num_tokens=jnp.asarray(packed.num_tokens), tile_row=jnp.asarray(packed.tile_row),
        tile_start=jnp.asarray(packed.tile_start), last_at=jnp.asarray(packed.last_at), active=active,
        decode_idx=rows(0, 1))
    assert bool(ok)
    assert logits.shape[0] == len(decoded) + 4
    assert np.array_equal(np.asarray(logits)[: len(decoded) + 2], np.concatenate([decoded, prefilled]))
    for x, y in zip(jax.tree.leaves(apart), jax.tree.leaves(together)):
        assert np.array_equal(np.asarray(x), np.asarray(y))



def test_a_decode_row_that_is_not_active_reads_none_of_its_cached_positions(monkeypatch):
    """A decode step's inactive row (an engine row that finished early in a multi-step call) gets
    position -1, so the decode kernel (interpret mode here) reads none of its K/V: with its blocks
    full of NaN its logits stay finite, and the active row's logits equal a step of that row alone."""
    import functools

    import jax
    import jax.numpy as jnp

    import jaxpaged as jp
    from jaxpaged import attention, kernels

    model = MiniLLM(preset("tiny", vocab_size=256, head_dim=64), rngs=nnx.Rngs(5))  # a head dim the kernels take
    rows = lambda *r: jnp.asarray(r, jnp.int32)  # noqa: E731
    state = jp.init_state(jp.CacheConfig.from_model_config(model.config, num_blocks=16, block_size=4, max_seqs=2))
    _, state, _ = model.step(jnp.asarray(np.arange(14).reshape(2, 7) % 250, jnp.int32), state, seq_idx=rows(0, 1),
                             num_tokens=rows(5, 7))
    monkeypatch.setattr(attention, "choose_impl", lambda *args, **kwargs: "kernel")  # decode steps on the kernel
    monkeypatch.setattr(kernels, "paged_decode_attention",
                        functools.partial(kernels.paged_decode_attention, interpret=True))
    untouched = jax.tree.map(jnp.copy, state)  # (a step gives its state's buffers up)
    blocks = state.table.block_ids[1, :2]  # row 1's 7 positions
    pools = state.pools
    poisoned = state.replace(pools=pools.replace(k=pools.k.at[:, :, blocks].set(jnp.nan),
                                                 v=pools.v.at[:, :, blocks].set(jnp.nan)))
    last = rows(11, 12)
    logits, after, ok = model.decode_step(last, poisoned, active=jnp.asarray([True, False]), seq_idx=rows(0, 1))
    assert bool(ok)
    assert np.isfinite(np.asarray(logits)).all(), "the inactive row read its (NaN) positions"
    alone, _, _ = model.decode_step(last[:1], untouched, active=jnp.asarray([True]), seq_idx=rows(0))
    np.testing.assert_array_equal(np.asarray(logits)[:1], np.asarray(alone))
    assert np.asarray(after.table.seq_lens)[:, 1].tolist() == [7] * model.config.num_layers, "it wrote nothing"

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

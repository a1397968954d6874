"""Tensor and data parallelism on CPU devices: the heads' layout over devices, the mesh's checks,
the sharded model and cache against one device (greedy tokens equal, logits to float32
tolerance), the compiled decode step's collectives, the loaders' placement, the kernels per
device, and the command's flags.

XLA reads XLA_FLAGS once, when jax starts its backend, and the rest of the suite runs on one
device; so a test that needs 8 devices (`on_eight_devices`) runs itself again in a fresh Python
process whose CPU backend has 8 (--xla_force_host_platform_device_count=8), and here checks that
it passed there.

Models: "tiny" (4 query heads, 2 kv heads: fewer kv heads than devices from 4 on) and
"smollm2" (SmolLM2-135M's shape, 9 query heads and 3 kv heads, 2 of its 30 layers, random weights:
3 kv heads divide none of 2, 4, 8 devices, so every degree pads).
"""

import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpaged import CacheConfig, init_state
from jaxpaged.parallel import DATA_AXIS, TENSOR_AXIS, head_layout, make_mesh, per_replica, place_cache, replicas
from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.parallel import lay_out_heads, param_spec, shard_model
from jaxpaged.models.weights import hf_tensor_shapes, model_from_hf_tensors, to_hf_tensors

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 8
DEVICE_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
# These tests compile many small programs and run each once: XLA's CPU backend at its lowest
# optimisation level compiles them about 1.5x faster (the HLO passes, the SPMD partitioner's
# among them, run as ever).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESHES = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 4))  # (data, tensor)
CONFIGS = {"tiny": preset("tiny"), "smollm2": preset("smollm2-135m-random", num_layers=2)}
PROMPTS = [[5, 9, 2, 7, 1], [3, 3, 8], [11, 4, 6, 2, 9, 12, 1, 5], [7]]  # B = 4 rows, ragged


def random_model(config, seed: int = 0) -> MiniLLM:
    """A MiniLLM of random weights drawn on the host: on a 2-core CPU several times faster than flax's
    initialisers for SmolLM2's shape (they compile a program per shape)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(config).items():
        if len(shape) == 1:  # a norm's weight
            tensors[name] = 1 + 0.1 * rng.standard_normal(shape, np.float32)
        else:  # a linear layer's [out, in], or the embedding [V, E]: variance 1 / in (or 1 / E), as flax's
            tensors[name] = rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])
    return model_from_hf_tensors(config, tensors)


def on_eight_devices(test):
    """Runs the test in a fresh Python process with 8 CPU devices and asserts here that it passed there."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        if jax.device_count() >= DEVICES:
            return test(*args, **kwargs)
        if DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
            pytest.fail(f"XLA_FLAGS has {DEVICE_FLAG}, but jax sees {jax.device_count()} device(s)")
        node_id = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG} {FAST_COMPILE}".strip()}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node_id], cwd=ROOT,
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0 and "1 passed" in result.stdout, (
            f"on {DEVICES} devices:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}")

    return run


# ----------------------------------------------------------------------------- one device


@pytest.mark.parametrize("heads, kv_heads, devices, padded", [
    (9, 3, 1, (9, 3)), (9, 3, 2, (12, 4)), (9, 3, 4, (12, 4)), (9, 3, 8, (16, 8)),  # SmolLM2: always padded
    (4, 2, 2, (4, 2)), (4, 2, 4, (4, 4)), (4, 2, 8, (8, 8)),  # tiny: kv heads copied from 4 devices on
    (32, 8, 2, (32, 8)), (32, 8, 4, (32, 8)), (16, 1, 4, (16, 4)), (6, 6, 4, (8, 8)),
])
def test_head_layout_gives_each_device_whole_kv_heads_with_their_own_query_heads(heads, kv_heads, devices, padded):
    layout = head_layout(heads, kv_heads, devices)
    assert (layout.padded_heads, layout.padded_kv_heads) == padded
    assert layout.padded_kv_heads % devices == 0 and layout.padded_heads % layout.padded_kv_heads == 0
    assert layout.identity == (padded == (heads, kv_heads))
    group, padded_group = heads // kv_heads, layout.padded_heads // layout.padded_kv_heads
    real = [h for h in layout.heads if h >= 0]
    assert sorted(real) == list(range(heads)), "every query head exactly once"
    assert set(layout.kv_heads) - {-1} == set(range(kv_heads)), "every kv head at least once"
    for slot, head in enumerate(layout.heads):
        kv_slot = layout.kv_heads[slot // padded_group]
        assert head < 0 or kv_slot == head // group, f"query slot {slot} sits with kv head {kv_slot}, not its own"
    per_device = layout.padded_kv_heads // devices
    assert per_device == -(-kv_heads * max(1, devices // kv_heads) // devices)  # the fewest whole kv heads a device


def test_head_layout_and_make_mesh_refuse_bad_degrees_naming_them():
    with pytest.raises(ValueError, match="tensor_parallel must be a positive int, got 0"):
        head_layout(4, 2, 0)
    with pytest.raises(ValueError, match=r"num_heads \(9\) must be a multiple of num_kv_heads \(2\)"):
        head_layout(9, 2, 2)
    with pytest.raises(ValueError, match="tensor_parallel must be a positive int"):
        make_mesh(0)
    with pytest.raises(ValueError, match="data_parallel must be a positive int"):
        make_mesh(1, -1)
    with pytest.raises(ValueError, match=r"tensor_parallel \(2\) x data_parallel \(1\) = 2 devices must divide the 1"):
        make_mesh(2, devices=jax.devices()[:1])
    mesh = make_mesh(1, devices=jax.devices()[:1])
    assert mesh.axis_names == (DATA_AXIS, TENSOR_AXIS) and mesh.devices.shape == (1, 1)


@pytest.mark.parametrize("name, devices", [("tiny", 8), ("smollm2", 2), ("smollm2", 8)])
def test_heads_laid_out_for_more_devices_than_kv_heads_compute_the_same_logits(name, devices):
    """Copied kv heads, zero kv heads and zero query heads change nothing: on one device, the laid-out
    model (more heads: a model of its own, not a view of the weights) gives the model's logits."""
    model = random_model(CONFIGS[name])
    tensors = {key: np.asarray(value) for key, value in to_hf_tensors(model).items()}
    config, laid_out = lay_out_heads(model.config, tensors, devices)
    layout = head_layout(model.config.num_heads, model.config.num_kv_heads, devices)
    assert (config.num_heads, config.num_kv_heads) == (layout.padded_heads, layout.padded_kv_heads)
    assert -1 in layout.heads, "the case has zero query heads"
    ids = jnp.asarray([PROMPTS[2]])
    np.testing.assert_allclose(np.asarray(model_from_hf_tensors(config, laid_out)(ids)), np.asarray(model(ids)),
                               rtol=1e-5, atol=1e-5)


def test_generate_refuses_a_model_that_is_not_on_its_mesh():
    model = random_model(CONFIGS["tiny"])
    with pytest.raises(ValueError, match="the model's weights are not on this mesh; place them with"):
        generate(model, PROMPTS, max_new_tokens=2, mesh=make_mesh(1))


def test_the_command_refuses_degrees_the_devices_do_not_divide_before_loading(capsys):
    from jaxpaged.models.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hello", "--tensor-parallel", "2", "--data-parallel", "3", "--no-cache"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel 2, --data-parallel 3: tensor_parallel (2) x data_parallel (3) = 6 devices" in err
    assert "loading weights" not in err


# ----------------------------------------------------------------------------- eight devices


def _prefill_then_decode(model, mesh, steps: int = 4):
    """PROMPTS (right-padded, [B, T]) prefilled into a fresh paged cache on `mesh` (None: one device),
    then `steps` greedy decode steps, in one jitted call; each data replica has its own cache and
    B / R of the rows. Returns (prefill logits [B, T, V], greedy tokens [B, 1 + steps], the cache)."""
    batch, length = len(PROMPTS), max(map(len, PROMPTS))
    tokens = jnp.asarray([p + [0] * (length - len(p)) for p in PROMPTS], jnp.int32)
    num_tokens = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    count = replicas(mesh)
    rows = batch // count
    config = CacheConfig.from_model_config(model.config, num_blocks=rows * 4, block_size=4, max_seqs=rows,
                                           max_blocks_per_seq=4, dtype=model.config.dtype)
    cache = init_state(config) if mesh is None else place_cache(init_state, config, mesh=mesh, stacked=count > 1)
    graphdef, params = nnx.split(model)

    def replica(params, cache, tokens, num_tokens):  # one replica's rows [B / R, ...]
        model = nnx.merge(graphdef, params)
        seq_idx = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        logits, cache, _ = model.step(tokens, cache, seq_idx=seq_idx, num_tokens=num_tokens)
        first = jnp.take_along_axis(logits, (num_tokens - 1)[:, None, None], axis=1)[:, 0].argmax(-1).astype(jnp.int32)

        def decode(carry, _):
            cache, last = carry
            step_logits, cache, _ = model.decode_step(last, cache, active=jnp.ones(last.shape, bool), seq_idx=seq_idx)
            token = step_logits.argmax(-1).astype(jnp.int32)
            return (cache, token), token

        (cache, _), decoded = jax.lax.scan(decode, (cache, first), None, length=steps)
        return logits, jnp.concatenate([first[:, None], decoded.T], axis=1), cache

    @jax.jit
    def run(params, cache, tokens, num_tokens):
        if count == 1:
            return replica(params, cache, tokens, num_tokens)
        split = functools.partial(replica, params)
        logits, greedy, cache = per_replica(split, mesh)(cache, tokens.reshape(count, rows, -1),
                                                         num_tokens.reshape(count, rows))
        return logits.reshape(batch, *logits.shape[2:]), greedy.reshape(batch, -1), cache

    return run(params, cache, tokens, num_tokens)


@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])  # slow: 60 s on 2 cores
@on_eight_devices
def test_tensor_and_data_parallel_runs_give_one_devices_tokens_and_logits(name):
    """Tensor parallel 1, 2, 4, 8 and 2 replicas x 4: the same greedy tokens as one device, the prefill's
    logits at every position to float32 tolerance (the partial sums add up in another order: at most
    7.2e-6 apart here, with logits up to 4.6), each device holding only its kv heads of the pools."""
    model = random_model(CONFIGS[name])
    expected_logits, expected_tokens, _ = _prefill_then_decode(model, None)
    for data, tensor in MESHES:
        mesh = make_mesh(tensor, data)
        sharded = shard_model(model, mesh)
        logits, tokens, cache = _prefill_then_decode(sharded, mesh)
        where = f"{data} x {tensor} devices"
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected_tokens), err_msg=where)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), rtol=2e-5, atol=2e-5,
                                   err_msg=where)
        lead = (DATA_AXIS,) if data > 1 else ()
        pools, table = cache.pools.k, cache.table.block_ids
        assert pools.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*lead, None, TENSOR_AXIS)), pools.ndim)
        assert table.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*lead)), table.ndim)  # replicated
        kv_heads = sharded.config.num_kv_heads
        assert {shard.data.shape[-4] for shard in cache.pools.k.addressable_shards} == {kv_heads // tensor}, where
        assert len(cache.pools.k.addressable_shards) == data * tensor


@pytest.mark.slow
@on_eight_devices
def test_generate_and_the_command_on_a_mesh_give_one_devices_tokens(tmp_path, capsys, monkeypatch):
    from jaxpaged.models import cli
    from jaxpaged.models import generate as generation
    from jaxpaged.models.checkpoint import save_checkpoint
    from jaxpaged.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.byte_level()
    model = random_model(preset("tiny", vocab_size=tokenizer.vocab_size))
    texts = ["Once upon", "a time", "there"]  # 3 prompts over 2 replicas: one row of padding
    prompts = [tokenizer.encode(text) for text in texts]
    expected = generate(model, prompts, max_new_tokens=6, eos_token_ids=tokenizer.eos_token_ids)
    eos = expected.tokens[1][2]  # stops row 1 at its third token (and any row where it comes): blocks freed mid-run
    stopped = generate(model, prompts, max_new_tokens=6, eos_token_ids=[eos])
    assert stopped.tokens == [t[:t.index(eos)] if eos in t else t for t in expected.tokens]
    mesh = make_mesh(4, 2)
    sharded = shard_model(model, mesh)
    for cache in ("paged", "contiguous"):
        result = generate(sharded, prompts, max_new_tokens=6, eos_token_ids=[eos], cache=cache, mesh=mesh)
        assert (result.tokens, result.finish_reasons) == (stopped.tokens, stopped.finish_reasons), cache
    programs = [function._cache_size() for function in (generation._prefill, generation._decode_chunk)]
    generate(sharded, [p[::-1] for p in prompts], max_new_tokens=6, eos_token_ids=[eos], mesh=mesh)  # same buckets
    assert [function._cache_size() for function in (generation._prefill, generation._decode_chunk)] == programs

    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(tmp_path / "cache"))
    save_checkpoint(model, str(tmp_path / "tiny"), tokenizer)
    flags = ["--model", str(tmp_path / "tiny"), "--max-new-tokens", "6", "--no-cache"]
    assert cli.main(["generate", *texts, *flags, "--tensor-parallel", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(f"--- [{i}] {text}{tokenizer.decode(tokens)}\n"
                          for i, (text, tokens) in enumerate(zip(texts, expected.tokens)))
    assert "tensor parallel 8 x data parallel 1 on cpu devices: 8 query and 8 kv heads laid out, 1 kv head(s)" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", *flags, "--data-parallel", "2", "--min-p", "0.1"])
    assert "--min-p: the engine's options; with --data-parallel the static" in capsys.readouterr().err


@on_eight_devices
def test_the_engine_on_a_tensor_axis_gives_one_devices_outputs():
    """LLM(tensor_parallel_size=T) for T = 2 and 8 (tiny's 2 kv heads copied over 8 devices): the same
    greedy and seeded outputs as one device, through chunked prefill, mixed steps and preemption in a
    small pool, the pools sharded over kv heads, the block ownership checked after every step; a
    model not on the engine's mesh and a mesh with replicas are refused."""
    from jaxpaged.engine import LLM, Engine, SamplingParams

    model = random_model(preset("tiny"))
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate((5, 23, 11, 17, 3, 29))]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)] * 3
    args = dict(block_size=4, num_blocks=14, max_num_seqs=4, max_num_batched_tokens=16, decode_steps=4,
                check_integrity=True)

    def run(llm):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs], llm.engine.stats().preemptions

    expected, preempted = run(LLM(model, **args))
    assert preempted > 0, "the pool is small enough to preempt"
    for tensor in (2, 8):
        llm = LLM(model, tensor_parallel_size=tensor, **args)
        assert run(llm)[0] == expected, f"tensor parallel {tensor}"
        pools = llm.engine.runner.state.pools.k
        assert {shard.data.shape[1] for shard in pools.addressable_shards} == {
            llm.engine.cache_config.num_kv_heads // tensor}
    with pytest.raises(ValueError, match="not on this mesh"):
        Engine(model, mesh=make_mesh(2))
    with pytest.raises(ValueError, match="tensor axis only"):
        Engine(shard_model(model, make_mesh(2, 2)), mesh=make_mesh(2, 2))


def _collectives(hlo: str) -> list[tuple[str, str]]:
    """(result shape, kind) of every cross-device collective in compiled HLO text."""
    kinds = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast"
    return re.findall(rf"= (\S+) ({kinds})(?:-start)?\(", hlo)


@on_eight_devices
def test_a_compiled_decode_step_all_reduces_twice_a_layer_and_moves_no_pool():
    for name, (data, tensor) in (("tiny", (2, 4)), ("smollm2", (1, 8))):
        mesh = make_mesh(tensor, data)
        model = shard_model(random_model(CONFIGS[name]), mesh)
        c = model.config
        batch, rows = 4, 4 // data
        cache_config = CacheConfig.from_model_config(c, num_blocks=16, block_size=8, max_seqs=rows, max_blocks_per_seq=4)
        cache = place_cache(init_state, cache_config, mesh=mesh, stacked=data > 1)
        graphdef, params = nnx.split(model)  # layers unrolled: each layer's collectives are its own

        @jax.jit
        def decode(params, cache, last):
            def replica(cache, last):
                seq_idx = jnp.arange(last.shape[0], dtype=jnp.int32)
                return nnx.merge(graphdef, params).decode_step(last, cache, active=jnp.ones(last.shape, bool),
                                                               seq_idx=seq_idx)
            return per_replica(replica, mesh)(cache, last if data == 1 else last.reshape(data, rows))

        hlo = decode.lower(params, cache, jnp.zeros(batch, jnp.int32)).compile().as_text()
        collectives = _collectives(hlo)
        where = f"{name} on {data} x {tensor} devices"
        assert [kind for _, kind in collectives] == ["all-reduce"] * 2 * c.num_layers, (where, collectives)
        pool_shard = cache.pools.k.addressable_shards[0].data.size
        for shape, _ in collectives:  # the attention's and the MLP's partial sums: a row's E features each
            dims = [int(d) for d in shape[shape.index("[") + 1:shape.index("]")].split(",")]
            assert shape.startswith("f32[") and dims[-1] == c.hidden_size and np.prod(dims) == rows * c.hidden_size, (
                where, shape)
            assert np.prod(dims) < pool_shard, (where, shape)  # nothing of a pool's size crosses devices


@pytest.mark.slow
@on_eight_devices
def test_loaders_read_each_weight_into_its_shards(tmp_path):
    from model_files import write_llama_gguf

    from jaxpaged.models.checkpoint import load_checkpoint, save_checkpoint
    from jaxpaged.models.gguf_weights import load_gguf
    from jaxpaged.models.tokenizer import Tokenizer

    config = preset("tiny", vocab_size=260, hidden_size=96, num_heads=6, num_kv_heads=3, tie_embeddings=False)
    model = random_model(config, seed=1)
    save_checkpoint(model, str(tmp_path / "ckpt"), Tokenizer.byte_level())
    write_llama_gguf(str(tmp_path / "model.gguf"), model)
    mesh = make_mesh(2, 2)  # 3 kv heads over 2 devices: laid out as 4, with 8 query heads
    ids = jnp.asarray([PROMPTS[2]])
    for loaded in (load_checkpoint(str(tmp_path / "ckpt"), mesh=mesh)[0], load_gguf(str(tmp_path / "model.gguf"),
                                                                                     mesh=mesh)[0]):
        assert (loaded.config.num_heads, loaded.config.num_kv_heads) == (8, 4)
        for path, weight in jax.tree_util.tree_flatten_with_path(nnx.state(loaded, nnx.Param))[0]:
            spec = param_spec(path)
            assert isinstance(weight.sharding, NamedSharding) and weight.sharding.mesh == mesh, path
            assert weight.sharding.spec == spec, path
            local = tuple(size // 2 if axis == TENSOR_AXIS else size for size, axis in zip(weight.shape, (*spec, None, None)))
            assert {shard.data.shape for shard in weight.addressable_shards} == {local}, path
        np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), rtol=2e-5, atol=2e-5)
    odd = config.replace(intermediate_size=100)  # F over 8 devices: refused before any weight is placed
    zeros = {name: np.zeros(shape, np.float32) for name, shape in hf_tensor_shapes(odd).items()}
    with pytest.raises(ValueError, match=r"intermediate_size \(100\), must be a multiple of the mesh's tensor axis \(8\)"):
        model_from_hf_tensors(odd, zeros, mesh=make_mesh(8))


@on_eight_devices
def test_the_kernels_run_per_device_on_their_own_kv_heads(monkeypatch):
    """The GPU kernels (Pallas interpret mode here) under shard_map read each device's shard of the
    pools and agree with one device's reference path, for a prefill chunk and a decode step, alone
    and batched over 2 replicas (vmap over the data axis)."""
    from jaxpaged import attention, kernels
    from jaxpaged.kernels import decode, launch, prefill

    seen = []  # (kernel, kv heads of the pool it was given), as traced

    def interpreted(kernel):
        def call(q, k_pool, *args, **kwargs):
            seen.append((kernel.__name__, k_pool.shape[1]))
            return kernel(q, k_pool, *args, interpret=True, gpu=launch.H100, **kwargs)
        return call

    monkeypatch.setattr(attention, "choose_impl", lambda impl, config, **_: impl if impl != "auto" else "reference")
    monkeypatch.setattr(kernels, "paged_decode_attention", interpreted(decode.paged_decode_attention))
    monkeypatch.setattr(kernels, "paged_prefill_attention", interpreted(prefill.paged_prefill_attention))
    rng = np.random.default_rng(0)
    chunks = [(rng.standard_normal((4, t, 8, 16)).astype(np.float32), rng.standard_normal((4, t, 4, 16)).astype(np.float32),
               np.asarray(n, np.int32)) for t, n in ((5, [5, 4, 1, 3]), (1, [1, 1, 1, 1]))]  # a prefill chunk, a decode step

    def run(mesh, impl):
        """Both chunks' 4 rows through the cache(s) on `mesh` (R replicas of 4 / R rows): outputs [4, T, H, D]."""
        count = replicas(mesh)
        rows = 4 // count
        config = CacheConfig(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=32, block_size=8, max_seqs=rows,
                             max_blocks_per_seq=8)
        state = init_state(config) if mesh is None else place_cache(init_state, config, mesh=mesh, stacked=count > 1)

        def replica(state, q, k, num_tokens):
            state, step = state.begin_step(jnp.arange(rows, dtype=jnp.int32), num_tokens, q.shape[1], impl=impl)
            return state.attend(1, q, k, 2 * k, step)

        outs = []
        for q, k, num_tokens in chunks:
            split = [x.reshape(count, rows, *x.shape[1:]) if count > 1 else x for x in (q, k, num_tokens)]
            out, state = jax.jit(per_replica(replica, mesh))(state, *split)
            outs.append(out.reshape(q.shape))
        return outs

    expected = run(None, "reference")
    assert not seen
    for data, tensor in ((1, 4), (2, 4)):
        for want, out, (_, _, num_tokens) in zip(expected, run(make_mesh(tensor, data), "kernel"), chunks):
            for b, n in enumerate(num_tokens):  # the real queries (padding ones see nothing: their outputs are unused)
                np.testing.assert_allclose(np.asarray(out)[b, :n], np.asarray(want)[b, :n], rtol=1e-5, atol=1e-5,
                                           err_msg=f"{data} x {tensor}")
    assert sorted(set(seen)) == [("paged_decode_attention", 1), ("paged_prefill_attention", 1)]  # 1 of 4 kv heads each

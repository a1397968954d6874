"""The cache protocol: a second model family on the public API, and the explicit attention path."""

import importlib.util
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpaged as jp
from jaxpaged import attention, kernels


def _load_example(name):
    path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpt2():
    return _load_example("gpt2")


def test_gpt2_example_generates_the_same_greedy_tokens_through_both_caches_as_without_one(gpt2):
    model = gpt2.GPT2(gpt2.GPT2Config(), rngs=nnx.Rngs(0))
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7] * 11]  # ragged; the paged rows cross blocks of 8
    paged = gpt2.greedy(model, prompts, max_new_tokens=10, cache="paged")
    contiguous = gpt2.greedy(model, prompts, max_new_tokens=10, cache="contiguous")
    assert paged == contiguous
    graphdef, params = nnx.split(model)

    @jax.jit
    def oracle(ids, num_tokens):  # one causal pass, no cache: logits at the last of num_tokens
        return nnx.merge(graphdef, params)(ids, jp.NoCache(), num_tokens=num_tokens)[0]

    for prompt, new in zip(prompts, paged):
        ids = jnp.asarray([prompt + new + [0] * (24 - len(prompt) - len(new))])  # one shape: one compilation
        for i, token in enumerate(new):
            assert int(jnp.argmax(oracle(ids, jnp.asarray([len(prompt) + i]))[0])) == token
    assert len({tuple(t) for t in paged}) > 1, "distinct prompts should not all give the same tokens"


def test_the_minillm_and_the_example_make_one_cache_call_per_layer(gpt2):
    """The protocol is the whole interface: a cache that only records calls serves both models."""

    class Recorder(jp.NoCache):
        def __init__(self):
            self.calls = []

        def begin_step(self, *args, **kwargs):
            self.calls.append("begin_step")
            return super().begin_step(*args, **kwargs)

        def attend(self, layer, q, k, v, step):
            self.calls.append(("attend", layer))
            return super().attend(layer, q, k, v, step)

    from jaxpaged.models.config import preset
    from jaxpaged.models.llama import MiniLLM

    for model in (gpt2.GPT2(gpt2.GPT2Config(num_layers=3), rngs=nnx.Rngs(0)),
                  MiniLLM(preset("tiny", num_layers=3), rngs=nnx.Rngs(0))):
        recorder = Recorder()
        model(jnp.ones((2, 4), jnp.int32), recorder)
        assert recorder.calls == ["begin_step", ("attend", 0), ("attend", 1), ("attend", 2)]


def _config(**changes):
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=8, block_size=16)
    return jp.CacheConfig(**{**fields, **changes})


def test_choose_impl_is_an_argument():
    config = _config()
    assert attention.choose_impl("reference", config, backend="gpu") == "reference"
    assert attention.choose_impl("auto", config, backend="cpu") == "reference"
    with pytest.raises(ValueError, match="impl='kernel' cannot run here: the kernels need a GPU"):
        attention.choose_impl("kernel", config, backend="cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        attention.choose_impl("triton", config, backend="cpu")


def test_without_the_triton_lowering_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "this jax has no Pallas Triton lowering")
    monkeypatch.setattr(attention, "_warned", set())
    config = _config()
    with pytest.warns(RuntimeWarning, match="reference path: this jax has no Pallas Triton lowering"):
        assert attention.choose_impl("auto", config, backend="gpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.choose_impl("auto", config, backend="gpu") == "reference"  # said once
    with pytest.raises(ValueError, match="no Pallas Triton lowering"):
        attention.choose_impl("kernel", config, backend="gpu")


def test_with_the_lowering_auto_takes_the_kernels_on_a_gpu_for_shapes_they_take(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: None)
    assert attention.choose_impl("auto", _config(), backend="gpu") == "kernel"
    assert attention.choose_impl("auto", _config(head_dim=48), backend="gpu") == "reference"
    assert attention.choose_impl("auto", _config(), scale=0.5, backend="gpu") == "reference"
    with pytest.raises(ValueError, match="head dim 48"):
        attention.choose_impl("kernel", _config(head_dim=48), backend="gpu")


def test_paged_and_contiguous_steps_agree_on_every_impl_this_backend_runs():
    """impl threads from the model through the cache to paged attention; the reference is forced here."""
    from jaxpaged.models.config import preset
    from jaxpaged.models.generate import generate
    from jaxpaged.models.llama import MiniLLM

    model = MiniLLM(preset("tiny", vocab_size=64), rngs=nnx.Rngs(2))
    prompts = [[5, 9, 2, 7], [3, 1]]
    reference = generate(model, prompts, max_new_tokens=6, block_size=8, impl="reference")
    auto = generate(model, prompts, max_new_tokens=6, block_size=8, impl="auto", scan_layers=False)
    assert reference.tokens == auto.tokens
    with pytest.raises(ValueError, match="impl must be one of"):
        generate(model, prompts, max_new_tokens=2, impl="fast")
    np.testing.assert_equal(len(reference.tokens[0]), 6)

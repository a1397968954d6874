"""The embedded SmolLM2-135M-Instruct: real weights from the GGUF file, tokenizer and chat template.

The `smollm2` fixture (conftest.py) is `load_gguf()`, loaded once for the run."""

import os

import pytest

from jaxpaged.models.gguf_weights import default_gguf_path
from jaxpaged.models.generate import generate

MIXED_TEXT = "Héllo, wörld! naïve café — 東京 🚀\n\tTabs  and  spaces; code: x = f(3.14) ≠ 42 <|im_start|>"


def test_the_random_weight_preset_has_the_embedded_models_shape(embedded_gguf_parsed_once):
    """`smollm2-135m-random` (for GPU benchmarks, where the file does not go) is the file's architecture."""
    import dataclasses

    from jaxpaged.models.config import preset

    from_file, fixed = preset("smollm2-135m"), preset("smollm2-135m-random")
    assert dataclasses.replace(from_file, rms_norm_eps=fixed.rms_norm_eps) == fixed
    assert abs(from_file.rms_norm_eps - fixed.rms_norm_eps) < 1e-12  # the file stores it as float32


def test_capital_of_france_is_paris(smollm2):
    model, tokenizer = smollm2
    result = generate(model, [tokenizer.encode("The capital of France is")], max_new_tokens=3)
    assert tokenizer.decode(result.tokens[0]).startswith(" Paris")


def test_paged_and_contiguous_agree_on_real_weights(smollm2):
    model, tokenizer = smollm2
    prompts = [tokenizer.encode(p) for p in ("Once upon a time", "def fibonacci(n):", "The three primary colours are")]
    # no stop token: every step compared, and the paged run has the buckets (and so the compilations)
    # of test_torch_interop's comparison with transformers
    paged = generate(model, prompts, max_new_tokens=24, cache="paged", block_size=16, eos_token_ids=[])
    dense = generate(model, prompts, max_new_tokens=24, cache="contiguous", eos_token_ids=[])
    assert paged.tokens == dense.tokens


def test_tokenizer_round_trip_and_special_tokens(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer.encode(MIXED_TEXT)
    assert tokenizer.decode(ids, skip_special_tokens=False) == MIXED_TEXT
    assert ids[-1] == 1 and tokenizer.token(1) == "<|im_start|>", "special tokens stay whole"
    assert tokenizer.encode("2024") == [tokenizer.backend.token_to_id(d) for d in "2024"], "SmolLM splits digits"
    assert tokenizer.eos_token_ids == (2,) and tokenizer.token(2) == "<|im_end|>"


def test_tokenizer_and_chat_template_match_transformers(smollm2, embedded_gguf_parsed_once):
    from transformers import AutoTokenizer

    _, tokenizer = smollm2
    path = default_gguf_path()
    reference = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = "The quick brown fox, surely, doesn't jump over the lazy dog's kennel!\nNew line."  # no digits
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
    for messages in ([{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        ours = tokenizer.apply_chat_template(messages)
        assert ours == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.endswith("<|im_start|>assistant\n")

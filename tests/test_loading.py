"""Model files: a GGUF written as llama.cpp lays it out, checkpoint directories, clear errors on bad files, the weight cache."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_files import write_llama_gguf

from jaxpaged.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from jaxpaged.models.config import preset
from jaxpaged.models import gguf_weights
from jaxpaged.models.gguf_weights import load_gguf, open_gguf, read_gguf_config, user_cache_dir, weight_cache_entry
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import Tokenizer
from jaxpaged.models.weights import model_from_hf_tensors, to_hf_tensors

IDS = jnp.asarray([[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])


@pytest.fixture(scope="module")
def tiny():
    return MiniLLM(preset("tiny", vocab_size=260, tie_embeddings=False), rngs=nnx.Rngs(4))


def test_gguf_round_trip_undoes_the_rotary_permutation(tiny, tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, tiny)
    config = read_gguf_config(path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.tie_embeddings) == (
        2, 4, 2, 16, False)
    model, tokenizer = load_gguf(path)
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(tiny(IDS)), atol=1e-5, rtol=0)
    assert tokenizer.decode(tokenizer.encode("héllo <|endoftext|>"), skip_special_tokens=False) == "héllo <|endoftext|>"
    assert tokenizer.eos_token_ids == (256,)


def test_gguf_quantised_tensors_load_as_their_dequantised_values(tiny, tmp_path):
    import gguf

    kinds = {"ffn_up.weight": gguf.GGMLQuantizationType.Q8_0, "attn_q.weight": gguf.GGMLQuantizationType.Q4_1}
    path = str(tmp_path / "q.gguf")
    write_llama_gguf(path, tiny, quantize=kinds)
    model, _ = load_gguf(path)
    # Quantisation works on rows, so it commutes with the row permutation: the expected model holds
    # dequantise(quantise(w)) for exactly the quantised tensors.
    tensors = {k: np.asarray(v, np.float32) for k, v in to_hf_tensors(tiny).items()}
    for name in tensors:
        kind = kinds.get("ffn_up.weight" if "mlp.up_proj" in name else "attn_q.weight" if "q_proj" in name else "")
        if kind is not None:
            tensors[name] = gguf.quants.dequantize(gguf.quants.quantize(tensors[name], kind), kind)
    expected = model_from_hf_tensors(tiny.config, tensors)
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(expected(IDS)), atol=1e-5, rtol=0)
    assert not np.allclose(np.asarray(model(IDS)), np.asarray(tiny(IDS)), atol=1e-3), "the tensors were quantised"


def test_bad_gguf_files_give_clear_errors(tiny, tmp_path):
    import gguf

    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf(str(tmp_path / "absent.gguf"))
    good = str(tmp_path / "good.gguf")
    write_llama_gguf(good, tiny)
    truncated = str(tmp_path / "truncated.gguf")
    with open(good, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gguf(truncated)
    other = str(tmp_path / "gpt2.gguf")
    write_llama_gguf(other, tiny, architecture="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_gguf(other)
    exotic = str(tmp_path / "iq.gguf")
    write_llama_gguf(exotic, tiny, quantize={"ffn_up.weight": gguf.GGMLQuantizationType.IQ4_NL})
    with pytest.raises(ValueError, match="unsupported quantisation IQ4_NL"):
        load_gguf(exotic)


def test_checkpoint_directory_round_trip_and_errors(tiny, tmp_path):
    tokenizer = Tokenizer.byte_level()
    save_checkpoint(tiny, str(tmp_path / "ckpt"), tokenizer)
    model, loaded_tokenizer = load_model(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(tiny(IDS)))
    assert loaded_tokenizer.encode("hi!") == [104, 105, 33] and loaded_tokenizer.eos_token_ids == (256,)

    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(str(tmp_path))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                               "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_checkpoint(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path / "ckpt"))


def _bits_of(model) -> dict[str, bytes]:
    return {name: np.asarray(value).tobytes() for name, value in to_hf_tensors(model).items()}


@pytest.fixture
def quantised_gguf(tiny, tmp_path):
    import gguf

    path = str(tmp_path / "q.gguf")
    write_llama_gguf(path, tiny, quantize={"ffn_up.weight": gguf.GGMLQuantizationType.Q4_1})
    return path


@pytest.fixture
def dequantise_calls(monkeypatch):
    """Counts the GGUF files dequantised (the work the weight cache saves)."""
    calls = []
    original = gguf_weights._dequantise
    monkeypatch.setattr(gguf_weights, "_dequantise", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


def test_weight_cache_loads_the_same_bits_without_dequantising_again(quantised_gguf, tmp_path, dequantise_calls):
    cache = str(tmp_path / "cache")
    uncached, tokenizer = load_gguf(quantised_gguf)
    first, _ = load_gguf(quantised_gguf, cache_dir=cache)
    entry = weight_cache_entry(cache, quantised_gguf)
    assert os.path.isfile(os.path.join(entry, "model.safetensors")) and len(dequantise_calls) == 2
    files = open_gguf(quantised_gguf, cache_dir=cache)
    assert files.weights_path == os.path.join(entry, "model.safetensors")
    second = files.load()
    assert len(dequantise_calls) == 2, "the second load read the cache"
    assert _bits_of(second) == _bits_of(first) == _bits_of(uncached)
    assert files.config == read_gguf_config(quantised_gguf)
    assert files.tokenizer.encode("héllo <|endoftext|>") == tokenizer.encode("héllo <|endoftext|>")
    assert files.tokenizer.eos_token_ids == tokenizer.eos_token_ids
    assert load_gguf(quantised_gguf, "bfloat16", cache_dir=cache)[0].config.dtype == "bfloat16"
    assert len(dequantise_calls) == 2, "one entry serves every dtype"


def test_weight_cache_rebuilds_stale_and_corrupt_entries(quantised_gguf, tmp_path, dequantise_calls):
    cache = str(tmp_path / "cache")
    expected = _bits_of(load_gguf(quantised_gguf, cache_dir=cache)[0])
    entry = weight_cache_entry(cache, quantised_gguf)
    weights = os.path.join(entry, "model.safetensors")

    def damage_and_reload(damage):
        damage()
        calls = len(dequantise_calls)
        assert _bits_of(load_gguf(quantised_gguf, cache_dir=cache)[0]) == expected
        assert len(dequantise_calls) == calls + 1, "the entry was rebuilt"
        assert _bits_of(load_gguf(quantised_gguf, cache_dir=cache)[0]) == expected
        assert len(dequantise_calls) == calls + 1, "the rebuilt entry is used"

    def truncate_weights():
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)

    def garble_stamp():
        with open(os.path.join(entry, "source.json"), "w") as f:
            f.write("{not json")

    stat = os.stat(quantised_gguf)
    damage_and_reload(lambda: os.utime(quantised_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)))  # file changed
    damage_and_reload(truncate_weights)
    damage_and_reload(garble_stamp)
    damage_and_reload(lambda: os.remove(os.path.join(entry, "config.json")))
    assert sorted(os.listdir(os.path.dirname(entry))) == [os.path.basename(entry)], "no partial entries left behind"


def test_an_unwritable_weight_cache_warns_and_loads(quantised_gguf, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.warns(RuntimeWarning, match="could not cache the dequantised weights"):
        model, _ = load_gguf(quantised_gguf, cache_dir=str(not_a_dir))
    assert _bits_of(model) == _bits_of(load_gguf(quantised_gguf)[0])


def test_user_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXPAGED_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == str(tmp_path / "home" / ".cache" / "jaxpaged")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == str(tmp_path / "xdg" / "jaxpaged")
    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(tmp_path / "mine"))
    assert user_cache_dir() == str(tmp_path / "mine")


def test_saved_checkpoint_files_follow_the_umask(tiny, tmp_path):
    umask = os.umask(0o027)
    try:
        save_checkpoint(tiny, str(tmp_path / "ckpt"), Tokenizer.byte_level())
    finally:
        os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"], 0o640)

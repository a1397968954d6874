"""Hugging Face-style checkpoint directories (config.json, *.safetensors, tokenizer.json), and one loader for every model source."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import Tokenizer
from jaxpaged.models.weights import model_from_hf_tensors, to_hf_tensors

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def config_from_hf_dict(hf: dict, dtype: str | None = None) -> ModelConfig:
    """A ModelConfig from the fields of a Hugging Face Llama config.json."""
    archs = hf.get("architectures") or [hf.get("model_type")]
    if not any(a in SUPPORTED_ARCHITECTURES or a == "llama" for a in archs):
        raise ValueError(f"unsupported architecture {archs}; supported: {SUPPORTED_ARCHITECTURES}")
    scaling = hf.get("rope_scaling")
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
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        dtype=dtype or {"float16": "float16", "bfloat16": "bfloat16"}.get(hf.get("torch_dtype"), "float32"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=() if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,)),
    )


def load_checkpoint(path: str, dtype: str | None = None) -> tuple[MiniLLM, Tokenizer | None]:
    """Model (and tokenizer, if the directory has one) from a Hugging Face Llama checkpoint directory."""
    from safetensors.numpy import load_file

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: not a checkpoint directory")
    with open(config_file) as f:
        config = config_from_hf_dict(json.load(f), dtype)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except Exception as error:  # safetensors raises its own error types on a bad file
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    model = model_from_hf_tensors(config, tensors)
    tokenizer = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    if tokenizer is not None and not tokenizer.eos_token_ids and config.eos_token_ids:
        tokenizer.eos_token_ids = config.eos_token_ids
    return model, tokenizer


def save_checkpoint(model: MiniLLM, path: str, tokenizer: Tokenizer | None = None) -> None:
    """Writes config.json, model.safetensors (float32) and the tokenizer: loadable here and by transformers."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    tensors = {name: np.ascontiguousarray(np.asarray(value, np.float32)) for name, value in to_hf_tensors(model).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path)


def load_model(path: str | None = None, dtype: str = "float32") -> tuple[MiniLLM, Tokenizer | None]:
    """Model and tokenizer from a GGUF file, a checkpoint directory, or (path None) the embedded SmolLM2."""
    from jaxpaged.models.gguf_weights import load_gguf

    if path is None or (os.path.isfile(path) and path.endswith(".gguf")):
        return load_gguf(path, dtype)
    if os.path.isdir(path):
        return load_checkpoint(path, dtype)
    if os.path.isfile(path):
        raise ValueError(f"{path}: expected a .gguf file or a checkpoint directory")
    raise FileNotFoundError(f"no model at {path}")

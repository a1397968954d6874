"""MiniLLM parameters <-> tensors named as in a Hugging Face Llama checkpoint.

Hugging Face stores a linear layer's weight as [out, in]; flax.nnx stores its kernel as [in, out].
Everything else (embedding, norms) has the same shape on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.llama import MiniLLM


def _keys(path) -> list:
    """The dict keys and list indices of a pytree path, without the Variable's own attribute."""
    keys = []
    for entry in path:
        if hasattr(entry, "key"):
            keys.append(entry.key)
        elif hasattr(entry, "idx"):
            keys.append(entry.idx)
    return keys


def hf_name(path) -> tuple[str, bool]:
    """The Hugging Face tensor name of an nnx parameter path, and whether the tensor is transposed."""
    keys = [str(k) for k in _keys(path)]
    leaf = keys[-1]
    name = ".".join(keys[:-1] + ["weight"])
    return (name if keys[0] == "lm_head" else "model." + name), leaf == "kernel"


def to_hf_tensors(model: MiniLLM) -> dict[str, jax.Array]:
    """Every parameter under its Hugging Face name, in Hugging Face layout ([out, in] for linears)."""
    _, state = nnx.split(model)
    tensors = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
        name, transposed = hf_name(path)
        tensors[name] = value.T if transposed else value
    return tensors


def model_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> MiniLLM:
    """Builds a MiniLLM from Hugging Face-named tensors, cast to config.dtype.

    Raises ValueError naming every missing tensor or wrong shape. With tied embeddings a
    `lm_head.weight` in the checkpoint is ignored.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MiniLLM(config, rngs=nnx.Rngs(0))))
    dtype = jnp.dtype(config.dtype)
    problems = []

    def one(name, transposed, shape):
        if name not in tensors:
            problems.append(f"missing {name}")
            return np.zeros(shape, np.float32)
        value = np.asarray(tensors[name])
        value = value.T if transposed else value
        if value.shape != shape:
            problems.append(f"{name}: shape {value.shape[::-1] if transposed else value.shape}, expected "
                            f"{shape[::-1] if transposed else shape}")
            return np.zeros(shape, np.float32)
        return value

    def fill(path, spec):
        name, transposed = hf_name(path)
        return jnp.asarray(one(name, transposed, spec.shape), dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    if problems:
        raise ValueError("checkpoint does not match the architecture: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    return nnx.merge(graphdef, state)

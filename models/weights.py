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
from jax.sharding import Mesh, NamedSharding

from jaxpaged.parallel import tensor_parallel
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.parallel import lay_out_heads, param_spec


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


def model_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray], *,
                          mesh: Mesh | None = None) -> MiniLLM:
    """Builds a MiniLLM from Hugging Face-named tensors, cast to config.dtype.

    With a mesh (`jaxpaged.parallel.make_mesh`), the heads are laid out for its tensor axis
    (`jaxpaged.models.parallel.lay_out_heads`: the model may come back with more heads) and each
    tensor goes from the host straight into its shards on the mesh's devices
    (`jax.make_array_from_callback`, `jaxpaged.models.parallel.param_spec`): no device ever holds
    more of a weight than its shard.

    Raises ValueError naming every missing tensor or wrong shape. With tied embeddings a
    `lm_head.weight` in the checkpoint is ignored.
    """
    _, abstract = nnx.split(nnx.eval_shape(lambda: MiniLLM(config, rngs=nnx.Rngs(0))))
    values, problems = {}, []
    for path, spec in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name, transposed = hf_name(path)
        shape = spec.shape[::-1] if transposed else spec.shape  # Hugging Face's [out, in]
        if name not in tensors:
            problems.append(f"missing {name}")
        elif np.shape(tensors[name]) != shape:
            problems.append(f"{name}: shape {np.shape(tensors[name])}, expected {shape}")
        else:
            values[name] = np.asarray(tensors[name])
    if problems:
        raise ValueError("checkpoint does not match the architecture: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    if mesh is not None:
        config, values = lay_out_heads(config, values, tensor_parallel(mesh))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MiniLLM(config, rngs=nnx.Rngs(0))))
    dtype = jnp.dtype(config.dtype)

    def fill(path, _spec):
        name, transposed = hf_name(path)
        value = values[name].T if transposed else values[name]
        if mesh is None:
            return jnp.asarray(value, dtype)
        value = np.asarray(value, dtype)  # on the host; each device then takes its slice
        sharding = NamedSharding(mesh, param_spec(path))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))

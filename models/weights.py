"""MiniLLM parameters <-> tensors named as in a Hugging Face Llama checkpoint.

Hugging Face stores a linear layer's weight as [out, in]; flax.nnx stores its kernel as [in, out].
Everything else (embedding, norms) has the same shape on both sides.
"""

from __future__ import annotations

import math
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


# Our projections that hold several of Hugging Face's side by side (`jaxpaged.models.llama.Linear`),
# and the Hugging Face modules they hold, in order along the kernel's part axis.
SIDE_BY_SIDE = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _keys(path) -> list:
    """The dict keys and list indices of a pytree path, without the Variable's own attribute."""
    keys = []
    for entry in path:
        if hasattr(entry, "key"):
            keys.append(entry.key)
        elif hasattr(entry, "idx"):
            keys.append(entry.idx)
    return keys


def hf_tensors_of(path, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The Hugging Face tensors that make the nnx parameter at `path` (of `shape`): each name with its
    shape in Hugging Face's layout ([out, in] for a linear layer's weight). One tensor, except for
    a kernel that holds several projections side by side: qkv_proj [E, K, G + 2, D] is q_proj
    [K * G * D, E], k_proj and v_proj [K * D, E]; gate_up_proj [E, 2, F] is gate_proj and up_proj
    [F, E]."""
    keys = [str(k) for k in _keys(path)]
    prefix = "" if keys[0] == "lm_head" else "model."
    *modules, module, leaf = keys
    if leaf != "kernel":
        return [(prefix + ".".join(keys[:-1] + ["weight"]), tuple(shape))]
    width, *out = shape
    if module == "qkv_proj":
        kv_heads, parts, head_dim = out
        outs = (kv_heads * (parts - 2) * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    else:
        outs = (out[-1],) * out[0] if module in SIDE_BY_SIDE else (math.prod(out),)
    return [(prefix + ".".join([*modules, name, "weight"]), (size, width))
            for name, size in zip(SIDE_BY_SIDE.get(module, (module,)), outs)]


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor a MiniLLM of `config` is made from, with its shape."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: MiniLLM(config, rngs=nnx.Rngs(0))))
    return {name: shape for path, spec in jax.tree_util.tree_flatten_with_path(abstract)[0]
            for name, shape in hf_tensors_of(path, spec.shape)}


def _split_kernel(module: str, kernel) -> list:
    """A kernel [E, *O] as the [E, out] kernels of the projections it holds (`hf_tensors_of`)."""
    width = kernel.shape[0]
    if module == "qkv_proj":  # [E, K, G + 2, D]
        return [kernel[:, :, :-2].reshape(width, -1), kernel[:, :, -2].reshape(width, -1),
                kernel[:, :, -1].reshape(width, -1)]
    if module in SIDE_BY_SIDE:  # [E, 2, F]
        return [kernel[:, part] for part in range(kernel.shape[1])]
    return [kernel]


def _join_kernels(module: str, kernels: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """`_split_kernel`'s inverse: the [E, out] kernels as one kernel of `shape`."""
    if module == "qkv_proj":
        width, kv_heads, parts, head_dim = shape
        q, k, v = kernels
        heads = [q.reshape(width, kv_heads, parts - 2, head_dim), k.reshape(width, kv_heads, 1, head_dim),
                 v.reshape(width, kv_heads, 1, head_dim)]
        return np.concatenate(heads, axis=2)
    return np.stack(kernels, axis=1) if module in SIDE_BY_SIDE else kernels[0].reshape(shape)


def to_hf_tensors(model: MiniLLM) -> dict[str, jax.Array]:
    """Every parameter under its Hugging Face name, in Hugging Face layout ([out, in] for linears).
    Raises ValueError for a `scanned()` view (its layers are one stacked layer: convert the model)."""
    if not isinstance(model.layers, nnx.List):
        raise ValueError("this is a scanned() view of a model, its layers stacked [L, ...]: convert or save the "
                         "model it was made from")
    _, state = nnx.split(model)
    tensors = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
        module, leaf = [str(key) for key in _keys(path)[-2:]]
        parts = _split_kernel(module, value) if leaf == "kernel" else [value]
        for (name, _), part in zip(hf_tensors_of(path, value.shape), parts):
            tensors[name] = part.T if leaf == "kernel" else part
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
    values, problems = {}, []
    for name, shape in hf_tensor_shapes(config).items():
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
        if config.intermediate_size % tensor_parallel(mesh):
            raise ValueError(f"the MLP's width, intermediate_size ({config.intermediate_size}), must be a multiple of "
                             f"the mesh's tensor axis ({tensor_parallel(mesh)}): gate, up and down are split over it")
        config, values = lay_out_heads(config, values, tensor_parallel(mesh))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MiniLLM(config, rngs=nnx.Rngs(0))))
    dtype = jnp.dtype(config.dtype)

    def fill(path, spec):
        module, leaf = [str(key) for key in _keys(path)[-2:]]
        names = [name for name, _ in hf_tensors_of(path, spec.shape)]
        if leaf == "kernel":
            value = _join_kernels(module, [values[name].T for name in names], spec.shape)
        else:
            value = values[names[0]]
        if mesh is None:
            return jnp.asarray(value, dtype)
        value = np.asarray(value, dtype)  # on the host; each device then takes its slice
        sharding = NamedSharding(mesh, param_spec(path))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))

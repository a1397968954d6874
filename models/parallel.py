"""The MiniLLM on a device mesh: its heads laid out for the tensor axis, each weight in its shards.

Megatron-style: the q, k, v, gate and up projections are split by columns (each device computes
its own heads and its share of the MLP's width F), the o and down projections by rows (each device
multiplies its part; the partial sums are added by one all-reduce after each, two per layer). The
shardings are set on the weights only (`param_spec`); XLA's SPMD partitioner derives the
activations' and inserts the all-reduces, so the model's code is the same on one device and on
many. The embedding, the norms and a separate output head are replicated (V x E is read once a
step and its logits are needed whole by the sampler on every device).

Axis letters: E model width, F MLP width, V vocab, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxpaged.parallel import TENSOR_AXIS, head_layout
from jaxpaged.models.config import ModelConfig

# Column-parallel kernels, and the axis split: q, k and v [E, K, G + 2, D] by kv heads (each device its
# kv heads with their query heads), gate and up [E, 2, F] by F.
COLUMN_PARALLEL = {"qkv_proj": PartitionSpec(None, TENSOR_AXIS, None, None),
                   "gate_up_proj": PartitionSpec(None, None, TENSOR_AXIS)}
ROW_PARALLEL = ("o_proj", "down_proj")  # kernel [in, E]: in split; the partial sums are all-reduced


def param_spec(path) -> PartitionSpec:
    """The PartitionSpec of a parameter, given its path in the model's state (a `jax.tree_util` key
    path, e.g. layers / 0 / mlp / gate_up_proj / kernel)."""
    module, leaf = [str(entry.key) for entry in path if hasattr(entry, "key")][-2:]
    if leaf == "kernel" and module in COLUMN_PARALLEL:
        return COLUMN_PARALLEL[module]
    if leaf == "kernel" and module in ROW_PARALLEL:
        return PartitionSpec(TENSOR_AXIS, None)
    return PartitionSpec()


def lay_out_heads(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                  tensor_parallel: int) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The model's Hugging Face-named tensors with their heads laid out for `tensor_parallel`
    devices (`jaxpaged.parallel.head_layout`), and the config of H' query and K' kv heads they
    make: the same function, each device's share of the heads whole. A zero head has zero rows in
    q_proj (or k_proj and v_proj) and, for a query head, zero columns in o_proj. Where the layout is
    the model's own, config and tensors come back as they are."""
    layout = head_layout(config.num_heads, config.num_kv_heads, tensor_parallel)
    if layout.identity:
        return config, dict(tensors)
    head_dim = config.head_dim

    def heads_along(weight: np.ndarray, axis: int, slots: tuple[int, ...]) -> np.ndarray:
        """weight's head axis (heads x D along `axis`) as the slots' heads, zeros for -1."""
        moved = np.moveaxis(weight, axis, 0)
        per_head = moved.reshape(-1, head_dim, *moved.shape[1:])  # [heads, D, ...]
        index = np.asarray(slots)
        out = np.zeros((len(slots), *per_head.shape[1:]), weight.dtype)
        out[index >= 0] = per_head[index[index >= 0]]
        return np.moveaxis(out.reshape(-1, *moved.shape[1:]), 0, axis)

    laid_out = {}
    for name, weight in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):  # [H * D, E]
            weight = heads_along(weight, 0, layout.heads)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):  # [K * D, E]
            weight = heads_along(weight, 0, layout.kv_heads)
        elif name.endswith("self_attn.o_proj.weight"):  # [E, H * D]
            weight = heads_along(weight, 1, layout.heads)
        laid_out[name] = weight
    return config.replace(num_heads=layout.padded_heads, num_kv_heads=layout.padded_kv_heads), laid_out


def shard_model(model, mesh: Mesh):
    """The model on a mesh (`jaxpaged.parallel.make_mesh`): its heads laid out for the tensor axis
    (`lay_out_heads`), each weight placed in its shards (`param_spec`), replicated over "data".
    The weights pass through the host once. To load a checkpoint straight onto a mesh, give the
    loader `mesh=` instead (`jaxpaged.models.weights.model_from_hf_tensors`).

    The laid-out model may have more heads than the one given (where the tensor axis does not
    divide its kv heads): use it, do not save it as the original."""
    from jaxpaged.models.weights import model_from_hf_tensors, to_hf_tensors

    tensors = {name: np.asarray(value) for name, value in to_hf_tensors(model).items()}
    return model_from_hf_tensors(model.config, tensors, mesh=mesh)

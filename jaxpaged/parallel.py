"""Tensor and data parallelism with JAX's own sharding: the device mesh, how attention heads lie over
its tensor axis, where each piece of a cache lives, and attention run per device under `shard_map`.

The mesh has two axes. On "tensor", T devices split every layer: the block pools [L, K, N, P, D]
are sharded over K (a device holds K / T kv heads of every block), while the block table, the
lengths, the free list and the reference counts are replicated (a few KiB; every device changes
them identically, so no device asks another where a block is). Attention, the reference path or
the GPU kernels, runs per device under `shard_map` on its own kv heads and their query heads, so
nothing of a pool ever crosses devices. The model's projections are split by their weights'
shardings (`jaxpaged.models.parallel`), and XLA's SPMD partitioner inserts the all-reduces. On
"data", R replicas each hold their own cache (every leaf stacked on a leading [R] axis, sharded
over "data") and take their share of the batch: `jax.vmap` over the replicas with
`spmd_axis_name="data"` (`per_replica`).

Where K or H is not a multiple of T, the heads are laid out again, kv heads copied or padded with
zero heads (`head_layout`): a model with more heads that computes the same function.

Axis letters: R replicas, T tensor-parallel devices, B batch, H query heads, K kv heads,
G = H / K query heads per kv head, L layers, N blocks, P block size, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpaged import checks

DATA_AXIS = "data"  # replicas, each with its own cache and its share of the batch
TENSOR_AXIS = "tensor"  # devices that split every layer's heads and MLP


def make_mesh(tensor_parallel: int = 1, data_parallel: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of data_parallel x tensor_parallel devices, axes ("data", "tensor").

    A tensor-parallel group is `tensor_parallel` consecutive devices of the list, so under
    `jax.distributed` (whose `jax.devices()` lists every process's devices, one process after the
    other) a group stays on one host when it divides the devices of a host.

    Args:
      tensor_parallel: T, devices that split every layer.
      data_parallel: R, replicas that split the batch.
      devices: default `jax.devices()`; the mesh takes the first R x T of them.

    Raises:
      ValueError naming the argument: a degree below 1, or R x T not dividing the devices given.
    """
    devices = jax.devices() if devices is None else list(devices)
    for name, value in (("tensor_parallel", tensor_parallel), ("data_parallel", data_parallel)):
        if not checks.is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    needed = tensor_parallel * data_parallel
    if len(devices) % needed:
        raise ValueError(f"tensor_parallel ({tensor_parallel}) x data_parallel ({data_parallel}) = {needed} devices "
                         f"must divide the {len(devices)} device(s) here")
    return Mesh(np.asarray(devices[:needed], dtype=object).reshape(data_parallel, tensor_parallel),
                (DATA_AXIS, TENSOR_AXIS))


def tensor_parallel(mesh: Mesh | None) -> int:
    """T: the mesh's devices on the tensor axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[TENSOR_AXIS]


def device_config(config, mesh: Mesh | None):
    """The `CacheConfig` of one device's shard of the pools: its kv heads (all of them without a
    mesh). What the kernels see under `shard_map`, so what decides whether they take the pools."""
    if mesh is None:
        return config
    return dataclasses.replace(config, num_kv_heads=config.num_kv_heads // tensor_parallel(mesh))


def replicas(mesh: Mesh | None) -> int:
    """R: the mesh's replicas on the data axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


# ----------------------------------------------------------------------------- heads over devices


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Which of a model's heads lies in each head slot of a layout whose K' kv heads divide evenly
    over T devices, each device holding K' / T consecutive kv slots and their query slots.

    Query slot h belongs to kv slot h // G' (G' = H' / K'), as grouped-query attention reads them,
    so the laid-out model is an ordinary model with H' query and K' kv heads. A slot of -1 is a
    zero head: zero projection weights in, and for a query slot zero rows of the output projection
    out, so it changes nothing.
    """

    num_heads: int  # H of the model
    num_kv_heads: int  # K of the model
    tensor_parallel: int  # T
    kv_heads: tuple[int, ...]  # [K'] the model's kv head in each kv slot, -1 for a zero head
    heads: tuple[int, ...]  # [H'] the model's query head in each query slot, -1 for a zero head

    @property
    def padded_kv_heads(self) -> int:
        """K': kv slots, a multiple of T."""
        return len(self.kv_heads)

    @property
    def padded_heads(self) -> int:
        """H': query slots, G' per kv slot."""
        return len(self.heads)

    @property
    def identity(self) -> bool:
        """Whether the layout is the model's own (no head copied or added)."""
        return self.kv_heads == tuple(range(self.num_kv_heads)) and self.heads == tuple(range(self.num_heads))


def head_layout(num_heads: int, num_kv_heads: int, tensor_parallel: int) -> HeadLayout:
    """How H query and K kv heads lie over T tensor-parallel devices.

    The rule: each kv head is copied C = max(1, T // K) times (copies side by side); the K x C
    copies are padded with zero kv heads to a multiple of T, K' slots; each copy takes its share of
    its head's G query heads, G' = ceil(G / C) of them, padded with zero query heads. So:
    - K a multiple of T: the model's own layout (K / T kv heads and their query heads a device);
    - T a multiple of K, and G of T / K: every kv head copied T / K times, one a device, the query
      heads as they were (vLLM's rule);
    - otherwise (SmolLM2's 3 kv heads of 3 query heads each over T = 2, 4 or 8): the padding above;
      a device holds ceil(K x C / T) kv heads, the fewest whole heads it can.

    Raises:
      ValueError naming the argument: a count below 1, or H not a multiple of K.
    """
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("tensor_parallel", tensor_parallel)):
        if not checks.is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    copies = max(1, tensor_parallel // num_kv_heads)
    slots = -(-num_kv_heads * copies // tensor_parallel) * tensor_parallel  # K'
    per_slot = -(-group // copies)  # G'
    kv_heads = [head for head in range(num_kv_heads) for _ in range(copies)]
    kv_heads += [-1] * (slots - len(kv_heads))
    heads = []
    for slot, kv_head in enumerate(kv_heads):
        for i in range(per_slot):
            g = (slot % copies) * per_slot + i  # this copy's share of its kv head's G query heads
            heads.append(kv_head * group + g if kv_head >= 0 and g < group else -1)
    return HeadLayout(num_heads=num_heads, num_kv_heads=num_kv_heads, tensor_parallel=tensor_parallel,
                      kv_heads=tuple(kv_heads), heads=tuple(heads))


def check_kv_heads(num_kv_heads: int, mesh: Mesh, what: str) -> None:
    """Raises ValueError unless the mesh's tensor axis divides num_kv_heads (`what` names them)."""
    if num_kv_heads % tensor_parallel(mesh):
        raise ValueError(f"{what} ({num_kv_heads}) must be a multiple of the mesh's tensor axis "
                         f"({tensor_parallel(mesh)}): lay the model's heads out for it first (head_layout)")


def check_placed(model: Any, mesh: Mesh) -> None:
    """Raises ValueError unless a Flax NNX model's weights lie on `mesh` and its kv heads
    (`model.config.num_kv_heads`) are a multiple of the mesh's tensor axis."""
    from flax import nnx

    check_kv_heads(model.config.num_kv_heads, mesh, "the model's kv heads")
    for weight in jax.tree.leaves(nnx.state(model, nnx.Param)):
        if not isinstance(weight.sharding, NamedSharding) or weight.sharding.mesh != mesh:
            raise ValueError("mesh: the model's weights are not on this mesh; place them with "
                             "jaxpaged.models.parallel.shard_model(model, mesh), or load the model with mesh=")


# ----------------------------------------------------------------------------- caches over devices


def cache_shardings(cache: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
    """NamedShardings for every leaf of a cache: the kv-head axis of its K and V on "tensor" (a
    `PagedKVState`'s pools and scales [L, K, ...], a `ContiguousKVState`'s [L, B, K, S, D]), every
    other leaf replicated. stacked: the leaves carry a leading replica axis [R, ...], on "data"."""
    from jaxpaged.contiguous import ContiguousKVState

    lead = (DATA_AXIS,) if stacked else ()
    if isinstance(cache, ContiguousKVState):  # [L, B, K, S, D]
        heads = NamedSharding(mesh, PartitionSpec(*lead, None, None, TENSOR_AXIS))
        return cache.replace(k=heads, v=heads, seq_lens=NamedSharding(mesh, PartitionSpec(*lead)))

    def sharding(path, _leaf):
        in_pools = getattr(path[0], "name", None) == "pools"  # KVPools: k, v [L, K, N, P, D], scales [L, K, N, P]
        return NamedSharding(mesh, PartitionSpec(*lead, None, TENSOR_AXIS) if in_pools else PartitionSpec(*lead))

    return jax.tree_util.tree_map_with_path(sharding, cache)


def place_cache(init: Callable[..., Any], *args: Any, mesh: Mesh, stacked: bool = False) -> Any:
    """The cache init(*args) builds, built on the mesh's devices in its shardings (`cache_shardings`),
    so no device ever holds a whole pool; a `PagedKVState` gets the mesh (its attention then runs per
    device). stacked: R independent caches (R the mesh's replicas) on a leading axis over "data".
    init and args key the compilation (hashable: a config, sizes, a dtype name)."""
    from jaxpaged.state import PagedKVState

    cache = _built(init, args, mesh, stacked)
    return cache.replace(mesh=mesh) if isinstance(cache, PagedKVState) else cache


@functools.partial(jax.jit, static_argnames=("init", "args", "mesh", "stacked"))
def _built(init, args, mesh, stacked):
    def build(_=None):
        return init(*args)

    cache = jax.vmap(build)(jnp.arange(replicas(mesh))) if stacked else build()
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh, stacked=stacked))


def per_replica(step: Callable, mesh: Mesh | None) -> Callable:
    """step(cache, *rows) run by each data-parallel replica on its own cache and rows: the caches
    stacked [R, ...], each row argument [R, B / R, ...]. With one replica, step itself."""
    if replicas(mesh) == 1:
        return step
    return jax.vmap(step, spmd_axis_name=DATA_AXIS)


def attend_per_device(state, layer, q: jax.Array, k: jax.Array, v: jax.Array, step):
    """`PagedKVState.attend` on a state sharded over kv heads (`state.mesh`): each device scatters
    its kv heads of k, v [B, T, K, D] into its shard of the pools and attends its query heads of
    q [B, T, H, D] (reference path or kernels, `step.impl`), under `shard_map`. The block table and
    the step's slots are replicated; no pool, nor any part of one, moves between devices.

    Returns:
      (out [B, T, H, D], sharded over H as q is; the state with its new pools).
    """
    from jaxpaged.attention import paged_attention
    from jaxpaged.ops import write_slots
    from jaxpaged.state import PagedKVState

    mesh, config = state.mesh, state.config
    check_kv_heads(config.num_kv_heads, mesh, "CacheConfig.num_kv_heads")
    local_config = device_config(config, mesh)

    def local(layer, pools, table, allocator, q, k, v, slots, seq_idx, positions):
        here = PagedKVState(pools=pools, table=table, allocator=allocator, config=local_config)
        here = write_slots(here, layer, slots, k, v)
        return paged_attention(q, here, layer, seq_idx, positions, max_len=step.max_len, impl=step.impl), here.pools

    heads, pools, replicated = PartitionSpec(None, None, TENSOR_AXIS), PartitionSpec(None, TENSOR_AXIS), PartitionSpec()
    # jax.shard_map, with check_vma, is public in every jax this project takes (0.10 on; the older
    # jax.experimental.shard_map is deprecated there). check_vma is off because a Pallas call under
    # shard_map does not say how its outputs vary over the mesh's axes, which the check asks of it.
    out, new_pools = jax.shard_map(
        local, mesh=mesh,
        in_specs=(replicated, pools, replicated, replicated, heads, heads, heads, replicated, replicated, replicated),
        out_specs=(heads, pools), check_vma=False,
    )(jnp.asarray(layer, jnp.int32), state.pools, state.table, state.allocator, q, k, v, step.slots, step.seq_idx,
      step.positions)
    return out, state.replace(pools=new_pools)

"""Attention over cached keys and values: one entry point for the paged cache, one for contiguous K/V.

`paged_attention` is what the paged cache calls: GPU kernels that read the pools in place, or the
reference path (gather the blocks, then attend), chosen by an explicit `impl` argument
(`choose_impl`); nothing here reads the environment.

Axis letters: B sequences, T query tokens, S key positions, H query heads, K kv heads,
G = H / K query heads per kv head, D head dim.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jaxpaged import ops
from jaxpaged.protocol import check_impl
from jaxpaged.quant import rotate
from jaxpaged.state import PagedKVState


def _dot_operand(x: jax.Array) -> jax.Array:
    """XLA:CPU has no half-precision dot with a float32 result, so on the CPU operands are upcast."""
    if jax.default_backend() == "cpu" and x.dtype in (jnp.bfloat16, jnp.float16):
        return x.astype(jnp.float32)
    return x


@jax.jit
def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_lens: jax.Array,
           scale: float | None = None) -> jax.Array:
    """Causal grouped-query attention of T queries per sequence over S key positions.

    Query t of sequence b sits at position q_positions[b, t]; it sees keys at positions
    s <= q_positions[b, t] with s < kv_lens[b]. A query that sees no key returns a finite
    average instead of NaN (it is padding). Scores and softmax are float32.

    Args:
      q: [B, T, H, D].
      k, v: [B, S, K, D], with H a multiple of K.
      q_positions: [B, T] int32.
      kv_lens: [B] int32.
      scale: defaults to 1 / sqrt(D).

    Returns:
      [B, T, H, D] in q's dtype.
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    scale = head_dim**-0.5 if scale is None else scale
    q = q.reshape(batch, num_q, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", _dot_operand(q), _dot_operand(k), preferred_element_type=jnp.float32)
    scores = scores * scale
    key_pos = jnp.arange(k.shape[1], dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    visible = (key_pos <= q_positions[:, :, None]) & (key_pos < kv_lens[:, None, None])  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", _dot_operand(probs), _dot_operand(v), preferred_element_type=jnp.float32)
    return out.reshape(batch, num_q, num_heads, head_dim).astype(q.dtype)


def choose_impl(impl: str, config, *, scale=None, backend: str | None = None) -> str:
    """Which path paged attention takes: "kernel" or "reference".

    impl="reference" is the gather-then-attend path everywhere. impl="kernel" is the GPU kernels,
    and a ValueError where they cannot run (not a GPU, no Pallas Triton lowering in this jax, a
    shape they do not take, a custom scale). impl="auto" takes the kernels where they can run and
    the reference elsewhere; on a GPU whose jax lacks the lowering it says so once, as a warning.
    8-bit pools take either path (the kernels dequantise as they load).

    Args:
      impl: "auto", "kernel" or "reference".
      config: the cache's `CacheConfig`.
      scale: the attention scale asked for (the kernels take only the default, None).
      backend: default `jax.default_backend()`.
    """
    from jaxpaged import kernels

    check_impl(impl)
    if impl == "reference":
        return "reference"
    backend = jax.default_backend() if backend is None else backend
    pool_size = config.num_layers * config.num_blocks * config.block_size * config.num_kv_heads * config.head_dim
    if backend != "gpu":
        why_not = f"the kernels need a GPU, this backend is {backend!r}"
    elif (why_not := kernels.unavailable_reason()) is not None:
        if impl == "auto":
            _warn_once(f"paged attention runs the reference path: {why_not}")
    elif scale is not None:
        why_not = "the kernels take only the default scale 1 / sqrt(D)"
    elif not kernels.supported(config.head_dim, config.block_size, pool_size, config.itemsize):
        why_not = (f"the kernels do not take head dim {config.head_dim}, block size {config.block_size} "
                   f"or a pool of {pool_size} elements per K or V")
    if why_not is None:
        return "kernel"
    if impl == "kernel":
        raise ValueError(f"impl='kernel' cannot run here: {why_not}")
    return "reference"


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def paged_attention(q: jax.Array, state: PagedKVState, layer, seq_idx: jax.Array, q_positions: jax.Array,
                    *, max_len: int | None = None, scale: float | None = None, impl: str = "auto") -> jax.Array:
    """Causal attention of q over one layer of the paged cache.

    With the kernels (`choose_impl`), they read the pools in place through the block table: a
    flash-decoding kernel for T = 1 and a causal one for T > 1 (prefill, or a chunk on a cached
    prefix). The reference gathers the blocks and attends.

    Args:
      q: [B, T, H, D], the queries of tokens whose K and V are already appended.
      state: the paged cache.
      layer: [] int.
      seq_idx: [B] int32 block-table rows (index B = padding row).
      q_positions: [B, T] int32 positions of the queries.
      max_len: static bound on the positions read; default the block-table capacity M * P.
      scale: defaults to 1 / sqrt(D).
      impl: "auto", "kernel" or "reference" (`choose_impl`).

    Returns:
      [B, T, H, D] in q's dtype.
    """
    c = state.config
    if choose_impl(impl, c, scale=scale) == "kernel":
        from jaxpaged import kernels

        rows = state.table.block_ids.at[seq_idx].get(mode="fill", fill_value=c.num_blocks)  # [B, M]
        seq_lens = state.table.seq_lens.at[layer, seq_idx].get(mode="fill", fill_value=0)
        pools, scales = (state.pools.k, state.pools.v), dict(k_scale=state.pools.k_scale, v_scale=state.pools.v_scale)
        if c.quantized:  # 8-bit pools hold K rotated: q turns with it, q . k unchanged (jaxpaged.quant)
            q = rotate(q).astype(q.dtype)
        if q.shape[1] > 1:
            return kernels.paged_prefill_attention(q, *pools, layer, rows, seq_lens, q_positions, **scales)
        visible = jnp.clip(q_positions[:, 0] + 1, 0, seq_lens)  # the query sees itself and what precedes it
        return kernels.paged_decode_attention(q[:, 0], *pools, layer, rows, visible, **scales)[:, None]
    max_len = c.max_seq_len if max_len is None else max_len
    k, v, seq_lens = ops.gather_kv(state, layer, seq_idx, max_len=max_len)
    return attend(q, k, v, q_positions, seq_lens, scale)

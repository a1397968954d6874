"""MiniLLM: a Llama-family decoder in flax.nnx that takes a KV cache in and returns it.

Architecture: token embedding, L blocks of (RMSNorm, grouped-query attention with rotary position
embeddings, RMSNorm, SwiGLU MLP), a final RMSNorm and a tied or separate output projection.

Three ways to call it:
- `model(input_ids)`: one causal pass over the whole sequence, no cache; returns logits.
- `model(input_ids, kv_cache=cache)` with a stateful `KVCache` or `PagedKVCacheAdapter` (the seed's
  one-liner): the facade is updated in place; returns logits.
- `model.step(input_ids, cache, ...)` with a pure `PagedKVState` (ragged batch, block-table rows) or
  `ContiguousKVState`: returns (logits, new cache, ok). This is the path jitted generation uses.

Axis letters: B batch, T tokens, S cached positions, V vocab, E width, F MLP width,
H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.attention import attend, paged_attention
from jaxpaged.cache import KVCache, PagedKVCacheAdapter
from jaxpaged.config import bucket
from jaxpaged.contiguous import ContiguousKVState, contiguous_append, contiguous_read
from jaxpaged.ops import allocate_slots, write_slots
from jaxpaged.state import PagedKVState
from jaxpaged.models.config import ModelConfig


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, normalised in float32 and scaled in the model dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.broadcast_to(self.weight[...], x.shape) * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embeddings in the rotate-half layout. x: [B, T, N, D]; positions: [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Linear(nnx.Linear):
    """nnx.Linear (x @ kernel, x: [..., in]) that, on a GPU, multiplies a single row ([1, 1, E]:
    batch-1 decode) as two, the second zeros (`two_rows`; default: on a GPU backend).

    XLA's GPU compiler rewrites a vector-matrix product whose operands hold fewer than 10M elements
    (its dot strength reduction: llama-1b's q, k, v and o projections, every projection of
    SmolLM2-135M) into a multiply fusion that writes the weight-sized product and a reduction
    that reads it back; with two rows it stays one GEMM fusion. On an H100 that took batch-1
    decode from 515 to 674 tokens/s for llama-1b and from 618 to 747 for SmolLM2's shape
    (bfloat16, random weights; BENCHMARKS.md). On the CPU the two-row product is the slower one
    (2.3x a 2048 x 2048 float32 matrix-vector product), so it stays one row there.
    """

    def __init__(self, *args, two_rows: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.two_rows = jax.default_backend() == "gpu" if two_rows is None else two_rows

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.two_rows or math.prod(x.shape[:-1]) != 1:
            return super().__call__(x)
        rows = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))  # [2, in]
        return super().__call__(rows)[:1].reshape(*x.shape[:-1], -1)


def _linear(in_features: int, out_features: int, config: ModelConfig, rngs: nnx.Rngs) -> Linear:
    dtype = jnp.dtype(config.dtype)
    return Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class CacheStep:
    """What one call tells every layer about the cache: rows, valid tokens, read bound, paged slots."""

    def __init__(self, seq_idx, num_tokens, max_len, slots=None):
        self.seq_idx, self.num_tokens, self.max_len, self.slots = seq_idx, num_tokens, max_len, slots


def _attend_with_cache(cache, layer: int, q, k, v, positions, step: CacheStep):
    """Writes this call's k, v [B, T, K, D] into the cache and attends q [B, T, H, D] over it.

    Returns (out [B, T, H, D], cache, ok).
    """
    if cache is None:
        return attend(q, k, v, positions, step.num_tokens), None, jnp.asarray(True)
    if isinstance(cache, PagedKVState):  # blocks were taken and lengths advanced once, before the layers
        cache = write_slots(cache, layer, step.slots, k, v)
        return paged_attention(q, cache, layer, step.seq_idx, positions, max_len=step.max_len), cache, jnp.asarray(True)
    if isinstance(cache, ContiguousKVState):
        cache, ok = contiguous_append(cache, layer, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), step.num_tokens)
        k_all, v_all, seq_lens = contiguous_read(cache, layer)  # [B, K, S, D]
        return attend(q, jnp.swapaxes(k_all, 1, 2), jnp.swapaxes(v_all, 1, 2), positions, seq_lens), cache, ok
    if isinstance(cache, (KVCache, PagedKVCacheAdapter)):  # stateful facades raise instead of returning ok
        k_all, v_all = cache.update(layer, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), step.num_tokens)
        seq_lens = jnp.asarray(cache.seq_lens(layer))
        # Pad S to a power of two (masked anyway): attention compiles per bucket, not per length.
        pad = [(0, 0), (0, 0), (0, bucket(k_all.shape[2]) - k_all.shape[2]), (0, 0)]
        k_all, v_all = (jnp.swapaxes(jnp.pad(x, pad), 1, 2) for x in (k_all, v_all))
        return attend(q, k_all, v_all, positions, seq_lens), cache, jnp.asarray(True)
    raise TypeError(f"unsupported kv_cache type {type(cache).__name__}")


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, c, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c, rngs)
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, c, rngs)

    def __call__(self, x, positions, cache, layer: int, step: CacheStep):
        c = self.config
        batch, num_tokens, _ = x.shape
        q = self.q_proj(x).reshape(batch, num_tokens, c.num_heads, c.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).reshape(batch, num_tokens, c.num_kv_heads, c.head_dim)  # [B, T, K, D]
        v = self.v_proj(x).reshape(batch, num_tokens, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, positions, c.rope_theta), apply_rope(k, positions, c.rope_theta)
        out, cache, ok = _attend_with_cache(cache, layer, q, k, v, positions, step)
        return self.o_proj(out.reshape(batch, num_tokens, c.num_heads * c.head_dim)), cache, ok


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, config, rngs)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, config, rngs)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, config, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, cache, layer: int, step: CacheStep):
        attn_out, cache, ok = self.self_attn(self.input_layernorm(x), positions, cache, layer, step)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), cache, ok


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """L decoder layers as one DecoderLayer whose parameters carry a leading [L] axis (for lax.scan)."""
    layers = [nnx.split(DecoderLayer(config, rngs)) for _ in range(config.num_layers)]
    stacked = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *[state for _, state in layers])
    return nnx.merge(layers[0][0], stacked)


class MiniLLM(nnx.Module):
    """The Llama-family decoder. Build with `MiniLLM(config, rngs=nnx.Rngs(seed))`; load weights with jaxpaged.models.weights."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        scan = jax.default_backend() == "cpu" if config.scan_layers is None else config.scan_layers
        self.layers = _stacked_layers(config, rngs) if scan else nnx.List([DecoderLayer(config, rngs)
                                                                             for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_embeddings else _linear(config.hidden_size, config.vocab_size, config, rngs)

    def _logits(self, x):
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

    def _run(self, input_ids, cache, positions, step: CacheStep, logit_index):
        x = self.embed_tokens(input_ids)  # [B, T, E]
        all_ok = jnp.asarray(True)
        if isinstance(self.layers, nnx.List):  # layers kept apart: an unrolled loop, no weight slicing
            for layer, block in enumerate(self.layers):
                x, cache, ok = block(x, positions, cache, layer, step)
                all_ok &= ok
            return self._head(x, cache, all_ok, logit_index)
        layer_def, layer_params = nnx.split(self.layers)  # every leaf [L, ...]
        if isinstance(cache, (KVCache, PagedKVCacheAdapter)):  # stateful facades: a Python loop, eager
            for layer in range(self.config.num_layers):
                block = nnx.merge(layer_def, jax.tree.map(lambda p: p[layer], layer_params))
                x, cache, _ = block(x, positions, cache, layer, step)
        else:  # one traced layer body, scanned: compile time does not grow with L

            def body(carry, per_layer):
                x, cache, all_ok = carry
                params, layer = per_layer
                x, cache, ok = nnx.merge(layer_def, params)(x, positions, cache, layer, step)
                return (x, cache, all_ok & ok), None

            layers = (layer_params, jnp.arange(self.config.num_layers, dtype=jnp.int32))
            (x, cache, all_ok), _ = jax.lax.scan(body, (x, cache, all_ok), layers)
        return self._head(x, cache, all_ok, logit_index)

    def _head(self, x, cache, all_ok, logit_index):
        x = self.norm(x)
        if logit_index is not None:  # only the rows we sample from: [B, E]
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]
        return self._logits(x), cache, all_ok

    def __call__(self, input_ids: jax.Array, kv_cache: KVCache | PagedKVCacheAdapter | None = None,
                 num_tokens: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of input_ids [B, T].

        Without a cache, one causal pass. With a `KVCache` or `PagedKVCacheAdapter`, the tokens
        follow what the cache holds, and the cache is updated in place (the seed's one-liner).
        num_tokens: optional [B] valid tokens per row (right padding).
        """
        batch, length = input_ids.shape
        num_tokens = jnp.full((batch,), length, jnp.int32) if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
        starts = jnp.zeros((batch,), jnp.int32) if kv_cache is None else jnp.asarray(kv_cache.seq_lens(0), jnp.int32)
        positions = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        logits, _, _ = self._run(input_ids, kv_cache, positions, CacheStep(None, num_tokens, None), None)
        return logits

    def step(self, input_ids: jax.Array, cache: PagedKVState | ContiguousKVState, *, seq_idx: jax.Array | None = None,
             num_tokens: jax.Array | None = None, max_len: int | None = None, logit_index: jax.Array | None = None):
        """One pure step over a cache pytree: append the tokens' K/V in every layer and attend.

        Args:
          input_ids: [B, T] int32; row b continues the sequence in block-table row seq_idx[b].
          cache: a `PagedKVState` or `ContiguousKVState`.
          seq_idx: [B] int32 block-table rows (paged only; padding rows = max_seqs).
          num_tokens: [B] int32 valid tokens per row (right padding); default T.
          max_len: static bound on positions read from the paged cache.
          logit_index: [B] int32; if given, logits only at that token of each row: [B, V].

        Returns:
          (logits [B, T, V] or [B, V] float32, cache, ok). ok is False when the cache had no room for
          the tokens; the cache is then unchanged and the logits are not to be used.
        """
        batch, length = input_ids.shape
        num_tokens = jnp.full((batch,), length, jnp.int32) if num_tokens is None else num_tokens
        step = CacheStep(seq_idx, num_tokens, max_len)
        if isinstance(cache, PagedKVState):
            if seq_idx is None:
                raise ValueError("a PagedKVState needs seq_idx, the block-table row of each batch row")
            starts = cache.table.seq_lens.at[0, seq_idx].get(mode="fill", fill_value=0)
            cache, step.slots, slots_ok = allocate_slots(cache, seq_idx, num_tokens, num_chunk_tokens=length)
        elif isinstance(cache, ContiguousKVState):
            starts, slots_ok = cache.seq_lens[0], jnp.asarray(True)
        else:
            raise TypeError(f"step takes a PagedKVState or ContiguousKVState, got {type(cache).__name__}")
        positions = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        logits, cache, ok = self._run(input_ids, cache, positions, step, logit_index)
        return logits, cache, ok & slots_ok

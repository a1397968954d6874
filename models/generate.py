"""Batched generation through the paged (or contiguous) cache: one prefill, then jitted multi-step decode chunks.

A batch of prompts of different lengths is right-padded into one prefill call. Decoding runs as
`lax.while_loop` chunks of up to `chunk_size` steps with no host round trip per token; between
chunks the host streams the new tokens. A sequence stops at an EOS token or after max_new_tokens;
a finished sequence stops taking blocks at once and gives its blocks back at the end of the chunk
(sequences only grow inside a chunk, so the memory read there is the exact peak).

Shapes are padded to buckets (batch and prompt length to powers of two, the context to a power of
two multiple of the block size), so the number of compilations stays small.

On a device mesh (`mesh=`, `jaxpaged.parallel`) the same programs run sharded: the model's weights
and the cache's K/V split over the tensor axis, and each data-parallel replica running its own
cache on its share of the batch (R x a power of two rows).

Axis letters: B batch, T prompt tokens, S context positions, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from jaxpaged import CacheConfig, MemoryStats, contiguous_memory_stats, init_contiguous, init_state, paged_memory_stats
from jaxpaged.attention import choose_impl
from jaxpaged.config import bucket
from jaxpaged.ops import free_seqs
from jaxpaged.parallel import check_placed, device_config, per_replica, place_cache, replicas
from jaxpaged.protocol import check_impl
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.sampling import SamplingParams, sample


@dataclasses.dataclass
class GenerationResult:
    """What came out, how it ended, and what it cost."""

    tokens: list[list[int]]  # new tokens of each prompt, EOS excluded
    finish_reasons: list[str]  # "eos" or "length"
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    decode_tokens: int  # tokens produced by decode steps (the first token of each prompt comes from prefill)
    peak_memory: MemoryStats  # when the cache held the most blocks

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def _by_replica(step, mesh, cache, *rows):
    """step(cache, *rows) -> (logits, cache, ok) over the batch's rows [B, ...]; with R data-parallel
    replicas, each runs it on its own cache and its B / R consecutive rows (`per_replica`), and the
    logits come back as [B, ...]."""
    count = replicas(mesh)
    if count == 1:
        return step(cache, *rows)
    logits, cache, ok = per_replica(step, mesh)(cache, *(x.reshape(count, -1, *x.shape[1:]) for x in rows))
    return logits.reshape(-1, *logits.shape[2:]), cache, jnp.all(ok)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_len", "impl", "mesh"),
                   donate_argnames=("cache",))
def _prefill(graphdef, params, cache, tokens, seq_idx, num_tokens, key, *, sampling, max_len, impl, mesh):
    """Writes one chunk of every prompt into the cache and samples a token from each row's last one."""
    model = nnx.merge(graphdef, params)

    def step(cache, tokens, seq_idx, num_tokens):
        return model.step(tokens, cache, seq_idx=seq_idx, num_tokens=num_tokens, max_len=max_len,
                          logit_index=jnp.maximum(num_tokens - 1, 0), impl=impl)

    logits, cache, ok = _by_replica(step, mesh, cache, tokens, seq_idx, num_tokens)
    return cache, sample(logits, key, sampling), ok


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_len", "chunk_size", "eos_ids", "impl",
                                             "mesh"), donate_argnames=("cache",))
def _decode_chunk(graphdef, params, cache, last_tokens, seq_idx, active, generated, max_new_tokens, key, *,
                  sampling, max_len, chunk_size, eos_ids, impl, mesh):
    """Up to chunk_size decode steps, stopping early once no sequence is active.

    Returns (cache, tokens [chunk_size, B], emitted [chunk_size, B] bool, active, generated, ok).
    """
    model = nnx.merge(graphdef, params)
    batch = last_tokens.shape[0]
    out_tokens = jnp.zeros((chunk_size, batch), jnp.int32)
    emitted = jnp.zeros((chunk_size, batch), bool)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, active, *_ = carry
        return (i < chunk_size) & jnp.any(active)

    def step(cache, last_tokens, active, seq_idx):
        return model.decode_step(last_tokens, cache, active=active, seq_idx=seq_idx, max_len=max_len, impl=impl)

    def body(carry):
        i, cache, last_tokens, active, generated, out_tokens, emitted, all_ok = carry
        logits, cache, ok = _by_replica(step, mesh, cache, last_tokens, active, seq_idx)
        step_key = jax.random.fold_in(key, generated.max())
        next_tokens = jnp.where(active, sample(logits, step_key, sampling), 0)
        generated = generated + active
        still_active = active & ~jnp.isin(next_tokens, eos) & (generated < max_new_tokens)
        out_tokens = out_tokens.at[i].set(next_tokens)
        emitted = emitted.at[i].set(active)
        return i + 1, cache, next_tokens, still_active, generated, out_tokens, emitted, all_ok & ok

    carry = (jnp.asarray(0), cache, last_tokens, active, generated, out_tokens, emitted, jnp.asarray(True))
    _, cache, _, active, generated, out_tokens, emitted, ok = jax.lax.while_loop(cond, body, carry)
    return cache, out_tokens, emitted, active, generated, ok


def _new_cache(init, *args, mesh: Mesh | None):
    """init(*args)'s cache; on a mesh, built in its shardings (`place_cache`), one cache per data
    replica (stacked [R, ...]) where there are several."""
    return init(*args) if mesh is None else place_cache(init, *args, mesh=mesh, stacked=replicas(mesh) > 1)


def _free(state, seq_idx: jax.Array, *, mesh: Mesh | None):
    """Frees rows seq_idx [B] of a paged cache: with R replicas, each replica's B / R its own rows."""
    if replicas(mesh) == 1:
        return free_seqs(state, seq_idx)
    return _free_per_replica(state, seq_idx.reshape(replicas(mesh), -1), mesh=mesh)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("state",))
def _free_per_replica(state, seq_idx, *, mesh):
    state, ok = per_replica(free_seqs, mesh)(state, seq_idx)
    return state, jnp.all(ok)


def generate(model: MiniLLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: SamplingParams = SamplingParams(), key: jax.Array | None = None, cache: str = "paged",
             block_size: int = 16, num_blocks: int | None = None, eos_token_ids: Sequence[int] | None = None,
             chunk_size: int = 16, on_tokens: Callable[[list[list[int]]], None] | None = None, impl: str = "auto",
             scan_layers: bool | None = None, prefill_chunk: int = 512, show_progress: bool = False,
             kv_dtype: str | None = None, mesh: Mesh | None = None) -> GenerationResult:
    """Generates up to max_new_tokens for each prompt (lists of token ids).

    Args:
      cache: "paged" (blocks taken as sequences grow, freed when they finish) or "contiguous".
      num_blocks: the paged pool's size; default enough for every prompt to reach its maximum.
      eos_token_ids: default the model config's.
      on_tokens: called after each chunk with the new tokens of every prompt (possibly empty lists).
      impl: paged attention's path, "auto", "kernel" or "reference" (`jaxpaged.attention.choose_impl`).
      scan_layers: run the layers as one scanned body (`MiniLLM.scanned`: faster compiles, one copy of
        the layer weights) or unrolled (faster steps on a GPU); default: scanned on the CPU only.
      prefill_chunk: prompts longer than this are written in chunks of this many tokens (bounded
        memory; a progress bar with show_progress).
      show_progress: a progress bar on stderr for chunked prefills.
      kv_dtype: the paged pools' storage, "int8" or "float8_e4m3fn" (8 bits with a scale per position
        and kv head; attention then takes the reference path), or None (the model dtype).
      mesh: run on this device mesh (`jaxpaged.parallel.make_mesh`); the model must be placed on it
        (`jaxpaged.models.parallel.shard_model`, or a loader's mesh=). The cache's K and V are
        sharded over kv heads on its tensor axis; each of its R data replicas holds a cache of its
        own (num_blocks each) and B / R consecutive rows of the padded batch B (R x a power of two).

    Raises:
      ValueError for an empty prompt, bad sizes, or a prompt plus max_new_tokens past the model's
      context; RuntimeError if the pool runs out of blocks.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache not in ("paged", "contiguous"):
        raise ValueError(f"cache must be 'paged' or 'contiguous', got {cache!r}")
    check_impl(impl)
    config = model.config
    if mesh is not None:
        check_placed(model, mesh)
    if kv_dtype is not None and cache != "paged":
        raise ValueError(f"kv_dtype={kv_dtype!r} needs cache='paged'; the contiguous cache holds the model dtype")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
                         f"{longest + max_new_tokens} positions, past the model's context of "
                         f"{config.max_position_embeddings}")
    key = jax.random.key(0) if key is None else key
    eos_ids = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    replica_count = replicas(mesh)
    rows = bucket(-(-len(prompts) // replica_count))  # each replica's rows
    batch = replica_count * rows
    prompt_len = bucket(longest, minimum=8) if longest <= prefill_chunk else -(-longest // prefill_chunk) * prefill_chunk
    # never padded past the context (rounded up to whole blocks)
    max_len = min(bucket(longest + max_new_tokens, minimum=block_size),
                  -(-config.max_position_embeddings // block_size) * block_size)

    tokens = np.zeros((batch, prompt_len), np.int32)
    num_tokens = np.zeros((batch,), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = prompt
        num_tokens[b] = len(prompt)
    real = np.arange(batch) < len(prompts)
    if cache == "paged":
        blocks_per_seq = max_len // block_size
        cache_config = CacheConfig.from_model_config(
            config, num_blocks=num_blocks or min(len(prompts), rows) * blocks_per_seq, block_size=block_size,
            max_seqs=rows, max_blocks_per_seq=blocks_per_seq, dtype=config.dtype, kv_dtype=kv_dtype)
        choose_impl(impl, device_config(cache_config, mesh))  # impl="kernel" where the kernels cannot run: now
        state = _new_cache(init_state, cache_config, mesh=mesh)
        blocks_needed = sum(-(-(len(p) + max_new_tokens - 1) // block_size) for p in prompts)  # the last token is never written
        seq_idx = np.where(real, np.arange(batch) % rows, rows).astype(np.int32)  # each replica's rows; padding: the sentinel
        memory_of = paged_memory_stats
    else:
        state = _new_cache(init_contiguous, config.num_layers, rows, config.num_kv_heads, max_len, config.head_dim,
                           config.dtype, mesh=mesh)
        blocks_needed = 0
        seq_idx = np.arange(batch, dtype=np.int32) % rows
        memory_of = contiguous_memory_stats

    scan = jax.default_backend() == "cpu" if scan_layers is None else scan_layers
    graphdef, params = nnx.split(model.scanned() if scan else model)
    prefill_key, decode_key = jax.random.split(key)
    too_few = f"the cache has too few blocks: these prompts need up to {blocks_needed}; raise num_blocks"
    start = time.perf_counter()
    chunk = min(prompt_len, prefill_chunk)
    first = np.zeros((batch,), np.int32)
    for begin in tqdm.trange(0, prompt_len, chunk, desc="prefill", unit="chunk", disable=not show_progress or
                             prompt_len == chunk, leave=False):
        in_chunk = np.clip(num_tokens - begin, 0, chunk)
        state, sampled, ok = _prefill(graphdef, params, state, jnp.asarray(tokens[:, begin:begin + chunk]),
                                      jnp.asarray(seq_idx), jnp.asarray(in_chunk), prefill_key, sampling=sampling,
                                      max_len=max_len, impl=impl, mesh=mesh)
        ends_here = (num_tokens > begin) & (num_tokens <= begin + chunk)  # rows whose last prompt token is here
        first = np.where(ends_here, np.asarray(sampled), first)
        if not bool(ok):
            raise RuntimeError(too_few)
    prefill_seconds = time.perf_counter() - start
    peak = memory_of(state)

    outputs = [[int(first[b])] for b in range(len(prompts))]
    finish = ["eos" if int(first[b]) in eos_ids else ("length" if max_new_tokens == 1 else "") for b in range(len(prompts))]
    if on_tokens:
        on_tokens([[t for t in out if t not in eos_ids] for out in outputs])
    active = np.array([b < len(prompts) and not finish[b] for b in range(batch)])
    generated = np.ones((batch,), np.int32)
    last = first
    decode_seconds, decode_tokens = 0.0, 0
    while active.any():
        start = time.perf_counter()
        state, chunk, emitted, active_now, generated, ok = _decode_chunk(
            graphdef, params, state, jnp.asarray(last), jnp.asarray(seq_idx), jnp.asarray(active), jnp.asarray(generated),
            jnp.asarray(max_new_tokens, jnp.int32), decode_key, sampling=sampling, max_len=max_len,
            chunk_size=chunk_size, eos_ids=eos_ids, impl=impl, mesh=mesh)
        chunk, emitted, active_now = np.asarray(chunk), np.asarray(emitted), np.asarray(active_now)
        decode_seconds += time.perf_counter() - start
        if not bool(ok):
            raise RuntimeError(too_few)
        decode_tokens += int(emitted.sum())
        new = [[int(t) for t, e in zip(chunk[:, b], emitted[:, b]) if e] for b in range(len(prompts))]
        for b in range(len(prompts)):
            outputs[b].extend(new[b])
            if active[b] and not active_now[b]:
                finish[b] = "eos" if new[b] and new[b][-1] in eos_ids else "length"
        if on_tokens:
            on_tokens([[t for t in n if t not in eos_ids] for n in new])
        peak = max(peak, memory_of(state), key=lambda m: (m.used_blocks, m.bytes_live))
        finished = active & ~active_now
        if cache == "paged" and finished.any():
            state, freed = _free(state, jnp.asarray(np.where(finished, seq_idx, rows), jnp.int32), mesh=mesh)
            if not bool(freed):
                raise RuntimeError("freeing finished sequences found a block already free")
        last = np.where(emitted.any(axis=0), chunk[np.maximum(emitted.sum(axis=0) - 1, 0), np.arange(batch)], last)
        active = active_now

    return GenerationResult(
        tokens=[[t for t in out if t not in eos_ids] for out in outputs],
        finish_reasons=[f or "length" for f in finish], prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        prompt_tokens=int(num_tokens.sum()), decode_tokens=decode_tokens, peak_memory=peak)

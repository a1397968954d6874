"""Per-request sampling parameters (named as vLLM's), and one jitted sampler for a batch of rows that
each carry their own.

The sampler has no Python branch per request: every row's parameters are arrays, and greedy rows,
filtered rows and penalised rows all go through the same ops. Two static switches, taken per batch,
skip work no row needs: the vocabulary sort (top-k, top-p, min-p) and the repetition penalty.

A row's randomness comes from its request's seed and the index of the token it draws
(`jax.random.fold_in`), never from its place in the batch: a request samples the same tokens
whatever runs beside it.

Axis letters: B rows, V vocab, R logprobs returned per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples and when it stops. Field names and meanings follow vLLM's.

    Raises ValueError naming the field for a value out of range.
    """

    n: int = 1  # completions of the prompt, sampled in parallel (their prompt blocks shared)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1) keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None  # the request's own random stream; None: drawn from the engine's seed
    max_tokens: int = 16  # most tokens to generate
    min_tokens: int = 0  # no stop (EOS, stop token, stop string) before this many
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the output, beside the model's EOS
    ignore_eos: bool = False  # run to max_tokens through EOS
    logprobs: int | None = None  # return the log-probabilities of this many most likely tokens per step

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = (
            ("n", isinstance(self.n, int) and self.n >= 1, "an int >= 1"),
            ("temperature", 0 <= self.temperature < math.inf, "finite and >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0 (or -1 for all)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an int >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "an int in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
             "None or an int >= 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "None or an int"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@struct.dataclass
class SamplingRows:
    """Every row's sampling parameters as arrays: the sampler's input."""

    temperature: jax.Array  # [B] float32; 0 is greedy
    top_k: jax.Array  # [B] int32; 0 keeps all
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    seeds: jax.Array  # [B] uint32: each row's random stream
    token_indices: jax.Array  # [B] int32: the index, in its output, of the token each row draws

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], token_indices: list[int], rows: int) -> SamplingRows:
        """Arrays for `rows` rows (>= len(params); the rest greedy padding)."""
        pad = rows - len(params)

        def column(values, dtype, fill):
            return np.asarray(list(values) + [fill] * pad, dtype)

        return cls(temperature=column((p.temperature for p in params), np.float32, 0.0),
                   top_k=column((p.top_k for p in params), np.int32, 0),
                   top_p=column((p.top_p for p in params), np.float32, 1.0),
                   min_p=column((p.min_p for p in params), np.float32, 0.0),
                   repetition_penalty=column((p.repetition_penalty for p in params), np.float32, 1.0),
                   seeds=column((s & 0xFFFFFFFF for s in seeds), np.uint32, 0),
                   token_indices=column(token_indices, np.int32, 0))

    def keys(self) -> jax.Array:
        """[B] PRNG keys: each row's stream folded with the index of the token it draws."""
        return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(self.seeds, self.token_indices)


@functools.partial(jax.jit, static_argnames=("filtered", "penalised", "random", "num_logprobs"))
def sample(logits: jax.Array, rows: SamplingRows, seen: jax.Array | None = None, banned: jax.Array | None = None, *,
           filtered: bool, penalised: bool, random: bool = True, num_logprobs: int | None = 0):
    """Next tokens for a batch of rows, each with its own parameters.

    Args:
      logits: [B, V] float32, the model's.
      rows: every row's parameters (`SamplingRows.build`).
      seen: [B, V] bool, the tokens already in each row's prompt or output (with penalised).
      banned: [B, V] bool, tokens a row may not draw now (stop tokens before min_tokens).
      filtered: whether any row uses top-k, top-p or min-p (static: without it, no sort).
      penalised: whether any row has a repetition penalty other than 1 (static).
      random: whether any row samples (temperature > 0; static: without it, no random draw).
      num_logprobs: R, static: how many most likely tokens' log-probabilities to return; None: no
        log-probabilities at all (zeros, and R = 0).

    Returns:
      (tokens [B] int32, logprob of each token [B] float32, top ids [B, R] int32, top logprobs [B, R]).
      Log-probabilities are the model's own (before temperature, penalty and filters), as vLLM's.
    """
    raw_logprobs = None if num_logprobs is None else jax.nn.log_softmax(logits, axis=-1)
    if banned is not None:
        logits = jnp.where(banned, -jnp.inf, logits)
    if penalised:  # vLLM's rule: divide positive logits, multiply negative ones
        penalty = rows.repetition_penalty[:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)
    greedy = rows.temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, rows.temperature)[:, None]
    if filtered:
        scaled = _filter(scaled, rows)
    tokens = jnp.argmax(logits, axis=-1)
    if random:
        tokens = jnp.where(greedy, tokens, jax.vmap(jax.random.categorical)(rows.keys(), scaled))
    tokens = tokens.astype(jnp.int32)
    if raw_logprobs is None:
        batch = logits.shape[0]
        return tokens, jnp.zeros((batch,)), jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0))
    token_logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_logprobs)
    return tokens, token_logprobs, top_ids.astype(jnp.int32), top_logprobs


def _filter(scaled: jax.Array, rows: SamplingRows) -> jax.Array:
    """-inf for tokens outside each row's top-k, top-p and min-p sets (one sort of the vocabulary)."""
    vocab = scaled.shape[-1]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V], most likely first
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = rank < jnp.where(rows.top_k > 0, rows.top_k, vocab)[:, None]
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < rows.top_p[:, None]  # the first token always stays
    keep &= probs >= rows.min_p[:, None] * probs[:, :1]
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(scaled < threshold, -jnp.inf, scaled)

"""Training or fine-tuning a MiniLLM with optax on a text file: next-token cross-entropy on random windows.

The state is split once (`nnx.split`) and one jitted step updates (params, optimiser state) with
both donated. The result is saved as a checkpoint directory that `jaxpaged generate --model` loads.

Axis letters: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxpaged.models.llama import MiniLLM


def next_token_loss(model: MiniLLM, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]; tokens: [B, T + 1]."""
    logits = model(tokens[:, :-1])  # [B, T, V] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnames=("params", "opt_state"))
def train_step(graphdef, params, opt_state, tokens, *, optimizer: optax.GradientTransformation):
    """One optimiser step. DONATES params and opt_state. Returns (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(model: MiniLLM, token_ids: np.ndarray, *, steps: int, batch_size: int = 8, seq_len: int = 64,
          learning_rate: float = 3e-3, seed: int = 0, progress: bool = True) -> tuple[MiniLLM, list[float]]:
    """Trains on random windows of `token_ids` [N]; returns the trained model and the loss of every step."""
    token_ids = np.asarray(token_ids, np.int32)
    if token_ids.size < seq_len + 1:
        raise ValueError(f"the text has {token_ids.size} tokens; training needs more than seq_len={seq_len}")
    if token_ids.max(initial=0) >= model.config.vocab_size:
        raise ValueError(f"token id {int(token_ids.max())} is outside the model's vocabulary ({model.config.vocab_size})")
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.0))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs; keep the caller's model intact
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for _ in bar:
        starts = rng.integers(0, token_ids.size - seq_len, size=batch_size)
        batch = np.stack([token_ids[s: s + seq_len + 1] for s in starts])
        params, opt_state, loss = train_step(graphdef, params, opt_state, jnp.asarray(batch), optimizer=optimizer)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return nnx.merge(graphdef, params), losses

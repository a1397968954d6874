"""SmolLM2-135M (the embedded GGUF weights, bfloat16) with an 8-bit paged cache against its bfloat16 cache.

A held text (docstrings of Python standard library modules and their public functions and classes,
assembled in a fixed order: text the model was not tuned on) is cut into --rows rows of --tokens
tokens and fed through the paged cache in chunks of --chunk tokens, so later chunks attend over K/V
read back from the cache (quantised, for the 8-bit runs). Every cache runs the same chunks in
lockstep, and at every position the 8-bit caches' logits are compared with the bfloat16 cache's:
max abs difference, KL(bfloat16 || 8-bit) (mean and max), and how often the greedy token (the
argmax) agrees; and each cache's perplexity of the text (exp of the mean negative log-likelihood
of every next token), with the float32 model and cache beside for scale.

--quantised-q adds each 8-bit cache again with q quantised too, as a kernel whose q . k product took
8-bit operands would see it: turned by K's rotation, quantised per position and head in the pool's
format (`jaxpaged.quant.quantise`), and back (the reference attention path, patched here).

--int8-products adds the int8 cache as the decode kernel's default int8 products compute it: q
quantised as above, and each query row's weights (probability times V's scale) rounded onto 0..127
of the row's largest in each step of 64 positions (`jaxpaged.kernels.common.weigh`). Here every
query takes them, the prefill chunks' too, where the kernels' prefill converts the tiles instead:
an upper bound on what the kernels change. V's scale per position and head is taken as the
dequantised row's largest |value| / 127 (the stored scale up to its float16 rounding).

Run: python benchmarks/kv_quant_model.py [--quantised-q] [--int8-products]
         [--out benchmarks/results/kv_quant_smollm2_int8_products_CPU.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxpaged as jp
from jaxpaged import attention
from jaxpaged.quant import dequantise, quantise, rotate

MODULES = ("json", "argparse", "collections", "functools", "itertools", "pathlib", "textwrap", "heapq", "string",
           "fractions", "statistics", "shutil", "difflib", "calendar", "datetime", "random", "bisect", "csv")


def held_text(tokenizer, tokens: int) -> list[int]:
    """Token ids of at least `tokens` tokens of docstrings (each module's, then its public
    functions' and classes' in name order), or all of them if fewer."""
    import importlib
    import inspect

    ids = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [inspect.getdoc(getattr(module, member)) for member in sorted(dir(module))
                                   if not member.startswith("_") and callable(getattr(module, member))]
        for doc in docs:
            if doc:
                ids += tokenizer.encode(doc + "\n\n")
        if len(ids) >= tokens:
            break
    return ids


_ATTEND = attention.attend
_Q_FORMAT = None  # the format q is quantised to while a run's step is traced (--quantised-q)


def _attend_with_quantised_q(q, *args, **kwargs):
    """The reference attention with q as 8-bit q . k products would take it (rotated, quantised per
    row), turned back for the K that `gather_kv` rotated back: (q H)~ . (k H) = ((q H)~ H) . k."""
    if _Q_FORMAT is not None:
        turned = rotate(q).astype(q.dtype)
        q = rotate(dequantise(*quantise(turned, _Q_FORMAT), jnp.float32)).astype(q.dtype)
    return _ATTEND(q, *args, **kwargs)


_PRODUCT_STEP = None  # positions a step of the int8 products while a run's step is traced (--int8-products)


def _attend_as_int8_products(q, k, v, q_positions, kv_lens, scale=None):
    """The reference attention as int8 products compute it: q quantised (`_attend_with_quantised_q`'s
    way) and the weights rounded per row and step of _PRODUCT_STEP positions. k, v: dequantised."""
    if _PRODUCT_STEP is None:
        return _attend_with_quantised_q(q, k, v, q_positions, kv_lens, scale)
    turned = rotate(q).astype(q.dtype)
    q = rotate(dequantise(*quantise(turned, "int8"), jnp.float32))
    batch, num_q, num_heads, head_dim = q.shape
    kv_heads, length = k.shape[2], k.shape[1]
    q = q.reshape(batch, num_q, kv_heads, num_heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(jnp.float32)) * (head_dim**-0.5 if scale is None else scale)
    key_pos = jnp.arange(length)[None, None, :]
    visible = (key_pos <= q_positions[:, :, None]) & (key_pos < kv_lens[:, None, None])  # [B, T, S]
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
    v_scale = jnp.abs(v.astype(jnp.float32)).max(-1) / 127  # [B, S, K]
    weights = probs * jnp.moveaxis(v_scale, 1, 2)[:, :, None, None, :]  # [B, K, G, T, S]
    steps = weights.reshape(*weights.shape[:-1], length // _PRODUCT_STEP, _PRODUCT_STEP)
    top = steps.max(-1, keepdims=True)
    rounded = jnp.floor(steps * jnp.where(top > 0, 127 / top, 0.0) + 0.5) * (top / 127)
    values = v.astype(jnp.float32) / jnp.where(v_scale > 0, v_scale, 1.0)[..., None]  # the int8 values
    out = jnp.einsum("bkgts,bskd->btkgd", rounded.reshape(weights.shape), values)
    return out.reshape(batch, num_q, num_heads, head_dim).astype(v.dtype)


def step_fn(model, batch: int, length: int):
    """A jitted chunk step of the model over a paged state: (params, state, ids [B, T]) -> (logits, state)."""
    graphdef, params = nnx.split(model.scanned())

    @jax.jit
    def step(params, state, ids):
        logits, state, ok = nnx.merge(graphdef, params).step(ids, state, seq_idx=jnp.arange(batch, dtype=jnp.int32),
                                                              max_len=length)
        return logits, state, ok

    return functools.partial(step, params)


class Tally:
    """Running sums of the comparisons of one 8-bit cache's logits with the reference's, chunk by chunk."""

    def __init__(self):
        self.max_abs, self.kl_sum, self.kl_max, self.agree, self.count = 0.0, 0.0, 0.0, 0, 0

    def add(self, reference: np.ndarray, other: np.ndarray) -> None:
        log_p, log_q = log_softmax(reference), log_softmax(other)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # [B, T]
        self.max_abs = max(self.max_abs, float(np.abs(other - reference).max()))
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int((other.argmax(-1) == reference.argmax(-1)).sum())
        self.count += kl.size

    def result(self) -> dict:
        return {"max_abs_logit_diff": self.max_abs, "kl_mean": self.kl_sum / self.count, "kl_max": self.kl_max,
                "argmax_agreement": self.agree / self.count}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def next_token_nll(logits: np.ndarray, targets: np.ndarray, real: np.ndarray) -> float:
    """Sum of -log p(target) over the positions where `real` [B, T] holds."""
    picked = np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return float(-(picked * real).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="rows the text is cut into (default 4)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per prefill chunk (default 256)")
    parser.add_argument("--quantised-q", action="store_true",
                        help="also run each 8-bit cache with q quantised in its format (8-bit q . k products)")
    parser.add_argument("--int8-products", action="store_true",
                        help="also run the int8 cache as the decode kernel's int8 products compute it")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.int8_products and args.tokens % 64:
        parser.error("--int8-products rounds the weights in steps of 64 positions: --tokens must be a multiple of 64")
    global _Q_FORMAT, _PRODUCT_STEP

    from jaxpaged.models.gguf_weights import load_gguf

    models = {dtype: load_gguf(dtype=dtype) for dtype in ("bfloat16", "float32")}
    tokenizer = models["bfloat16"][1]
    ids = held_text(tokenizer, args.rows * args.tokens)
    rows = min(args.rows, len(ids) // args.tokens)
    tokens = np.asarray(ids[: rows * args.tokens], np.int32).reshape(rows, args.tokens)
    runs = {"bfloat16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
            "float8_e4m3fn": ("bfloat16", "float8_e4m3fn"), "float32 model": ("float32", None)}
    if args.quantised_q or args.int8_products:
        attention.attend = _attend_as_int8_products
    if args.quantised_q:
        runs.update({f"{f}, q in {f}": ("bfloat16", f) for f in ("int8", "float8_e4m3fn")})
    if args.int8_products:
        runs["int8, int8 products"] = ("bfloat16", "int8")
    steps, states = {}, {}
    for name, (dtype, kv_dtype) in runs.items():
        model = models[dtype][0]
        config = jp.CacheConfig.from_model_config(model.config, num_blocks=rows * -(-args.tokens // 16), block_size=16,
                                                  max_seqs=rows, dtype=dtype, kv_dtype=kv_dtype)
        steps[name], states[name] = step_fn(model, rows, args.tokens), jp.init_state(config)
    tallies = {name: Tally() for name, (_, kv_dtype) in runs.items() if kv_dtype}
    nll = dict.fromkeys(runs, 0.0)
    from tqdm import tqdm

    for begin in tqdm(range(0, args.tokens, args.chunk), desc="chunks"):
        chunk = tokens[:, begin:begin + args.chunk]
        targets = tokens[:, begin + 1:begin + args.chunk + 1]
        real = np.zeros(chunk.shape, bool)
        real[:, : targets.shape[1]] = True  # the row's last token has no next one
        targets = np.pad(targets, ((0, 0), (0, chunk.shape[1] - targets.shape[1])))
        logits = {}
        for name in runs:
            _Q_FORMAT = runs[name][1] if ", q in " in name else None  # fixed in each step's first trace
            _PRODUCT_STEP = 64 if name.endswith("int8 products") else None
            out, states[name], ok = steps[name](states[name], jnp.asarray(chunk))
            assert bool(ok)
            logits[name] = np.asarray(out, np.float32)
            nll[name] += next_token_nll(logits[name], targets, real)
        for name, tally in tallies.items():
            tally.add(logits["bfloat16"], logits[name])
    predicted = rows * (args.tokens - 1)
    perplexity = {name: float(np.exp(total / predicted)) for name, total in nll.items()}
    results = {name: {**tally.result(), "perplexity": perplexity[name],
                      "perplexity_vs_bfloat16": perplexity[name] / perplexity["bfloat16"] - 1}
               for name, tally in tallies.items()}
    print(f"perplexity of {predicted} next tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in perplexity.items()))
    for name, row in results.items():
        print(name, {k: round(v, 5) for k, v in row.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": "CPU", "machine": platform.machine(), "jax": jax.__version__,
                       "model": "SmolLM2-135M-Instruct (GGUF), bfloat16", "reference": "the bfloat16 cache",
                       "modules": MODULES, "positions": int(tokens.size), "args": vars(args),
                       "perplexity": perplexity, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()

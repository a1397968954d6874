"""SmolLM2-135M (the embedded GGUF weights) with an 8-bit paged cache against its float32 cache.

Each text (held out: docstrings of Python standard library modules) is fed as prompts of
--tokens tokens in chunks of --chunk (so later chunks attend over K/V read back from the cache,
quantised for the 8-bit runs); the logits of every position are compared with the float32
cache's: max abs difference, KL(float32 || 8-bit) per position (mean and max), and how often the
greedy token (the argmax) agrees.

Run: python benchmarks/kv_quant_model.py [--out benchmarks/results/kv_quant_smollm2_CPU.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxpaged as jp

MODULES = ("json", "argparse", "collections", "functools", "itertools", "pathlib", "textwrap", "heapq")


def held_out_texts() -> dict[str, str]:
    """The module docstrings of MODULES, by module name (those that have one)."""
    import importlib

    docs = {name: importlib.import_module(name).__doc__ for name in MODULES}
    return {name: doc for name, doc in docs.items() if doc}


def logits_through_cache(model, tokens: np.ndarray, kv_dtype: str | None, chunk: int) -> np.ndarray:
    """Logits [B, T, V] of tokens [B, T] fed in chunks of `chunk` through a paged cache of kv_dtype."""
    batch, length = tokens.shape
    config = jp.CacheConfig.from_model_config(model.config, num_blocks=batch * (-(-length // 16)), block_size=16,
                                              max_seqs=batch, kv_dtype=kv_dtype)
    graphdef, params = nnx.split(model.scanned())

    @jax.jit
    def step(params, state, ids):
        return nnx.merge(graphdef, params).step(ids, state, seq_idx=jnp.arange(batch, dtype=jnp.int32),
                                                max_len=length)

    state, out = jp.init_state(config), []
    for begin in range(0, length, chunk):
        logits, state, ok = step(params, state, jnp.asarray(tokens[:, begin:begin + chunk]))
        assert bool(ok)
        out.append(np.asarray(logits, np.float64))
    return np.concatenate(out, axis=1)


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(other)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # [B, T]
    return {"max_abs_logit_diff": float(np.abs(other - reference).max()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "argmax_agreement": float((other.argmax(-1) == reference.argmax(-1)).mean()),
            "reference_logit_std": float(reference.std())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="positions per text (default 128)")
    parser.add_argument("--chunk", type=int, default=32, help="tokens per prefill chunk (default 32)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()

    from jaxpaged.models.gguf_weights import load_gguf

    model, tokenizer = load_gguf()
    ids = {name: tokenizer.encode(text)[: args.tokens] for name, text in held_out_texts().items()}
    ids = {name: row for name, row in ids.items() if len(row) == args.tokens}
    tokens = np.asarray(list(ids.values()), np.int32)
    reference = logits_through_cache(model, tokens, None, args.chunk)
    rows = {}
    for kv_dtype in ("int8", "float8_e4m3fn"):
        rows[kv_dtype] = compare(reference, logits_through_cache(model, tokens, kv_dtype, args.chunk))
        print(kv_dtype, {k: round(v, 5) for k, v in rows[kv_dtype].items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": "CPU", "machine": platform.machine(), "jax": jax.__version__, "model": "SmolLM2-135M",
                       "texts": list(ids), "positions": int(tokens.size), "args": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

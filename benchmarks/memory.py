"""Memory of the paged cache against contiguous preallocation, and CPU timings of append and gather.

Part 1 reproduces the seed's setting: 4 sequences, block size 16, 32 blocks per sequence (512
positions), a cache of 16 layers x 8 kv heads x 64 dims in float32, so that contiguous
preallocation is 128 MiB; the sequences hold a short prompt.
Part 2 takes realistic mixed lengths (log-normal around 300 tokens, capped at 2048) for 16
sequences with SmolLM2-135M's cache shape in bfloat16, for block sizes 8/16/32/64.
Every paged figure is read back from a real cache that was filled with the tokens; every
contiguous figure from a real KVCache.
Part 3 times append (one decode token) and gather on this machine's CPU, paged over contiguous.

Run: python benchmarks/memory.py [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxpaged as jp

MIB = 2**20


def fill_paged(config: jp.CacheConfig, lengths, progress: str) -> jp.MemoryStats:
    """A paged cache with just enough blocks, holding `lengths` tokens in every layer."""
    num_blocks = sum(-(-n // config.block_size) for n in lengths)
    config = jp.CacheConfig.from_model_config(config, num_blocks=num_blocks, max_seqs=len(lengths),
                                              max_blocks_per_seq=-(-max(lengths) // config.block_size))
    state = jp.init_state(config)
    seq_idx = jnp.arange(len(lengths), dtype=jnp.int32)
    chunk = 1 << (max(lengths) - 1).bit_length()
    kv = jnp.ones((len(lengths), chunk, config.num_kv_heads, config.head_dim), config.jnp_dtype)
    for layer in tqdm(range(config.num_layers), desc=progress, leave=False):
        state, ok = jp.append(state, layer, seq_idx, kv, kv, jnp.asarray(lengths, jnp.int32))
        assert bool(ok)
    return jp.paged_memory_stats(state)


def contiguous_stats(config: jp.CacheConfig, lengths, max_len: int) -> jp.MemoryStats:
    cache = jp.KVCache(config, batch_size=len(lengths), max_len=max_len)
    cache.state = cache.state.replace(seq_lens=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), cache.state.seq_lens.shape))
    return cache.memory_stats()


def row(name: str, stats: jp.MemoryStats, baseline: jp.MemoryStats) -> dict:
    return {
        "cache": name,
        "block_size": stats.block_size,
        "blocks_used": stats.used_blocks,
        "bytes_reserved_contiguous": baseline.bytes_reserved,
        "bytes_needed": stats.bytes_used,
        "bytes_live": stats.bytes_live,
        "saving_vs_contiguous": 1 - stats.bytes_used / baseline.bytes_reserved,
        "utilisation": stats.bytes_live / stats.bytes_used,
        "fragmentation": stats.fragmentation,
    }


def print_table(rows):
    print(f"{'cache':<12}{'P':>6}{'blocks':>8}{'contig MiB':>12}{'needed MiB':>12}{'live MiB':>10}{'saving':>9}{'util':>8}{'frag':>8}")
    for r in rows:
        print(f"{r['cache']:<12}{r['block_size']:>6}{r['blocks_used']:>8}{r['bytes_reserved_contiguous'] / MIB:>12.2f}"
              f"{r['bytes_needed'] / MIB:>12.2f}{r['bytes_live'] / MIB:>10.2f}{r['saving_vs_contiguous']:>9.1%}"
              f"{r['utilisation']:>8.1%}{r['fragmentation']:>8.1%}")


def median_seconds(fn, *args, repeats=50):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_timings(batch=8, context=512, block_size=16):
    """Median seconds of one decode append and one full gather, paged and contiguous, one layer."""
    config = jp.CacheConfig(num_layers=1, num_kv_heads=3, head_dim=64, num_blocks=batch * (context // block_size + 1),
                            block_size=block_size, max_seqs=batch, dtype="float32")
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.standard_normal((batch, context, 3, 64)), jnp.float32)
    token = jnp.asarray(rng.standard_normal((batch, 1, 3, 64)), jnp.float32)
    seq_idx = jnp.arange(batch, dtype=jnp.int32)
    paged, _ = jp.append(jp.init_state(config), 0, seq_idx, prompt, prompt)
    dense = jp.init_contiguous(1, batch, 3, context + 1, 64, jnp.float32)
    dense, _ = jp.contiguous_append(dense, 0, jnp.swapaxes(prompt, 1, 2), jnp.swapaxes(prompt, 1, 2))
    token_heads_first = jnp.swapaxes(token, 1, 2)

    # Time the write without growing the cache: append, then time it again on the same input state.
    # A donated state can be used once, so each timed call gets a fresh copy made outside the timer.
    def time_append(fn, state, *args):
        times = []
        for _ in range(30):
            fresh = jax.tree.map(jnp.copy, state)
            jax.block_until_ready(fresh)
            start = time.perf_counter()
            jax.block_until_ready(fn(fresh, 0, *args))
            times.append(time.perf_counter() - start)
        return statistics.median(times[5:])

    out = {
        "append_paged_s": time_append(jp.append, paged, seq_idx, token, token),
        "append_contiguous_s": time_append(jp.contiguous_append, dense, token_heads_first, token_heads_first),
        "gather_paged_s": median_seconds(lambda s: jp.gather_kv(s, 0, seq_idx, max_len=context), paged),
        "read_contiguous_s": median_seconds(lambda s: jp.contiguous_read(s, 0), dense),
    }
    out["append_ratio_paged_over_contiguous"] = out["append_paged_s"] / out["append_contiguous_s"]
    out["gather_ratio_paged_over_contiguous"] = out["gather_paged_s"] / out["read_contiguous_s"]
    out.update(batch=batch, context=context, block_size=block_size, kv_heads=3, head_dim=64, dtype="float32")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/memory.json", help="where to write the JSON results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed-length draw")
    args = parser.parse_args()

    seed_config = jp.CacheConfig(num_layers=16, num_kv_heads=8, head_dim=64, num_blocks=1, block_size=16)
    seed_lengths = [20, 24, 28, 32]  # short prompts: two blocks each
    seed_rows = [row("contiguous", contiguous_stats(seed_config, seed_lengths, 512), contiguous_stats(seed_config, seed_lengths, 512))]
    seed_rows.append(row("paged", fill_paged(seed_config, seed_lengths, "seed setting"), contiguous_stats(seed_config, seed_lengths, 512)))
    print("Seed setting: 4 sequences, max 512 positions, 16 layers x 8 kv heads x 64 dims, float32")
    print_table(seed_rows)

    rng = np.random.default_rng(args.seed)
    max_len = 2048
    mixed = np.clip(np.round(rng.lognormal(np.log(300), 0.9, size=16)), 1, max_len).astype(int).tolist()
    smol = jp.CacheConfig(num_layers=30, num_kv_heads=3, head_dim=64, num_blocks=1, dtype="bfloat16")
    baseline = contiguous_stats(smol, mixed, max_len)
    mixed_rows = [row("contiguous", baseline, baseline)]
    for block_size in (8, 16, 32, 64):
        config = jp.CacheConfig.from_model_config(smol, block_size=block_size)
        mixed_rows.append(row("paged", fill_paged(config, mixed, f"block size {block_size}"), baseline))
    print(f"\nMixed lengths: 16 sequences, max {max_len} positions, SmolLM2-135M cache shape "
          f"(30 layers x 3 kv heads x 64 dims), bfloat16; lengths {sorted(mixed)}")
    print_table(mixed_rows)

    timings = cpu_timings()
    print(f"\nCPU ({platform.processor() or platform.machine()}), batch {timings['batch']}, context {timings['context']}:"
          f" append paged/contiguous {timings['append_ratio_paged_over_contiguous']:.2f}x time,"
          f" gather paged/contiguous {timings['gather_ratio_paged_over_contiguous']:.2f}x time")

    result = {"seed_setting": seed_rows, "mixed_lengths": {"lengths": mixed, "max_len": max_len, "rows": mixed_rows},
              "cpu_timings": timings, "jax": jax.__version__, "device": str(jax.devices()[0]), "cpu": platform.machine()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

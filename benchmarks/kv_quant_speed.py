"""8-bit K/V on the GPU: decode attention speed, pool capacity, and generation with a pool that limits the batch.

1. Decode attention, one layer, every sequence at the full context, random block tables (fragmented
   pools): jaxpaged's decode kernel (its default launch) on bfloat16, int8 and float8_e4m3fn pools,
   and jax's Pallas paged kernel (`jax.experimental.pallas.ops.gpu.paged_attention`) on bfloat16
   pages and on int8 pages with its per-position scales, tuned per shape over JAX_SETTINGS; batch
   8, 32, 128 x context 2048, 4096, 8192 at heads 32/8/128, and x 2048, 8192 at 32/8/64. Each path is checked first
   against float32 attention over the values its pools hold (dequantised for 8-bit). Time: the
   median of 5 rounds of a jitted loop of 20 dependent calls (the device's time, not the host's;
   the same method for every path); and beside it each path's device time per call (the GPU's busy
   time over 20 calls under the profiler, as benchmarks/attention.py times decode), which leaves out
   the loop's own time between calls, most of an iteration at the smallest shapes. Bandwidth counts
   the bytes each path must read once: K and V, and for 8-bit their scales (2 bytes a position and
   kv head for ours, float16; jax's the same, given float16 scales).
2. Capacity: sequences of a given length that fit a pool of fixed bytes, bfloat16 against 8-bit
   (llama-1b's and an 8B Llama's K/V shapes; from `CacheConfig`, counting the scales).
3. Generation: the engine on llama-1b (bfloat16, random weights) serving workload A with a pool of
   fixed bytes that limits how many sequences run at once: output tokens/s and the most blocks and
   sequences held, for bfloat16, int8 and float8 K/V in the same run.

Run: python benchmarks/kv_quant_speed.py --out benchmarks/results/kv_quant_speed_H200.json
     (--quick: two small shapes and 16 requests, a smoke test; --skip-engine: attention and capacity only)
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged.kernels import paged_decode_attention
from jaxpaged.quant import dequantise, quantise, v_blocks
from attention import make_inputs, xla_dense
from ceilings import spec_bandwidth
from timing import device_time, median_time_in_loop

FORMATS = ("int8", "float8_e4m3fn")
SHAPES = ([(b, s, 32, 8, 128) for b in (8, 32, 128) for s in (2048, 4096, 8192)]
          + [(b, s, 32, 8, 64) for b in (8, 32, 128) for s in (2048, 8192)])
# jax's kernel: (pages per compute block, k splits) tried per shape, 4 warps and 3 stages (the best
# settings at these shapes on an H200 in benchmarks/results/attention_H200.json, tuned over a wider
# grid, lie in this one but for one shape's 4 pages with 2 splits)
JAX_SETTINGS = [(4, 8)] + [(8, splits) for splits in (1, 2, 4, 8, 16)]
BLOCK_SIZE = 16


def quantised(pool, kv_dtype):
    """A [1, K, N, P, D] pool in 8 bits, and its float16 scales [1, K, N, P]."""
    return quantise(pool, kv_dtype)


def rel_err(out, reference) -> float:
    out = np.asarray(out, np.float32)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def reference_out(s, k_pool, v_pool):
    """float32 attention over what the pools hold (the dequantised values for 8-bit), contiguous."""
    from attention import gather_blocks

    k, v = (gather_blocks(pool.astype(jnp.float32), s["tables"]) for pool in (k_pool, v_pool))
    return np.asarray(xla_dense(s["q"].astype(jnp.float32), k, v, s["lengths"]))


def bench_shape(rng, batch, context, heads, kv_heads, head_dim, copies):
    """One shape's row: seconds, bytes read, bandwidth and error of every path."""
    sets = make_inputs(rng, batch, context, heads, kv_heads, head_dim, BLOCK_SIZE, copies)
    positions = batch * context * kv_heads  # per pool
    row = {"batch": batch, "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "seconds": {}, "device_seconds": {}, "bytes": {}, "rel_err": {}, "jax_settings": {}}

    def record(name, fn, args, nbytes, reference):
        row["rel_err"][name] = rel_err(fn(*args[0]), reference)
        row["seconds"][name] = median_time_in_loop(fn, args)
        row["device_seconds"][name] = device_time(fn, args)[0]
        row["bytes"][name] = nbytes

    bf16_bytes = 2 * positions * head_dim * 2
    reference = reference_out(sets[0], sets[0]["pool_k"], sets[0]["pool_v"])
    ours = [(x["q"], x["pool_k"], x["pool_v"], x["layer"], x["tables"], x["lengths"]) for x in sets]
    record("jaxpaged_bfloat16", paged_decode_attention, ours, bf16_bytes, reference)
    for kv_dtype in FORMATS:
        pools = [(quantised(x["pool_k"], kv_dtype), quantised(x["pool_v"], kv_dtype)) for x in sets]
        quant_bytes = 2 * positions * (head_dim + 2)
        args = [(x["q"], k, v_blocks(v), x["layer"], x["tables"], x["lengths"], ks, vs)  # V's blocks as a cache holds them
                for x, ((k, ks), (v, vs)) in zip(sets, pools)]
        fn = lambda q, k, v, layer, tables, lengths, ks, vs: paged_decode_attention(  # noqa: E731
            q, k, v, layer, tables, lengths, k_scale=ks, v_scale=vs)
        (k, ks), (v, vs) = pools[0]
        held = reference_out(sets[0], dequantise(k, ks, jnp.float32), dequantise(v, vs, jnp.float32))
        record(f"jaxpaged_{kv_dtype}", fn, args, quant_bytes, held)
        row["rel_err"][f"jaxpaged_{kv_dtype}_vs_bfloat16_values"] = rel_err(fn(*args[0]), reference)
        if kv_dtype == "int8":  # jax's kernel: its pages [K, N, P, D] (our layer 0), scales [K, N, P]
            jax_args = [(_jax_q(x["q"], head_dim), k[0], v[0], x["tables"], x["lengths"], ks[0], vs[0])
                        for x, ((k, ks), (v, vs)) in zip(sets, pools)]
            _tune_jax(row, "jax_pallas_int8", jax_args, context // BLOCK_SIZE, quant_bytes, held)
    jax_args = [(_jax_q(x["q"], head_dim), x["pool_k"][0], x["pool_v"][0], x["tables"], x["lengths"]) for x in sets]
    _tune_jax(row, "jax_pallas_bfloat16", jax_args, context // BLOCK_SIZE, bf16_bytes, reference)
    row["bandwidth_GBps"] = {name: row["bytes"][name] / sec / 1e9 for name, sec in row["seconds"].items()}
    base = row["seconds"]["jaxpaged_bfloat16"]
    row["speedup_vs_jaxpaged_bfloat16"] = {name: base / sec for name, sec in row["seconds"].items()}
    if "jax_pallas_int8" in row["seconds"]:
        row["int8_speedup_vs_jax_int8"] = row["seconds"]["jax_pallas_int8"] / row["seconds"]["jaxpaged_int8"]
        row["int8_device_speedup_vs_jax_int8"] = (row["device_seconds"]["jax_pallas_int8"]
                                                  / row["device_seconds"]["jaxpaged_int8"])
    return row


def _jax_q(q, head_dim):
    """jax's kernel applies no 1 / sqrt(D): its caller scales q (outside the timed call)."""
    return (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)


def _tune_jax(row, name, args, blocks_per_seq, nbytes, reference, tolerance=2e-2):
    """jax's kernel at each setting of JAX_SETTINGS that divides the table and is correct; the fastest kept."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_paged

    best = None
    for ppcb, splits in JAX_SETTINGS:
        if blocks_per_seq % (ppcb * splits):
            continue
        fn = functools.partial(jax_paged, pages_per_compute_block=ppcb, k_splits=splits, num_warps=4, num_stages=3)
        try:
            err = rel_err(fn(*args[0]), reference)
            if err < tolerance:
                seconds = median_time_in_loop(fn, args)
                if best is None or seconds < best[0]:
                    best = (seconds, err, {"pages_per_compute_block": ppcb, "k_splits": splits}, fn)
        except Exception as failure:  # a setting the kernel refuses or Triton can not compile
            print(f"  {name} ppcb={ppcb} k_splits={splits}: {type(failure).__name__}: {str(failure)[:200]}")
    if best is not None:
        row["seconds"][name], row["rel_err"][name], row["jax_settings"][name], fn = best
        row["device_seconds"][name] = device_time(fn, args)[0]
        row["bytes"][name] = nbytes


def capacity(lengths=(1024, 2048, 8192), pool_gib: float = 64.0) -> list[dict]:
    """Sequences of each length that fit `pool_gib` GiB of pool, bfloat16 against 8-bit, for
    llama-1b's K/V (16 layers, 8 kv heads, D 64) and an 8B Llama's (32, 8, 128)."""
    rows = []
    for name, (layers, kv_heads, head_dim) in {"llama-1b": (16, 8, 64), "llama-8b": (32, 8, 128)}.items():
        for length in lengths:
            row = {"model": name, "length": length, "pool_GiB": pool_gib}
            for kv_dtype in (None, *FORMATS):
                one = jp.CacheConfig(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=1,
                                     block_size=BLOCK_SIZE, dtype="bfloat16", kv_dtype=kv_dtype)
                blocks = int(pool_gib * 2**30 // one.bytes_per_block)
                row[kv_dtype or "bfloat16"] = blocks // -(-length // BLOCK_SIZE)
            row["int8_vs_bfloat16"] = row["int8"] / row["bfloat16"]
            rows.append(row)
    return rows


def engine_runs(num_requests: int, pool_gib: float, max_len: int) -> list[dict]:
    """The engine on llama-1b (bfloat16, random weights) on workload A (U[100, max_len] tokens in and
    out) in a pool of `pool_gib` GiB, for bfloat16, int8 and float8 K/V."""
    from flax import nnx

    from jaxpaged.engine.bench import run_engine, summarise, workload_a
    from jaxpaged.models.config import preset
    from jaxpaged.models.llama import MiniLLM

    model = MiniLLM(preset("llama-1b", dtype="bfloat16"), rngs=nnx.Rngs(0))
    prompts, outputs = workload_a(np.random.default_rng(0), num_requests, 100, max_len, 10000)
    rows = []
    for kv_dtype in (None, *FORMATS):
        one = jp.CacheConfig.from_model_config(model.config, num_blocks=1, block_size=BLOCK_SIZE, dtype="bfloat16",
                                               kv_dtype=kv_dtype)
        num_blocks = int(pool_gib * 2**30 // one.bytes_per_block)
        run = run_engine(model, prompts, outputs, dict(num_blocks=num_blocks, max_num_seqs=256,
                                                       kv_dtype=kv_dtype, block_size=BLOCK_SIZE))
        row = {"kv_dtype": kv_dtype or "bfloat16", "num_blocks": num_blocks, **summarise(prompts, run)}
        row["peak_running"] = max(running for _, _, running in run.timeline)
        row["first_tokens"] = [r.outputs[0].token_ids[:8] for r in run.results[:8]]
        rows.append(row)
        print(f"  engine {row['kv_dtype']}: {row['output_tokens_per_second']:.0f} out tok/s, "
              f"peak running {row['peak_running']}, blocks {num_blocks}, preemptions {row['preemptions']}")
    base = rows[0]["output_tokens_per_second"]
    for row in rows:
        row["speedup_vs_bfloat16"] = row["output_tokens_per_second"] / base
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="kv_quant_speed.json")
    parser.add_argument("--quick", action="store_true", help="two small shapes, 16 requests: a smoke test")
    parser.add_argument("--skip-engine", action="store_true", help="attention and capacity only")
    parser.add_argument("--skip-attention", action="store_true", help="capacity and the engine only")
    parser.add_argument("--head-dim", type=int, choices=(64, 128), help="only the decode shapes of this head dim")
    parser.add_argument("--batches", type=int, nargs="+", help="only the decode shapes of these batches")
    parser.add_argument("--pool-gib", type=float, default=1.0, help="the engine's pool, GiB (default 1)")
    parser.add_argument("--num-requests", type=int, default=64, help="the engine's requests (default 64)")
    args = parser.parse_args()
    from jaxpaged.engine.bench import device_name

    device = device_name()
    result = {"device": device, "jax": jax.__version__, "spec_bandwidth_Bps": spec_bandwidth(device),
              "method": __doc__, "decode": [], "capacity": capacity()}
    rng = np.random.default_rng(0)
    shapes = [(8, 2048, 32, 8, 128), (32, 2048, 32, 8, 64)] if args.quick else SHAPES
    shapes = [] if args.skip_attention else [s for s in shapes if args.head_dim in (None, s[-1])
                                             and (args.batches is None or s[0] in args.batches)]
    from tqdm import tqdm

    for batch, context, heads, kv_heads, head_dim in tqdm(shapes, desc="decode shapes"):
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        copies = max(1, min(8, math.ceil(2 * 50 * 2**20 / kv_bytes)))  # past the 50 MB L2
        result["decode"].append(bench_shape(rng, batch, context, heads, kv_heads, head_dim, copies))
        _save(result, args.out)
    if not args.skip_engine:
        result["engine_requests"], result["engine_pool_GiB"] = 16 if args.quick else args.num_requests, args.pool_gib
        result["engine"] = engine_runs(result["engine_requests"], args.pool_gib, 256 if args.quick else 1024)
        _save(result, args.out)
    print_tables(result)


def _save(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def print_tables(result):
    names = ("jaxpaged_bfloat16", "jaxpaged_int8", "jaxpaged_float8_e4m3fn", "jax_pallas_bfloat16", "jax_pallas_int8")
    print(f"\ndecode attention on {result['device']}: GB/s of bytes read (x: speed-up over jaxpaged bfloat16)")
    print("batch context heads     " + "".join(f"{n.replace('jaxpaged_', 'ours ').replace('jax_pallas_', 'jax '):>20}"
                                          for n in names))
    for row in result["decode"]:
        cells = []
        for n in names:
            if n in row["seconds"]:
                cells.append(f"{row['bandwidth_GBps'][n]:7.0f} x{row['speedup_vs_jaxpaged_bfloat16'][n]:4.2f}")
            else:
                cells.append("-")
        print(f"{row['batch']:5} {row['context']:7} {row['heads']}/{row['kv_heads']}/{row['head_dim']:<5}"
              + "".join(f"{c:>20}" for c in cells))
    print("\nours int8 against jax's int8: in the loop, and by device time (µs a call: ours / jax)")
    for row in result["decode"]:
        if "int8_device_speedup_vs_jax_int8" in row:
            device = row["device_seconds"]
            print(f"{row['batch']:5} {row['context']:7} {row['heads']}/{row['kv_heads']}/{row['head_dim']:<5}"
                  f" x{row['int8_speedup_vs_jax_int8']:.2f}  x{row['int8_device_speedup_vs_jax_int8']:.2f}"
                  f"  ({device['jaxpaged_int8'] * 1e6:.1f} / {device['jax_pallas_int8'] * 1e6:.1f})")
    print("\ncapacity: sequences that fit", result["capacity"][0]["pool_GiB"], "GiB")
    for row in result["capacity"]:
        print(f"  {row['model']:9} {row['length']:5}: bf16 {row['bfloat16']:6}  int8 {row['int8']:6}  "
              f"fp8 {row['float8_e4m3fn']:6}  ({row['int8_vs_bfloat16']:.2f}x)")
    for row in result.get("engine", []):
        print(f"engine {row['kv_dtype']:14} {row['output_tokens_per_second']:8.0f} out tok/s  "
              f"x{row['speedup_vs_bfloat16']:.2f}  peak running {row['peak_running']}  preemptions {row['preemptions']}")


if __name__ == "__main__":
    main()

"""Paged attention on the GPU: jaxpaged's kernels against their peers, in one run, on the same shapes.

Decode peers: jax's Pallas paged kernel (`jax.experimental.pallas.ops.gpu.paged_attention`, its
block parameters tuned per shape), XLA gather-then-attend (jaxpaged's reference path), XLA dense
attention over a contiguous cache, and torch's scaled_dot_product_attention over a contiguous cache.
Every sequence holds the full context; block tables are random permutations (fragmented pools).
Times are device time per call: 20 back-to-back calls under the profiler, the durations of all
the kernels and copies they ran on the GPU summed and divided by 20, the same for every path
(torch too, when the profiler sees its kernels; else its wall clock, as the JSON says), so that
neither framework's host dispatch nor launch gaps count. Wall-clock times are recorded beside: for
jaxpaged a jitted loop of 20 dependent calls, for torch 20 back-to-back calls. Inputs rotate over
enough copies to exceed the 50 MB L2 cache. jaxpaged's kernel runs with its defaults (what the
model uses); the best of those and four alternatives (the block gather and the row gather forced,
twice the splits, one kv head a program) is recorded beside.

Effective bandwidth counts the K and V bytes read once. It is reported as a share of the card's
specified bandwidth (ceilings.py; "no spec" for a card missing from its table, and then only the
copy's share), with XLA's device copy (read + write) and read-only sum, measured in the same run,
beside it as peers: a kernel that only reads can pass the copy, so the copy is no ceiling.

Also measured: prefill and chunked prefill (causal, a chunk of T tokens on a cached prefix, prefix 0
for a whole prompt; 32/8/128 and SmolLM2's 9/3/64 heads) tokens/s of jaxpaged's prefill kernel and
of its reference path (gather, then attend), against XLA dense attention and torch SDPA, and for
whole prompts jax's own flash-attention kernels too (cuDNN's through jax.nn, Pallas on Triton and
on Mosaic GPU, their tiles tuned per shape), device time per call as for decode; the cost of the
decode KV write, and the write's in-place update (donation, HLO aliasing, temporary bytes).

Run: python benchmarks/attention.py --out-dir DIR   (add --quick for a small smoke test; --interpret on a CPU;
     --heads 32/8/64 9/3/64 --all-sizes --only decode for the other head shapes at every size;
     --replot JSON to redraw a result's plots against the card's specified bandwidth)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged.attention import attend
from jaxpaged.kernels import launch, paged_decode_attention, paged_prefill_attention
from ceilings import describe, measure, share, spec_bandwidth
from timing import median_time, median_time_in_loop, seconds_per_call

L2_BYTES = 50 * 2**20
JAX_PAGES_PER_BLOCK = (4, 8, 16, 32)  # jax's kernel: pages per compute block,
JAX_K_SPLITS = (1, 2, 4, 8, 16)  # and k splits, tried per shape (`tune_jax_paged`)
# prefill: (batch, cached prefix, chunk) with 32/8/128 heads; prefix 0 is a whole prompt
PREFILL_SHAPES = ((8, 0, 2048), (1, 0, 8192), (8, 1536, 512), (1, 7168, 1024))
# jax's Pallas flash attention (Triton lowering): (block_q, block_k, warps, stages) tried per shape
PREFILL_MHA_SETTINGS = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
                        (64, 128, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3))
# jax's Mosaic GPU flash attention: (block_q, block_kv, max_concurrent_steps) tried per shape
PREFILL_MGPU_SETTINGS = ((64, 64, 2), (64, 128, 2), (128, 64, 2))


def make_inputs(rng, batch, context, heads, kv_heads, head_dim, block_size, copies):
    """`copies` independent sets: q, our pools [1, K, N, P, D] (one layer, jaxpaged's layout), tables,
    lengths, and the layer to read as a device scalar (as a model's traced layer index is: no
    host-to-device copy per call)."""
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    sets = []
    for c in range(copies):
        key = jax.random.key(int(rng.integers(1 << 30)))
        k1, k2, k3 = jax.random.split(key, 3)
        pool_k = jax.random.normal(k1, (1, kv_heads, num_blocks, block_size, head_dim), jnp.bfloat16)
        pool_v = jax.random.normal(k2, (1, kv_heads, num_blocks, block_size, head_dim), jnp.bfloat16)
        q = jax.random.normal(k3, (batch, heads, head_dim), jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(num_blocks).reshape(batch, blocks_per_seq).astype(np.int32))
        sets.append(dict(q=q, pool_k=pool_k, pool_v=pool_v, tables=tables,
                         lengths=jnp.full((batch,), context, jnp.int32), layer=jnp.zeros((), jnp.int32)))
    return sets


def gather_blocks(pool, tables):
    """Layer 0 of a [1, K, N, P, D] pool, the blocks of `tables` [B, M] in order: [B, M * P, K, D]."""
    kv_heads, _, block_size, head_dim = pool.shape[1:]
    k = pool[0][:, tables].reshape(kv_heads, tables.shape[0], tables.shape[1] * block_size, head_dim)
    return jnp.moveaxis(k, 0, 2)


def dense_from_paged(s, block_size):
    """Contiguous [B, S, K, D] copies of the paged K/V (what a contiguous cache would hold)."""
    return gather_blocks(s["pool_k"], s["tables"]), gather_blocks(s["pool_v"], s["tables"])


@jax.jit
def xla_gather_attend(q, pool_k, pool_v, tables, lengths):
    k, v = gather_blocks(pool_k, tables), gather_blocks(pool_v, tables)
    return attend(q[:, None], k, v, (lengths - 1)[:, None], lengths)[:, 0]


@jax.jit
def xla_dense(q, k, v, lengths):
    return attend(q[:, None], k, v, (lengths - 1)[:, None], lengths)[:, 0]


def tune_jax_paged(args, blocks_per_seq, timer, error, interpret=False, tolerance=2e-2):
    """jax's paged kernel tuned over its launch parameters on `args` (a list of its argument tuples):
    every (pages per compute block, k splits) of JAX_PAGES_PER_BLOCK x JAX_K_SPLITS that divides the
    block-table width, with 4 warps and 2 stages, then the best of those with 8 warps and with 3
    stages. (4 warps were 0-10% ahead of the kernel's default 8 at the nine shapes of
    tune_jax_peer_H100.json; 3 stages within 1%.) Returns {(ppcb, k_splits, warps, stages): (seconds,
    error)} of the settings that ran with error(output) < tolerance; timer(fn, args) -> seconds."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_paged

    timed = {}

    def time_setting(ppcb, splits, warps, stages):
        fn = functools.partial(jax_paged, pages_per_compute_block=ppcb, k_splits=splits, num_warps=warps,
                               num_stages=stages, interpret=interpret)
        try:
            err = error(fn(*args[0]))
            if err < tolerance:
                timed[ppcb, splits, warps, stages] = (timer(fn, args), err)
        except Exception as failure:  # a setting the kernel refuses or Triton can not compile
            print(f"  jax paged kernel ppcb={ppcb} k_splits={splits} warps={warps} stages={stages}: "
                  f"{type(failure).__name__}")

    for ppcb in JAX_PAGES_PER_BLOCK:
        for splits in JAX_K_SPLITS:
            if blocks_per_seq % (ppcb * splits) == 0:
                time_setting(ppcb, splits, 4, 2)
    if timed:
        ppcb, splits, _, _ = min(timed, key=timed.get)
        time_setting(ppcb, splits, 8, 2)
        time_setting(ppcb, splits, 4, 3)
    return timed


def bench_decode(rng, batch, context, heads, kv_heads, head_dim, block_size, ceilings, interpret, with_torch):
    def time_jax(fn, args, name=None):
        if interpret:
            return median_time(fn, args)
        seconds, _, kernels = seconds_per_call(fn, args)
        if name:
            row.setdefault("kernels_us_per_call", {})[name] = kernels
        return seconds

    kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
    copies = 1 if interpret else max(1, min(8, math.ceil(2 * L2_BYTES / kv_bytes)))
    sets = make_inputs(rng, batch, context, heads, kv_heads, head_dim, block_size, copies)
    blocks_per_seq = context // block_size
    row = {"batch": batch, "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "block_size": block_size, "kv_bytes": kv_bytes}

    # Correctness first, on the first set: every path against the dense reference.
    s = sets[0]
    dense_k, dense_v = dense_from_paged(s, block_size)
    reference = np.asarray(xla_dense(s["q"].astype(jnp.float32), dense_k.astype(jnp.float32),
                                     dense_v.astype(jnp.float32), s["lengths"]))

    def rel_err(out):
        out = np.asarray(out, np.float32)
        return float(np.linalg.norm(out - reference) / np.linalg.norm(reference)) if np.isfinite(out).all() else float("inf")

    # Ours: the defaults (what the model runs, for this card), and the best of them and four alternatives.
    defaults = launch.decode_launch(batch, heads, kv_heads, head_dim, block_size, blocks_per_seq, 2, launch.this_gpu())
    args = [(x["q"], x["pool_k"], x["pool_v"], x["layer"], x["tables"], x["lengths"]) for x in sets]
    results = {}
    best = None
    for name, params in (("jaxpaged", {}), ("jaxpaged_block_gather", {"row_gather": False}),
                         ("jaxpaged_row_gather", {"row_gather": True}),
                         ("jaxpaged_splits_x2", {"num_splits": 2 * defaults.splits}),
                         ("jaxpaged_one_head_a_program", {"heads_per_program": 1})):
        fn = functools.partial(paged_decode_attention, interpret=interpret, **params)
        err = rel_err(fn(*args[0]))
        results[name] = time_jax(fn, args, None if params else "jaxpaged")
        if not params:
            row["jaxpaged_rel_err"] = err
            row["jaxpaged_defaults"] = dataclasses.asdict(defaults)
            if not interpret:
                row["jaxpaged_wall_seconds_in_jitted_loop"] = median_time_in_loop(fn, args)
        if err < 2e-2 and (best is None or results[name] < best[1]):
            best = (params, results[name])
    row["jaxpaged_best_params"], results["jaxpaged_best"] = best

    # jax's Pallas paged kernel, tuned over its launch parameters.
    # jax's kernel applies no 1/sqrt(D): the caller scales q (outside the timed call).
    args = [((x["q"].astype(jnp.float32) * head_dim**-0.5).astype(x["q"].dtype), x["pool_k"][0], x["pool_v"][0],
             x["tables"], x["lengths"]) for x in sets]  # its pages: [K, N, P, D], our layer 0
    timed = tune_jax_paged(args, blocks_per_seq, time_jax, rel_err, interpret)
    if timed:
        setting = min(timed, key=timed.get)
        results["jax_pallas_paged"], row["jax_pallas_rel_err"] = timed[setting]
        row["jax_pallas_params"] = dict(zip(("pages_per_compute_block", "k_splits", "num_warps", "num_stages"), setting))
        row["jax_pallas_settings_tried"] = len(timed)

    args = [(x["q"], x["pool_k"], x["pool_v"], x["tables"], x["lengths"]) for x in sets]
    row["xla_gather_rel_err"] = rel_err(xla_gather_attend(*args[0]))
    results["xla_gather_attend"] = time_jax(xla_gather_attend, args, "xla_gather_attend")
    dense_sets = [(x["q"], *dense_from_paged(x, block_size), x["lengths"]) for x in sets]
    row["xla_dense_rel_err"] = rel_err(xla_dense(*dense_sets[0]))
    results["xla_dense"] = time_jax(xla_dense, dense_sets, "xla_dense")

    if with_torch:
        import torch
        import torch.nn.functional as F

        from_jax = lambda x: torch.from_dlpack(x)  # noqa: E731  (zero-copy on the same GPU)
        torch_sets = [(from_jax(q)[:, :, None], from_jax(k).transpose(1, 2).contiguous(), from_jax(v).transpose(1, 2).contiguous())
                      for q, k, v, _ in dense_sets]  # [B, H, 1, D], [B, K, S, D]
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        out = sdpa(*torch_sets[0])[:, :, 0].float().cpu().numpy()
        row["torch_sdpa_rel_err"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        sync = lambda _: torch.cuda.synchronize()  # noqa: E731
        results["torch_sdpa"], row["torch_sdpa_timing"], kernels = seconds_per_call(sdpa, torch_sets, sync=sync)
        row.setdefault("kernels_us_per_call", {})["torch_sdpa"] = kernels
        row["torch_sdpa_wall_seconds_back_to_back"] = median_time(sdpa, torch_sets, sync=sync)

    row["seconds"] = results
    row["bandwidth_GBps"] = {name: kv_bytes / sec / 1e9 for name, sec in results.items()}
    ours = kv_bytes / results["jaxpaged"]
    row["fraction_of_spec"] = ceilings["spec_bandwidth_Bps"] and ours / ceilings["spec_bandwidth_Bps"]
    row["fraction_of_copy"] = ours / ceilings["copy_Bps"]  # a peer's rate, which a read-only kernel can pass
    for peer in ("torch_sdpa", "jax_pallas_paged", "xla_gather_attend", "xla_dense"):
        if peer in results:
            row[f"speedup_vs_{peer}"] = results[peer] / results["jaxpaged"]
    return row


def prefill_peers_jax(q, k, v, expected, timer, tolerance=2e-2):
    """jax's own dense causal attention kernels on the same contiguous q, k, v (T = S only): cuDNN's
    flash attention through `jax.nn.dot_product_attention`, jax's Pallas flash attention on the Triton
    lowering (`ops.gpu.attention.mha`, no grouped heads: K and V repeated to H heads beforehand, not
    timed) and on Mosaic GPU (`ops.gpu.attention_mgpu`, Hopper; on float16 copies where it refuses
    bfloat16). The Pallas kernels get the best of their tile settings (PREFILL_MHA_SETTINGS,
    PREFILL_MGPU_SETTINGS). Returns ({name: seconds}, {name: error}, {name: best setting},
    {name: [why each setting failed]}); a peer that fails at every setting has no time."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    def rel_err(out):
        out = np.asarray(out, np.float32)
        return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))

    seconds, errors, settings, failures = {}, {}, {}, {}

    def failed(name, setting, why):
        print(f"  {name} {setting}: {why}")
        failures.setdefault(name, []).append(f"{setting}: {why}")

    def best_of(name, candidates, args):
        for setting, fn in candidates:
            try:
                err = rel_err(fn(*args))
                if err >= tolerance:
                    failed(name, setting, f"relative error {err:.3g}")
                    continue
                sec = timer(fn, [args])
            except Exception as failure:  # a tile the kernel refuses, or no such kernel in this jax
                failed(name, setting, f"{type(failure).__name__}: {str(failure)[:160]}")
                continue
            if name not in seconds or sec < seconds[name]:
                seconds[name], errors[name], settings[name] = sec, err, setting

    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    best_of("jax_cudnn", [("default", cudnn)], (q, k, v))
    group = q.shape[2] // k.shape[2]
    repeated = (q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2))
    scale = 1 / math.sqrt(q.shape[-1])
    best_of("jax_pallas_mha", [
        ((bq, bk, warps, stages), jax.jit(functools.partial(
            pallas_mha.mha, segment_ids=None, sm_scale=scale, causal=True,
            block_sizes=pallas_mha.BlockSizes(block_q=bq, block_k=bk), num_warps=warps, num_stages=stages)))
        for bq, bk, warps, stages in PREFILL_MHA_SETTINGS], repeated)
    del repeated
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except ImportError as failure:
        failed("jax_mosaic_attention", "import", str(failure))
        return seconds, errors, settings, failures
    mosaic = [((bq, bkv, steps), jax.jit(functools.partial(attention_mgpu.attention, config=attention_mgpu.TuningConfig(
        block_q=bq, block_kv=bkv, max_concurrent_steps=steps, causal=True))))
        for bq, bkv, steps in PREFILL_MGPU_SETTINGS]
    best_of("jax_mosaic_attention", mosaic, (q, k, v))
    if "jax_mosaic_attention" not in seconds:  # (jax 0.11.2's kernel refuses bfloat16: float16 copies, exact here)
        best_of("jax_mosaic_attention_float16", mosaic, tuple(x.astype(jnp.float16) for x in (q, k, v)))
    return seconds, errors, settings, failures


def bench_prefill(batch, prefix, chunk, heads, kv_heads, head_dim, block_size, with_peers, interpret):
    """Causal attention of a chunk of `chunk` tokens per sequence on a cached prefix of `prefix`
    (prefix 0: a whole prompt's prefill): tokens/s of the chunk's attention alone. The kernel
    (`interpret`: in Pallas's interpret mode, on a CPU) and the reference path over the same pools."""
    context = prefix + chunk
    config = jp.CacheConfig(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=batch * context // block_size,
                            block_size=block_size, max_seqs=batch, dtype="bfloat16")
    state = jp.init_state(config)
    k = jax.random.normal(jax.random.key(1), (batch, context, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (batch, context, kv_heads, head_dim), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(3), (batch, chunk, heads, head_dim), jnp.bfloat16)
    seq_idx = jnp.arange(batch, dtype=jnp.int32)
    state, _ = jp.append(state, 0, seq_idx, k, v)
    positions = jnp.broadcast_to(prefix + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    lengths = jnp.full((batch,), context, jnp.int32)
    dense = jax.jit(lambda q, k, v: attend(q, k, v, positions, lengths))
    expected = np.asarray(dense(q, k, v), np.float32)
    timer = (lambda fn, args: median_time(fn, args, rounds=3, calls=2)) if interpret else (
        lambda fn, args: seconds_per_call(fn, args)[0])  # device time, as for decode

    def rel_err(out):
        out = np.asarray(out, np.float32)
        return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))

    tables = state.table.block_ids[:batch]
    kernel = jax.jit(lambda q, state: paged_prefill_attention(q, state.pools.k, state.pools.v, 0, tables, lengths, positions,
                                                              interpret=interpret))

    @jax.jit
    def reference(q, state):  # what jp.paged_attention runs without the kernels
        k, v, seq_lens = jp.gather_kv(state, 0, seq_idx, max_len=context)
        return attend(q, k, v, positions, seq_lens)

    results, errors = {}, {}
    for name, fn in (("jaxpaged", kernel), ("jaxpaged_reference", reference)):
        errors[name] = rel_err(fn(q, state))
        results[name] = timer(fn, [(q, state)])
    results["xla_dense"] = timer(dense, [(q, k, v)])
    settings, failures = {}, {}
    if with_peers and prefix == 0:
        seconds, peer_errors, settings, failures = prefill_peers_jax(q, k, v, expected, timer)
        results.update(seconds)
        errors.update(peer_errors)
    if with_peers:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention.bias import causal_lower_right

        tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2).contiguous() for x in (q, k, v))
        # causal with the chunk's last query at the last key (is_causal aligns the first query to the first key)
        mask = {"is_causal": True} if prefix == 0 else {"attn_mask": causal_lower_right(chunk, context)}
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **mask)  # noqa: E731
        errors["torch_sdpa"] = rel_err(sdpa(tq, tk, tv).transpose(1, 2).float().cpu().numpy())
        results["torch_sdpa"] = seconds_per_call(sdpa, [(tq, tk, tv)], sync=lambda _: torch.cuda.synchronize())[0]
    return {"batch": batch, "prefix": prefix, "chunk": chunk, "context": context, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "rel_err_vs_xla_dense": errors, "peer_settings": settings, "peer_failures": failures,
            "tokens_per_s": {name: batch * chunk / sec for name, sec in results.items()}}


def bench_write(batch, context, kv_heads, head_dim, block_size):
    """One decode token per sequence scattered into the pools: time, aliasing, temporary bytes."""
    config = jp.CacheConfig(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=batch * (context // block_size + 1),
                            block_size=block_size, max_seqs=batch, dtype="bfloat16")
    state = jp.init_state(config)
    seq_idx = jnp.arange(batch, dtype=jnp.int32)
    prompt = jnp.ones((batch, context, kv_heads, head_dim), jnp.bfloat16)
    state, _ = jp.append(state, 0, seq_idx, prompt, prompt)
    token = jnp.ones((batch, 1, kv_heads, head_dim), jnp.bfloat16)
    write = jax.jit(lambda state, slots, k: jp.write_slots(state, 0, slots, k, k), donate_argnums=0)
    _, slots, _ = jax.jit(lambda s: jp.allocate_slots(jax.tree.map(jnp.copy, s), seq_idx, jnp.ones((batch,), jnp.int32),
                                                      num_chunk_tokens=1))(state)
    compiled = write.lower(state, slots, token).compile()
    header = compiled.as_text().splitlines()[0]
    memory = compiled.memory_analysis()
    pool_bytes = state.pools.k.nbytes
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            state = write(state, slots, token)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / 20)
    return {"batch": batch, "context": context, "seconds": statistics.median(times), "pool_bytes_each": pool_bytes,
            "pools_aliased": "{0}: (0, {}" in header and "{1}: (1, {}" in header,
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="a few small shapes")
    parser.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode (CPU smoke test)")
    parser.add_argument("--only", choices=("all", "decode", "prefill"), default="all",
                        help="decode: skip prefill and the KV write; prefill: skip the decode sweep")
    parser.add_argument("--heads", nargs="*", default=["32/8/128", "32/8/64", "9/3/64"],
                        help="decode head shapes, query/kv heads/head dim (the first at every size, the others at the large ones)")
    parser.add_argument("--prefill-heads", nargs="*", default=[(32, 8, 128), (9, 3, 64)],
                        type=lambda h: tuple(int(x) for x in h.split("/")),
                        help="prefill head shapes, query/kv heads/head dim (default 32/8/128 9/3/64)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="every head shape at every batch and context (by default only the first)")
    parser.add_argument("--shapes", nargs="+", metavar="BATCHxCONTEXT",
                        help="decode only these sizes, for every head shape (default: batch 1, 8, 32, 128 x context 512, 2048, 8192)")
    parser.add_argument("--tag", default="", help="suffix for the output files")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plots of a result file written before")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot_all(json.load(f), args.replot)
        return
    on_gpu = jax.default_backend() == "gpu"
    with_torch = on_gpu
    rng = np.random.default_rng(0)
    ceilings = measure(2**24 if args.quick else 2**31)
    print(describe(ceilings))

    head_shapes = [(32, 8, 128)] if args.quick else [tuple(int(x) for x in h.split("/")) for h in args.heads]
    batches, contexts = ((1, 4), (128, 256)) if args.quick else ((1, 8, 32, 128), (512, 2048, 8192))
    sizes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes] if args.shapes else [
        (batch, context) for batch in batches for context in contexts]
    decode, prefill, write = [], [], []
    result = {**ceilings, "jax": jax.__version__, "decode": decode, "prefill": prefill, "kv_write": write}
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, f"{'prefill' if args.only == 'prefill' else 'attention'}{args.tag}.json")

    def save():  # after every shape, so that a run stopped by a timeout keeps the shapes it finished
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2, default=str)

    for heads, kv_heads, head_dim in head_shapes if args.only != "prefill" else ():
        for batch, context in sizes:
            large = batch >= 32 and context >= 2048
            if (heads, kv_heads, head_dim) != head_shapes[0] and not (large or args.all_sizes or args.shapes):
                continue  # the other head shapes at the large sizes only
            try:
                row = bench_decode(rng, batch, context, heads, kv_heads, head_dim, 16, ceilings, args.interpret, with_torch)
            except Exception as error:  # report and go on: the other shapes still tell something
                print(f"H{heads}/K{kv_heads}/D{head_dim} B{batch} S{context}: failed: {type(error).__name__}: {error}"[:2000])
                continue
            decode.append(row)
            save()
            bw = row["bandwidth_GBps"]
            fraction, of = share(bw["jaxpaged"] * 1e9, ceilings)
            print(f"H{heads}/K{kv_heads}/D{head_dim} B{batch:>4} S{context:>5}: " + "  ".join(
                f"{name} {bw[name]:7.0f}" for name in bw) + f"  GB/s  (ours {fraction:.0%} of {of})")
    with_prefill = args.only != "decode"
    for heads, kv_heads, head_dim in ([(32, 8, 128)] if args.quick else args.prefill_heads) if with_prefill else ():
        for b, prefix, chunk in ((1, 0, 128), (1, 64, 64)) if args.quick else PREFILL_SHAPES:
            prefill.append(bench_prefill(b, prefix, chunk, heads, kv_heads, head_dim, 16, with_torch, args.interpret))
            save()
    for b, s in (((4, 128),) if args.quick else ((32, 2048), (128, 2048))) if with_prefill else ():
        write.append(bench_write(b, s, 8, 128, 16))
    save()

    print_prefill(prefill)
    for w in write:
        print(f"KV write B{w['batch']}: {w['seconds'] * 1e6:.1f} us, pools aliased in place: {w['pools_aliased']}, "
              f"temporary bytes {w['temp_bytes']} (pool {w['pool_bytes_each']})")
    print_decode(decode, ceilings)
    plot_all(result, json_path)


def print_decode(decode, ceilings):
    """One line per decode shape: ours in GB/s and as a share of the spec (of the measured copy
    where the card has none), ours against each peer (time ratios), the two gathers' ratio."""
    if not decode:
        return
    of = share(1.0, ceilings)[1]
    print(f"\n{describe(ceilings)}")
    print(f"{'shape':<22}{'ours GB/s':>10}{'of ' + of:>9}{'vs sdpa':>9}{'vs jax':>8}{'vs gather':>10}{'vs dense':>9}"
          "  rows/blocks")
    for r in decode:
        name = f"H{r['heads']}K{r['kv_heads']}D{r['head_dim']} B{r['batch']} S{r['context']}"
        sp = lambda k: f"{r.get(k, float('nan')):.2f}x"  # noqa: E731
        print(f"{name:<22}{r['bandwidth_GBps']['jaxpaged']:>10.0f}{share(r['bandwidth_GBps']['jaxpaged'] * 1e9, ceilings)[0]:>9.0%}"
              f"{sp('speedup_vs_torch_sdpa'):>9}{sp('speedup_vs_jax_pallas_paged'):>8}{sp('speedup_vs_xla_gather_attend'):>10}"
              f"{sp('speedup_vs_xla_dense'):>9}  {r['seconds']['jaxpaged_block_gather'] / r['seconds']['jaxpaged_row_gather']:11.2f}")


def ceilings_of(result):
    """The specified bandwidth (looked up again by the card's name, so that files written before
    the spec table read the same) and the copy measured in the run, of a result file."""
    return {"device": result["device"], "spec_bandwidth_Bps": spec_bandwidth(result["device"]),
            "copy_Bps": result.get("copy_Bps") or result["copy_ceiling_Bps"], "sum_Bps": result.get("sum_Bps")}


def plot_all(result, json_path):
    """The decode plot (beside the JSON, .png) and the prefill plot (.png too for a prefill-only
    JSON, else _prefill.png), for whichever the result holds."""
    stem = os.path.splitext(json_path)[0]
    try:
        if result["decode"]:
            plot(result["decode"], stem + ".png", ceilings_of(result))
        if result["prefill"]:
            plot_prefill(result["prefill"], stem + ("_prefill.png" if result["decode"] else ".png"), result["device"])
    except ImportError:
        print("matplotlib not installed: no plot")


def plot_prefill(prefill, path, device):
    """Tokens/s of each prefill path over torch SDPA's (XLA dense's where torch did not run), per shape
    (their absolute rates span 30x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = "torch_sdpa" if all("torch_sdpa" in p["tokens_per_s"] for p in prefill) else "xla_dense"
    paths = [name for name in ("jaxpaged", "jax_cudnn", "jax_pallas_mha", "xla_dense") if name != base]
    labels = [f"{p['heads']}/{p['kv_heads']}/{p['head_dim']}\nB{p['batch']} {p.get('prefix', 0)}+{p.get('chunk', p['context'])}"
              for p in prefill]  # (files written before chunked prefill hold whole prompts, `context` tokens)
    x = np.arange(len(prefill))
    width = 0.2
    plt.figure(figsize=(12, 4.5))
    top = 1.0
    for i, name in enumerate(paths):
        ratios = [p["tokens_per_s"].get(name, 0) / p["tokens_per_s"][base] for p in prefill]
        plt.bar(x + (i - (len(paths) - 1) / 2) * width, ratios, width, label=name)
        top = max(top, *ratios)
    plt.axhline(1.0, color="k", linestyle="--", linewidth=1, label=base)
    plt.ylim(0, top * 1.25)  # room for the legend
    plt.xticks(x, labels, fontsize=8)
    plt.ylabel(f"tokens/s over {base}'s")
    plt.title(f"Causal prefill (cached + chunk tokens), bf16, block 16 — {device} (missing bar: the path takes no cached prefix)",
              fontsize=9)
    plt.legend(fontsize=8, ncol=5)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    print(f"wrote {path}")


def print_prefill(prefill):
    """Millions of tokens/s per prefill shape: jaxpaged's kernel, then each peer's ratio to it."""
    if not prefill:
        return
    names = [name for name in prefill[0]["tokens_per_s"] if name != "jaxpaged"]
    for p in prefill[1:]:
        names += [name for name in p["tokens_per_s"] if name not in names and name != "jaxpaged"]
    print(f"\nprefill, M tokens/s ({', '.join(names)}: ours / theirs)")
    for p in prefill:
        tps = p["tokens_per_s"]
        ratios = "  ".join(f"{tps['jaxpaged'] / tps[n]:.2f}x" if n in tps else "-" for n in names)
        shape = f"{p['heads']}/{p['kv_heads']}/{p['head_dim']} B{p['batch']} prefix {p['prefix']:>5} chunk {p['chunk']:>5}"
        print(f"{shape}: {tps['jaxpaged'] / 1e6:7.2f}   {ratios}")


def plot(decode, path, ceilings):
    """GB/s of every decode path at the first head shape's sizes, the card's specified bandwidth
    (where known) and the XLA copy measured in the run drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, kv_heads, head_dim = (decode[0][key] for key in ("heads", "kv_heads", "head_dim"))  # the first head shape
    rows = [r for r in decode if (r["heads"], r["kv_heads"], r["head_dim"]) == (heads, kv_heads, head_dim)]
    labels = [f"B{r['batch']}\nS{r['context']}" for r in rows]
    peers = ["jaxpaged", "torch_sdpa", "jax_pallas_paged", "xla_gather_attend", "xla_dense"]
    x = np.arange(len(rows))
    width = 0.16
    plt.figure(figsize=(12, 4.5))
    for i, peer in enumerate(peers):
        plt.bar(x + (i - 2) * width, [r["bandwidth_GBps"].get(peer, 0) for r in rows], width, label=peer)
    spec = ceilings["spec_bandwidth_Bps"]
    if spec:
        plt.axhline(spec / 1e9, color="k", linewidth=1.2, label=f"specified {spec / 1e12:.2f} TB/s")
    plt.axhline(ceilings["copy_Bps"] / 1e9, color="k", linestyle="--", linewidth=1, label="XLA copy (read + write), same run")
    plt.ylim(0, (spec or ceilings["copy_Bps"]) / 1e9 * 1.25)  # room for the legend
    plt.xticks(x, labels, fontsize=8)
    plt.ylabel("effective GB/s (K and V bytes / time)")
    plt.title(f"Paged decode attention, {heads} query / {kv_heads} kv heads, head dim {head_dim}, bf16, block 16 — "
              f"{ceilings['device']}" + ("" if spec else " (no spec)"), fontsize=10)
    plt.legend(fontsize=8, ncol=4)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Sweep the paged kernels' launch parameters on the GPU, torch SDPA in the same run; or time the
kernels' defaults against an earlier copy of the kernel file (--previous, with --ab alone).

Decode: for each (batch, context) with 32/8 heads, head dim 128 (or `--heads`, for prefill too), bf16, block 16, GB/s (K and V
bytes over the median time) of the default kernel and of the variants in DECODE_VARIANTS (the block
or the row gather, the products plain or transposed, stages, warps, steps, splits, packed kv heads),
as device time per call (`timing.seconds_per_call`, torch alike) over enough input copies to miss
the L2 cache; the default also as wall clock in a jitted loop.
Prefill: tokens/s (device time per call, torch SDPA causal alike) of the configurations in
PREFILL_CONFIGS: query rows, blocks per step, warps, stages, splits; jax's Pallas flash attention
(Triton lowering) at two tiles beside it, on the same q, K and V.
--previous FILE_OR_MODULE: an earlier copy of the kernel file (same positional signatures, e.g.
benchmarks/kernels_before.py), timed beside with its defaults. With --ab only the two defaults are
timed (no peers, no variants; each twice, in the order new, old, old, new), and a table of their
ratio (new / old throughput: above 1, the new file is faster) ends the output.

Variants timed here once and since removed from the kernels, with the files holding their runs
(under benchmarks/results/): the pools in the layout before, [L, N, P, K, D] (layout="NPKD":
tune_kernels_decode_layout_H100.json, attention_H100*_npkd_pools.json); the loads a step ahead
(prefetch: tune_kernels_decode_H100.json, tune_kernels_decode_transposed_H100.json,
tune_kernels_decode_rows_H100.json); masking only the last step (mask_tail_only:
tune_kernels_decode_tail_mask_H100.json, tune_kernels_decode_H100.json); an evict-first hint on the
K/V loads and V loaded masked as a choice of its own (eviction_policy, masked_loads:
tune_kernels_decode_transposed_H100.json); twice the splits for long contexts (default_launch
before: tune_kernels_decode_rows_H100.json, tune_kernels_decode_layout_H100.json); prefill's block
gather (tune_kernels_prefill_H100.json) and its query blocks in order (light_first:
tune_kernels_prefill_best_H100.json, tune_kernels_prefill_rows_*_H100.json).

Run: python benchmarks/tune_kernels.py --out FILE [--part decode|prefill|all] [--heads 32/8/128]
     [--variants NAME ...] [--options JSON]... [--wall NAME ...] [--shapes 32x2048 ...]
     [--previous FILE_OR_MODULE [--ab]] [--ragged LOW [--longest-first]]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from attention import L2_BYTES, gather_blocks, make_inputs
from jaxpaged.kernels import launch
from jaxpaged.kernels.decode import paged_decode_attention
from jaxpaged.kernels.prefill import paged_prefill_attention
from timing import median_time_in_loop, seconds_per_call

DECODE_SHAPES = [(8, 8192), (32, 2048), (128, 512), (32, 8192), (128, 2048), (128, 8192), (1, 8192), (8, 2048)]
# The A/B against the file before: one split of one step (1 x 512, 1 x 2048, 8 x 512), one program per SM
# (12 x 2048 at 32/8 heads, 32 x 2048 at 9/3), packed kv heads (128 x 512), splits and long contexts.
AB_DECODE_SHAPES = [(1, 512), (1, 2048), (8, 512), (8, 8192), (12, 2048), (32, 2048), (32, 8192), (128, 512),
                    (128, 2048)]
DECODE_VARIANTS = {  # name: options of paged_decode_attention; ("splits_xF", options): F times the default splits
    "default": {},
    "blocks": {"row_gather": False},
    "rows": {"row_gather": True},
    "transposed": {"transposed": True},
    "untransposed": {"transposed": False},
    "one_head_a_program": {"heads_per_program": 1},
    "heads_2": {"heads_per_program": 2},
    "heads_4": {"heads_per_program": 4},
    "stages_2": {"num_stages": 2},
    "stages_5": {"num_stages": 5},
    "stages_7": {"num_stages": 7},
    "warps_8": {"num_warps": 8},
    "blocks_per_step_2": {"blocks_per_step": 2},
    "blocks_per_step_8": {"blocks_per_step": 8},
    "splits_x2": ("splits_x2", {}),
    "splits_x3": ("splits_x3", {}),
    "splits_x4": ("splits_x4", {}),
    **{f"splits_{n}": {"num_splits": n} for n in (1, 2, 4, 6, 8)},  # a fixed number of splits
}
PREFILL_SHAPES = [(8, 0, 2048), (1, 0, 8192)]  # (batch, cached prefix, chunk); prefix 0: a whole prompt
AB_PREFILL_SHAPES = [(8, 0, 2048), (1, 0, 8192), (1, 7168, 1024)]  # the last in splits
PREFILL_CONFIGS = {  # name: options of paged_prefill_attention
    "default": {},
    "rows128_bps8_warps8_stages2": {"query_rows": 128, "blocks_per_step": 8, "num_warps": 8, "num_stages": 2},
    "rows128_bps4_warps8_stages3": {"query_rows": 128, "blocks_per_step": 4, "num_warps": 8, "num_stages": 3},
    "rows64_bps4_warps4_stages2": {"query_rows": 64, "blocks_per_step": 4, "num_warps": 4, "num_stages": 2},
    "rows64_bps8_warps4_stages2": {"query_rows": 64, "blocks_per_step": 8, "num_warps": 4, "num_stages": 2},
    "rows64_bps4_warps4_stages4": {"query_rows": 64, "blocks_per_step": 4, "num_warps": 4, "num_stages": 4},
    "splits1": {"num_splits": 1},
    "splits2": {"num_splits": 2},
    "splits4": {"num_splits": 4},
    "splits8": {"num_splits": 8},
}
# Variants timed as kernel options, then folded into the kernel or dropped (their options are gone; results
# in tune_kernels_prefill_{ids,q,loop,best}_H100.json): K/V rows from the step's block ids, and found a step
# ahead; q gathered as rows; V rows past the length loaded as zeros; all kept. One loop of masked steps, and
# the output stored as rows: dropped. The masked steps in the main loop with the masking behind a branch
# (`one_loop`, tune_kernels_prefill_one_loop_*_H100.json): 0.55-0.72x, dropped.
# jax's Pallas flash attention on the same q, K and V (contiguous, K and V repeated to the query heads):
# (block_q, block_k, warps, stages); 64, 64, 4, 3 was its best of eight at 32/8/128 (prefill_attention_H100*.json)
PREFILL_JAX_MHA = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2))
# (128 rows x 8 blocks, 8 warps, 2 stages, the default, compiles for sm_90 with register spills and 4 blocks
# without: kernel_asm.py)


def load_previous(name: str):
    """An earlier kernel file, by path (benchmarks/kernels_before.py) or module name (kernels_before)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location("previous_kernels", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_sdpa_time(sets, causal=False):
    import torch
    import torch.nn.functional as F

    def to_torch(x, seq_axis_first):
        t = torch.from_dlpack(x)
        return t.transpose(1, 2).contiguous() if seq_axis_first else t

    if causal and sets[0][0].shape[1] != sets[0][1].shape[1]:  # a chunk on a cached prefix: lower-right causal
        from torch.nn.attention.bias import causal_lower_right

        mask = {"attn_mask": causal_lower_right(sets[0][0].shape[1], sets[0][1].shape[1])}
    else:
        mask = {"is_causal": causal}
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **mask)  # noqa: E731
    torch_sets = [tuple(to_torch(x, True) for x in s) for s in sets]
    return seconds_per_call(sdpa, torch_sets, sync=lambda _: torch.cuda.synchronize())[0]


def _time_ab(record, new, old, args):
    """The new defaults and the old file's, each timed twice (new, old, old, new); the means kept."""
    for name, fn in (("default", new), ("previous_kernel", old), ("previous_kernel", old), ("default", new)):
        record(name, fn, args=args)


def ragged_lengths(rng, batch: int, low: int, high: int, longest_first: bool) -> np.ndarray:
    """[B] lengths drawn from U[low, high] (a running batch's, as the engine's workload A has them),
    the rows longest first or as drawn."""
    lengths = rng.integers(low, high + 1, batch).astype(np.int32)
    return np.sort(lengths)[::-1].copy() if longest_first else lengths


def tune_decode(rng, old_kernel, heads=32, kv_heads=8, head_dim=128, variants=None, shapes=DECODE_SHAPES,
                wall_variants=(), ab=False, ragged=None, longest_first=False):
    """ragged: None, or the shortest length: each row's length drawn from U[ragged, context]
    (`ragged_lengths`, rows longest first with longest_first), K/V bytes counted from them, and no
    torch peer (it would read every row's whole context)."""
    rows = []
    for batch, context in shapes:
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        copies = max(1, min(8, math.ceil(2 * L2_BYTES / kv_bytes)))
        sets = make_inputs(rng, batch, context, heads, kv_heads, head_dim, 16, copies)
        if ragged is not None:
            for s in sets:
                s["lengths"] = jnp.asarray(ragged_lengths(rng, batch, ragged, context, longest_first))
            kv_bytes = 2 * int(np.mean([s["lengths"].sum() for s in sets])) * kv_heads * head_dim * 2
        args = [(s["q"], s["pool_k"], s["pool_v"], s["layer"], s["tables"], s["lengths"]) for s in sets]
        reference = np.asarray(paged_decode_attention(*args[0]), np.float32)
        plan = launch.decode_launch(batch, heads, kv_heads, head_dim, 16, context // 16, 2, launch.this_gpu())
        result = {"heads": f"{heads}/{kv_heads}/{head_dim}", "batch": batch, "context": context, "kv_bytes": kv_bytes,
                  **({"ragged_from": ragged, "longest_first": longest_first} if ragged is not None else {}),
                  "defaults": {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}, "GBps": {}}
        times = {}

        def record(name, fn, timer=seconds_per_call, args=args):
            try:
                out = np.asarray(fn(*args[0]), np.float32)
                err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                seconds, *kernels = timer(fn, args)
            except Exception as error:  # a configuration Triton can not compile
                print(f"  B{batch} S{context} {name}: {type(error).__name__}: {str(error)[:200]}")
                return
            times.setdefault(name, []).append(seconds)
            result["GBps"][name] = kv_bytes / np.mean(times[name]) / 1e9
            if kernels:
                result.setdefault("kernels_us_per_call", {})[name] = kernels[-1]
            result.setdefault("rel_err_vs_default", {})[name] = err

        if ab:
            _time_ab(record, paged_decode_attention, old_kernel.paged_decode_attention, args)
            rows.append(result)
            print(f"B{batch:>4} S{context:>5}: " + "  ".join(f"{k} {v:.0f}" for k, v in result["GBps"].items()), flush=True)
            continue
        for name, options in DECODE_VARIANTS.items():
            if variants and name not in variants:
                continue
            if isinstance(options, tuple):  # a multiple of the default splits ("splits_xF")
                factor = int(options[0].rsplit("x", 1)[1])
                options = {**options[1], "num_splits": plan.splits * factor}
            if options.get("num_splits", 0) > context // 16 // plan.blocks_per_step:
                continue
            fn = functools.partial(paged_decode_attention, **options)
            record(name, fn)
            if name in wall_variants:
                record(f"{name}_wall_in_jitted_loop", fn, timer=lambda fn, args: (median_time_in_loop(fn, args),))
        record("default_wall_in_jitted_loop", paged_decode_attention,
               timer=lambda fn, args: (median_time_in_loop(fn, args),))
        if old_kernel is not None:  # an earlier kernel file with the same signature, its defaults
            record("previous_kernel", old_kernel.paged_decode_attention)
        if ragged is None:
            dense = [(s["q"][:, :, None], gather_blocks(s["pool_k"], s["tables"]), gather_blocks(s["pool_v"], s["tables"]))
                     for s in sets]
            result["GBps"]["torch_sdpa"] = kv_bytes / _torch_sdpa_time([(q.transpose(0, 2, 1, 3), k, v) for q, k, v in dense]) / 1e9
            del dense
        rows.append(result)
        gbps = result["GBps"]
        print(f"B{batch:>4} S{context:>5}: " + "  ".join(f"{k} {v:.0f}" for k, v in gbps.items()), flush=True)
    return rows


def _jax_mha(q, k, v, block_q, block_k, num_warps, num_stages):
    """jax's Pallas flash attention (Triton lowering), causal, on [B, S, H, D]; K and V have H heads."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    return pallas_mha.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, num_warps=num_warps,
                          num_stages=num_stages, block_sizes=pallas_mha.BlockSizes(block_q=block_q, block_k=block_k))


def prefill_inputs(batch, prefix, chunk, heads, kv_heads, head_dim):
    """Random bf16 q [B, T, H, D] and K, V [B, S, K, D] (S = prefix + chunk) appended to block-16 pools.

    Returns (q, k, v, kernel_args): kernel_args are paged_prefill_attention's positional arguments.
    """
    import jaxpaged as jp

    context = prefix + chunk
    config = jp.CacheConfig(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=batch * context // 16,
                            block_size=16, max_seqs=batch, dtype="bfloat16")
    state = jp.init_state(config)
    keys = jax.random.split(jax.random.key(batch), 3)
    k = jax.random.normal(keys[0], (batch, context, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[1], (batch, context, kv_heads, head_dim), jnp.bfloat16)
    q = jax.random.normal(keys[2], (batch, chunk, heads, head_dim), jnp.bfloat16)
    state, _ = jp.append(state, 0, jnp.arange(batch, dtype=jnp.int32), k, v)
    tables = state.table.block_ids[:batch]
    lengths = jnp.full((batch,), context, jnp.int32)
    positions = jnp.broadcast_to(prefix + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    return q, k, v, (q, state.pools.k, state.pools.v, 0, tables, lengths, positions)


def tune_prefill(old_kernel, configs=None, heads=32, kv_heads=8, head_dim=128, shapes=PREFILL_SHAPES, ab=False):
    rows = []
    for batch, prefix, chunk in shapes:
        context = prefix + chunk
        q, k, v, kernel_args = prefill_inputs(batch, prefix, chunk, heads, kv_heads, head_dim)
        args = [kernel_args]
        result = {"batch": batch, "prefix": prefix, "chunk": chunk, "context": context, "heads": heads,
                  "kv_heads": kv_heads, "head_dim": head_dim, "tokens_per_s": {}}
        reference = None
        times = {}
        if ab:
            kernels = [("default", paged_prefill_attention), ("previous_kernel", old_kernel.paged_prefill_attention),
                       ("previous_kernel", old_kernel.paged_prefill_attention), ("default", paged_prefill_attention)]
        else:
            kernels = [(name, functools.partial(paged_prefill_attention, **options))
                       for name, options in PREFILL_CONFIGS.items() if configs is None or name in configs]
            if old_kernel is not None:  # an earlier kernel file with the same signature, its defaults
                kernels.append(("previous_kernel", old_kernel.paged_prefill_attention))
        for name, fn in kernels:
            try:
                out = np.asarray(fn(*args[0]), np.float32)
                reference = out if reference is None else reference
                err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                seconds, _, top = seconds_per_call(fn, args)
            except Exception as error:
                print(f"  prefill B{batch} S{prefix}+{chunk} {name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            times.setdefault(name, []).append(seconds)
            result["tokens_per_s"][name] = batch * chunk / np.mean(times[name])
            result.setdefault("rel_err_vs_first", {})[name] = err
            result.setdefault("kernels_us_per_call", {})[name] = top
        group = heads // kv_heads
        repeated = (q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2))  # its K and V at H heads, not timed
        for tile in PREFILL_JAX_MHA if prefix == 0 and not ab else ():  # (its causal mask takes no cached prefix)
            fn = jax.jit(functools.partial(_jax_mha, **dict(zip(("block_q", "block_k", "num_warps", "num_stages"), tile))))
            name = "jax_mha_" + "_".join(map(str, tile))
            try:
                out = np.asarray(fn(*repeated), np.float32)
                result.setdefault("rel_err_vs_first", {})[name] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                seconds, _, top = seconds_per_call(fn, [repeated])
            except Exception as error:
                print(f"  prefill B{batch} S{prefix}+{chunk} {name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            result["tokens_per_s"][name] = batch * chunk / seconds
            result.setdefault("kernels_us_per_call", {})[name] = top
        del repeated
        if not ab:
            result["tokens_per_s"]["torch_sdpa"] = batch * chunk / _torch_sdpa_time([(q, k, v)], causal=True)
        rows.append(result)
        print(f"prefill {heads}/{kv_heads}/{head_dim} B{batch} S{prefix}+{chunk}: " + "  ".join(f"{k} {v / 1e6:.2f}M" for k, v in result["tokens_per_s"].items()),
              flush=True)
    return rows


def ab_table(result) -> str:
    """The A/B's table: per shape, the new defaults' throughput over the old file's (above 1: faster),
    and the relative difference of their outputs."""
    lines = [f"{'kernel':8} {'heads':>9} {'shape':>14} {'new':>13} {'old':>13} {'new/old':>8} {'out diff':>9}"]
    for row in result.get("decode", []):
        new, old = row["GBps"].get("default"), row["GBps"].get("previous_kernel")
        if new and old:
            diff = row["rel_err_vs_default"]["previous_kernel"]
            lines.append(f"{'decode':8} {row['heads']:>9} {row['batch']:>6}x{row['context']:<7} {new:8.0f} GB/s "
                         f"{old:8.0f} GB/s {new / old:8.3f} {diff:9.1e}")
    for row in result.get("prefill", []):
        new, old = row["tokens_per_s"].get("default"), row["tokens_per_s"].get("previous_kernel")
        if new and old:
            heads = f"{row['heads']}/{row['kv_heads']}/{row['head_dim']}"
            shape = f"{row['batch']}x{row['prefix']}+{row['chunk']}"
            diff = row["rel_err_vs_first"]["previous_kernel"]
            lines.append(f"{'prefill':8} {heads:>9} {shape:>14} {new / 1e6:7.2f} Mtok/s {old / 1e6:7.2f} Mtok/s "
                         f"{new / old:8.3f} {diff:9.1e}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/tune_kernels.json")
    parser.add_argument("--part", choices=("decode", "prefill", "all"), default="all")
    parser.add_argument("--heads", default="32/8/128", help="head shape: query heads/kv heads/head dim")
    parser.add_argument("--previous", metavar="FILE_OR_MODULE",
                        help="an earlier kernel file (a path ending in .py, or a module name) to time beside the current one")
    parser.add_argument("--ab", action="store_true",
                        help="with --previous: time only both files' defaults (at AB_DECODE_SHAPES and AB_PREFILL_SHAPES "
                             "unless --shapes / --prefill-shapes) and print their ratio per shape")
    parser.add_argument("--variants", nargs="+", choices=list(DECODE_VARIANTS), metavar="NAME",
                        help="decode variants to time (default all; names in DECODE_VARIANTS)")
    parser.add_argument("--options", action="append", default=[], metavar="JSON",
                        help="a further decode variant as keyword arguments of paged_decode_attention, named by its "
                             "text (repeatable)")
    parser.add_argument("--wall", nargs="+", default=[], choices=list(DECODE_VARIANTS), metavar="NAME",
                        help="variants also timed as wall clock in a jitted loop (launches and gaps included)")
    parser.add_argument("--shapes", nargs="+", help="decode shapes as BATCHxCONTEXT (default: the eight in DECODE_SHAPES)")
    parser.add_argument("--ragged", type=int, metavar="LOW",
                        help="decode rows of U[LOW, CONTEXT] positions each (no torch peer)")
    parser.add_argument("--longest-first", action="store_true", help="with --ragged: the rows longest first")
    parser.add_argument("--prefill-configs", nargs="+", choices=list(PREFILL_CONFIGS), metavar="NAME",
                        help="prefill configurations to time (default all; names in PREFILL_CONFIGS)")
    parser.add_argument("--prefill-shapes", nargs="+", metavar="BxPREFIX+CHUNK",
                        help="prefill shapes, e.g. 1x7168+1024 (default 8x0+2048 1x0+8192)")
    args = parser.parse_args()
    if args.ab and not args.previous:
        parser.error("--ab needs --previous")
    old_kernel = load_previous(args.previous) if args.previous else None
    rng = np.random.default_rng(0)
    for text in args.options:
        DECODE_VARIANTS[text] = json.loads(text)
    variants = args.variants + args.options if args.variants else None
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "gpu": dataclasses.asdict(launch.this_gpu())}
    heads, kv_heads, head_dim = (int(x) for x in args.heads.split("/"))
    if args.part in ("decode", "all"):
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes] if args.shapes else (
            AB_DECODE_SHAPES if args.ab else DECODE_SHAPES)
        result["decode"] = tune_decode(rng, old_kernel, heads, kv_heads, head_dim, variants, shapes, args.wall, args.ab,
                                       args.ragged, args.longest_first)
    if args.part in ("prefill", "all"):
        shapes = [tuple(int(x) for x in re.split(r"[x+]", shape)) for shape in args.prefill_shapes or []] or (
            AB_PREFILL_SHAPES if args.ab else PREFILL_SHAPES)
        result["prefill"] = tune_prefill(old_kernel, args.prefill_configs, heads, kv_heads, head_dim, shapes, args.ab)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.previous:
        print(ab_table(result))


if __name__ == "__main__":
    main()

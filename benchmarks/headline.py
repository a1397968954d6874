"""The tables of BENCHMARKS.md and benchmarks/NOTES.md, computed from the result JSONs they name.

Every bandwidth is reported as a share of the card's specified bandwidth (ceilings.py), with
XLA's device copy measured in the same run beside it as a peer; the decode roofline of generation
likewise (a step's bytes, recovered from the JSON, at the specified bandwidth, over the measured step
time). Each table says which JSON it comes from, so every figure in the docs can be traced and
recomputed: `--check` fails where a table printed here is missing from the docs, word for word.

Run: python benchmarks/headline.py [--results benchmarks/results] [--check BENCHMARKS.md benchmarks/NOTES.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ceilings import spec_bandwidth

MIB = 2**20
# The current results, per area; older runs of the same benchmarks are in results/archive/.
DECODE_H100 = (("attention_H100.json", (32, 8, 128)), ("attention_H100_32_8_64.json", (32, 8, 64)),
               ("attention_H100_d64.json", (9, 3, 64)))
DECODE_H200 = "attention_H200.json"  # the current kernels, nine headline shapes
PREFILL = "prefill_attention_H200.json"
MEMORY = "memory.json"
KV_QUANT_SPEED = "kv_quant_speed_H200.json"
# SmolLM2 on 8-bit caches, --int8-products: the decode kernel's default on int8 pools beside the caches' own rows
KV_QUANT_ACCURACY = "kv_quant_smollm2_int8_products_CPU.json"
KV_QUANT_UNROTATED = "archive/kv_quant_smollm2_unrotated_CPU.json"  # K stored as it is, before the rotation
KV_QUANT_NO_EXCESS = "kv_quant_smollm2_no_excess_precision_CPU.json"  # XLA_FLAGS=--xla_allow_excess_precision=false
# The engine (llama-1b): A, C and the static peer in one run; A with the launcher on and off and the
# transformers peer in the run before; B on the engine before packing (NOTES.md)
ENGINE_AC, ENGINE_A, ENGINE_B = ("engine_llama-1b_AC_H200.json", "engine_llama-1b_A_H200.json",
                                 "engine_llama-1b_B_H200.json")
ENGINE_AC_BEFORE = "archive/engine_llama-1b_AC_no_warm_up_16_steps_H200.json"  # programs compiled as met
ENGINE_B_BEFORE = "archive/engine_llama-1b_B_before_tiles_H200.json"
ENGINE_PEERS_READ = "archive/engine_llama-1b_A_peers_inactive_rows_read_H200.json"  # inactive decode rows still read
ENGINE_QWEN3_READ = "archive/engine_qwen3-0.6b_A_peers_inactive_rows_read_H200.json"
ENGINE_LATER = "archive/engine_llama-1b_AC_three_quarter_rows_H200.json"  # a variant measured, then reverted
ENGINE_ROWS = "archive/engine_llama-1b_AC_rows_H200.json"  # before packed prefill in tiles: chunks in [Bp, T] rows
ENGINE_PEERS = "engine_llama-1b_A_peers_H200.json"  # A with the static generate and transformers in one run
ENGINE_PEERS_8 = "engine_llama-1b_A_peers_8_compile_threads_H200.json"  # the same code, warm-up at 8 threads
ENGINE_PEERS_SEPARATE = "archive/engine_llama-1b_A_peers_separate_projections_H200.json"  # the session before
ENGINE_PEERS_16 = "archive/engine_llama-1b_A_peers_16_steps_H200.json"  # the same, 16 decode steps a call
ENGINE_PEERS_BEFORE = "archive/engine_llama-1b_A_peers_one_by_one_H200.json"  # the same, every program unrolled
ENGINE_SCANNED = "engine_llama-1b_A_scanned_prefill_H200.json"  # prefill calls scanned: every program ahead in 58 s
ENGINE_QWEN3 = "engine_qwen3-0.6b_A_peers_H200.json"  # A on qwen3-0.6b with both peers
ENGINE_STEPS = "engine_llama-1b_A_decode_steps_H200.json"  # A at 16, 32, 64 and 128 decode steps a call
ENGINE_MODELS = (("qwen3-0.6b", "engine_qwen3-0.6b_A_H200.json"), ("llama-8b", "engine_llama-8b_A_H200.json"))
SERVE = "serve_llama-1b_H200.json"
SERVE_BEFORE = "archive/serve_llama-1b_before_warm_up_H200.json"  # the first server run
TP_BASELINE = "generate_llama-8b_tp1_H200.json"  # llama-8b on one GPU: the tensor-parallel runs' baseline
IDLE_BEFORE_WAITING = {ENGINE_A}  # runs whose launcher did not yet wait for the device: no idle share
# (model, JSON with the kernels, JSON of the same call with the reference attention or None, its batches)
GENERATION = (
    ("llama-1b", "generate_llama-1b_b1_linear_ab_current_H100.json", None, (1,)),
    ("llama-1b", "generate_llama-1b_H100.json", "generate_llama-1b_H100_reference_attention.json", (32, 128)),
    ("smollm2-135m-random", "generate_smollm2-135m-random_b1_linear_ab_current_H100.json", None, (1,)),
    ("smollm2-135m-random", "generate_smollm2-135m-random_H100.json",
     "generate_smollm2-135m-random_H100_reference_attention.json", (32, 128)),
)
# Every row of those runs, and the batch-1 runs before the two-row projections (NOTES.md)
GENERATION_RUNS = tuple((model, kernels, reference, (1, 32, 128)) for model, kernels, reference, _ in GENERATION
                        if reference) + tuple((model, f"generate_{model}_b1_linear_ab_{which}_H100.json", None, (1,))
                                              for model in ("llama-1b", "smollm2-135m-random")
                                              for which in ("before", "current"))


def load(results, name):
    with open(os.path.join(results, name)) as f:
        return json.load(f)


def copy_bps(result):
    """The XLA copy's bytes/s measured in the run (named copy_ceiling_Bps in files written before)."""
    return result.get("copy_Bps") or result.get("copy_ceiling_Bps")


def card_line(result, source):
    """The card, its specified bandwidth and the copy measured in the run, and where they come from."""
    spec = spec_bandwidth(result["device"])
    copy = copy_bps(result)
    spec_text = f"specified {spec / 1e12:.2f} TB/s" if spec else "no spec for this card"
    copy_text = f"XLA copy in the same run {copy / 1e12:.2f} TB/s (read + write" + (
        f", {copy / spec:.0%} of spec)" if spec else ")")
    return f"*{result['device']}, jax {result['jax']}; {spec_text}; {copy_text}. Source: `{source}`.*"


def markdown(header, rows):
    """A markdown table: a header of (title, align) pairs, align "l" or "r"."""
    lines = ["| " + " | ".join(title for title, _ in header) + " |",
             "|" + "|".join("---" if align == "l" else "--:" for _, align in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(x):
    return f"{x:.2f}x" if x is not None else "—"


def percent(x):
    return f"{x:.0%}" if x is not None else "—"


def decode_table(rows, spec, full=False):
    """Decode rows of attention.py: ours and torch SDPA in GB/s and as a share of the spec, ours
    against every peer (time ratios); `full` adds the kernel's own A/B columns and wall clock."""
    header = [("heads/kv/dim", "l"), ("batch", "r"), ("context", "r"), ("ours GB/s", "r"), ("of spec", "r"),
              ("torch SDPA GB/s", "r"), ("of spec", "r"), ("vs torch SDPA", "r"), ("vs jax Pallas paged", "r"),
              ("vs XLA gather+attend", "r"), ("vs XLA dense", "r")]
    if full:
        header += [("rows / blocks", "r"), ("KNPD / NPKD", "r"), ("one kv head / default", "r"),
                   ("wall GB/s, ours / torch", "r")]
    table = []
    for r in rows:
        bw, sec = r["bandwidth_GBps"], r["seconds"]
        of_spec = lambda name: percent(bw[name] * 1e9 / spec) if spec and name in bw else "—"  # noqa: E731
        line = [f"{r['heads']}/{r['kv_heads']}/{r['head_dim']}", r["batch"], r["context"], f"{bw['jaxpaged']:,.0f}",
                of_spec("jaxpaged"), f"{bw['torch_sdpa']:,.0f}" if "torch_sdpa" in bw else "—", of_spec("torch_sdpa")]
        line += [ratio(sec[peer] / sec["jaxpaged"] if peer in sec else None)
                 for peer in ("torch_sdpa", "jax_pallas_paged", "xla_gather_attend", "xla_dense")]
        if full:
            gathers = ("jaxpaged_block_gather", "jaxpaged_row_gather")
            line.append(ratio(sec[gathers[0]] / sec[gathers[1]] if all(g in sec for g in gathers) else None))
            for variant in ("jaxpaged_npkd_layout", "jaxpaged_one_head_a_program"):
                line.append(ratio(sec[variant] / sec["jaxpaged"] if variant in sec else None))
            wall = r.get("jaxpaged_wall_seconds_in_jitted_loop"), r.get("torch_sdpa_wall_seconds_back_to_back")
            line.append(" / ".join(f"{r['kv_bytes'] / w / 1e9:,.0f}" if w else "—" for w in wall))
        table.append(line)
    return markdown(header, table)


def headline_decode(results, full=False):
    """The decode tables on the H200 (the current kernels, nine shapes) and on the H100 (every size)."""
    sections = []
    picked = []
    for name, heads in DECODE_H100:
        result = load(results, name)
        rows = [r for r in result["decode"] if (r["heads"], r["kv_heads"], r["head_dim"]) == heads]
        if not full and heads != (32, 8, 128):  # the other head shapes at the large sizes only
            rows = [r for r in rows if r["batch"] >= 32 and r["context"] >= 2048]
        picked.append((name, result, rows))
    lines = [card_line(result, f"benchmarks/results/{name}") for name, result, _ in picked]
    spec = spec_bandwidth(picked[0][1]["device"])
    sections.append("\n".join(lines) + "\n\n" + decode_table([r for *_, rows in picked for r in rows], spec, full))
    h200 = load(results, DECODE_H200)
    sections.insert(0, card_line(h200, f"benchmarks/results/{DECODE_H200}") + "\n\n"
                    + decode_table(h200["decode"], spec_bandwidth(h200["device"]), full))
    return sections


def headline_prefill(results):
    """Millions of tokens/s of causal prefill, ours against torch SDPA and jax's kernels."""
    result = load(results, PREFILL)
    header = [("heads", "l"), ("batch x (cached + chunk)", "l"), ("jaxpaged", "r"), ("torch SDPA", "r"),
              ("jax cuDNN (`jax.nn`)", "r"), ("jax Pallas (Triton)", "r"), ("XLA dense", "r"), ("vs torch", "r"),
              ("vs best jax", "r")]
    table = []
    for p in result["prefill"]:
        tps = p["tokens_per_s"]
        best_jax = max(tps[name] for name in ("jax_cudnn", "jax_pallas_mha", "xla_dense") if name in tps)
        cells = [f"{tps[name] / 1e6:.2f}" if name in tps else "—"
                 for name in ("torch_sdpa", "jax_cudnn", "jax_pallas_mha", "xla_dense")]
        table.append([f"{p['heads']}/{p['kv_heads']}/{p['head_dim']}", f"{p['batch']} x ({p['prefix']} + {p['chunk']})",
                      f"**{tps['jaxpaged'] / 1e6:.2f}**", *cells, ratio(tps["jaxpaged"] / tps["torch_sdpa"]),
                      ratio(tps["jaxpaged"] / best_jax)])
    source = f"*{result['device']}, jax {result['jax']}. Source: `benchmarks/results/{PREFILL}`.*"
    return [source + "\n\n" + markdown(header, table)]


def roofline(result, row, tokens_per_s, bandwidth=None):
    """The decode step's bytes at `bandwidth` (default the card's specified one; None without a
    spec) over the step's measured time. Files written before held the step's floor at the
    measured copy's rate, from which the bytes follow."""
    bandwidth = bandwidth or spec_bandwidth(result["device"])
    step_bytes = row.get("decode_step_bytes") or row["decode_step_floor_ms"] / 1e3 * copy_bps(result)
    return bandwidth and step_bytes / bandwidth * tokens_per_s / row["batch"]


def headline_generation(results, full=False):
    """Decode tokens/s of batched generation, paged against contiguous, kernels and reference;
    `full`: every row of the runs, the roofline at the copy's measured rate beside."""
    header = [("model", "l"), ("batch", "r"), ("paged (kernels)", "r"), ("contiguous", "r"), ("ratio", "r"),
              ("paged (reference attention)", "r"), ("contiguous", "r"), ("ratio", "r"),
              ("roofline of spec, paged (kernels)", "r")] + [("roofline at the XLA copy", "r")] * full + [("source", "l")]
    table, devices = [], set()
    for model, kernels_json, reference_json, batches in GENERATION_RUNS if full else GENERATION:
        kernels = load(results, kernels_json)
        reference = load(results, reference_json) if reference_json else None
        devices.add((kernels["device"], kernels["jax"]))
        for row in (r for r in kernels["rows"] if r["batch"] in batches):
            ref = next((r for r in reference["rows"] if r["batch"] == row["batch"]), None) if reference else None
            paged, dense = row["paged_decode_tokens_per_s"], row["contiguous_decode_tokens_per_s"]
            cells = [f"{ref['paged_decode_tokens_per_s']:,.0f}", f"{ref['contiguous_decode_tokens_per_s']:,.0f}",
                     ratio(ref["decode_ratio_paged_over_contiguous"])] if ref else ["—"] * 3
            sources = f"`{kernels_json}`" + (f", `{reference_json}`" if ref else "")
            fractions = [roofline(kernels, row, paged)] + [roofline(kernels, row, paged, copy_bps(kernels))] * full
            table.append([model, row["batch"], f"{paged:,.0f}", f"{dense:,.0f}", ratio(paged / dense), *cells,
                          *map(percent, fractions), sources])
    cards = "; ".join(f"{device}, jax {jax}" for device, jax in sorted(devices))
    spec = spec_bandwidth(sorted(devices)[0][0])
    note = f"*{cards}; specified {spec / 1e12:.2f} TB/s. Sources in `benchmarks/results/`.*" if spec else f"*{cards}.*"
    return [note + "\n\n" + markdown(header, table)]


def headline_memory(results):
    """Bytes of the paged cache against contiguous preallocation, read back from real caches."""
    result = load(results, MEMORY)
    header = [("setting", "l"), ("cache", "l"), ("block size", "r"), ("reserved / needed MiB", "r"), ("live MiB", "r"),
              ("saving", "r"), ("internal fragmentation", "r")]
    settings = (("seed: 4 seqs, 16 x 8 x 64, fp32", result["seed_setting"]),
                ("mixed lengths: 16 seqs, SmolLM2 shape, bf16", result["mixed_lengths"]["rows"]))
    table = [[setting, r["cache"], r["block_size"] if r["cache"] == "paged" else "—", f"{r['bytes_needed'] / MIB:.2f}",
              f"{r['bytes_live'] / MIB:.2f}", f"{r['saving_vs_contiguous']:.1%}" if r["cache"] == "paged" else "—",
              f"{r['fragmentation']:.1%}"] for setting, rows in settings for r in rows]
    return [f"*Bytes, not speed: the same on any device. Source: `benchmarks/results/{MEMORY}`.*\n\n"
            + markdown(header, table)]


def headline_kv_quant(results):
    """8-bit K/V: decode attention time against our bfloat16 kernel and jax's paged kernel (int8 and
    bfloat16), capacity and the engine in a fixed pool (one GPU run), and accuracy (CPU)."""
    speed = load(results, KV_QUANT_SPEED)
    us = lambda row, name: row["seconds"][name] * 1e6  # noqa: E731
    header = [("batch x context, heads", "l"), ("ours bfloat16 µs", "r"), ("ours int8 µs", "r"),
              ("ours float8 µs", "r"), ("jax int8 µs", "r"), ("jax bfloat16 µs", "r"),
              ("device µs: ours int8 / jax int8", "r")]
    table = []
    for row in speed["decode"]:
        device = row.get("device_seconds")
        base = us(row, "jaxpaged_bfloat16")
        cells = [f"{row['batch']} x {row['context']}, {row['heads']}/{row['kv_heads']}/{row['head_dim']}", f"{base:.0f}"]
        cells += [f"{us(row, name):.0f} ({base / us(row, name):.2f}x)"
                  for name in ("jaxpaged_int8", "jaxpaged_float8_e4m3fn")]
        cells += [f"{us(row, 'jax_pallas_int8'):.0f} (ours {us(row, 'jax_pallas_int8') / us(row, 'jaxpaged_int8'):.2f}x)",
                  f"{us(row, 'jax_pallas_bfloat16'):.0f}"]
        cells.append(f"{device['jaxpaged_int8'] * 1e6:.1f} / {device['jax_pallas_int8'] * 1e6:.1f} "
                     f"(ours {row['int8_device_speedup_vs_jax_int8']:.2f}x)" if device else "—")
        table.append(cells)
    attention = (f"*{speed['device']}, jax {speed['jax']}; time per call, a jitted loop of 20 (the ratios: "
                 f"speed-up over ours in bfloat16; jax int8: ours int8's speed-up over it); device time: the GPU's "
                 f"busy time per call under the profiler (timed at head dim 64 only). Source: "
                 f"`benchmarks/results/{KV_QUANT_SPEED}`.*\n\n" + markdown(header, table))
    fits = {(r["model"], r["length"]): r for r in speed["capacity"]}
    header = [("K/V", "l"), ("llama-1b seqs of 2,048 in 64 GiB", "r"), ("8B seqs of 8,192 in 64 GiB", "r"),
              ("engine: output tokens/s", "r"), ("peak running", "r"), ("preemptions", "r")]
    table = [[e["kv_dtype"], fits["llama-1b", 2048][e["kv_dtype"]], fits["llama-8b", 8192][e["kv_dtype"]],
              f"{e['output_tokens_per_second']:,.0f} ({e['speedup_vs_bfloat16']:.2f}x)", e["peak_running"],
              e["preemptions"]] for e in speed["engine"]]
    capacity = (f"*Capacity from the pools' bytes (scales counted), `benchmarks/results/{KV_QUANT_SPEED}`; the "
                f"engine on {speed['device']}: llama-1b bfloat16, {speed['engine_requests']} requests of workload A "
                f"in {speed['engine_pool_GiB']:g} GiB of pool, random weights.*\n\n" + markdown(header, table))
    accuracy = load(results, KV_QUANT_ACCURACY)
    header = [("kv_dtype", "l"), ("K stored", "l"), ("XLA numerics", "l"), ("mean KL", "r"), ("max KL", "r"),
              ("max abs logit difference", "r"), ("same greedy token", "r"), ("perplexity", "r"),
              ("vs bfloat16 cache", "r"), ("source", "l")]
    table = []
    for source, k_stored, numerics in ((KV_QUANT_ACCURACY, "rotated", "default"),
                                       (KV_QUANT_NO_EXCESS, "rotated", "no excess precision"),
                                       (KV_QUANT_UNROTATED, "as it is (before)", "default")):
        run = load(results, source)
        table.append(["bfloat16 (reference)", "—", numerics, "—", "—", "—", "—", f"{run['perplexity']['bfloat16']:.3f}",
                      "—", f"`{source}`"])
        table += [[name, k_stored, numerics, f"{r['kl_mean']:.4f}", f"{r['kl_max']:.3f}", f"{r['max_abs_logit_diff']:.2f}",
                   f"{r['argmax_agreement']:.1%}", f"{r['perplexity']:.3f}", f"{r['perplexity_vs_bfloat16']:+.2%}",
                   f"`{source}`"] for name, r in run["rows"].items()]
    accuracy = (f"*SmolLM2-135M-Instruct, real weights, bfloat16, {accuracy['positions']:,} positions; CPU, jax "
                f"{accuracy['jax']}. Sources in `benchmarks/results/`.*\n\n" + markdown(header, table))
    return [attention, capacity, accuracy]


def _engine_row(name, source, e, peer, peer_rate, at_least=False):
    """A row of the engine's tables: the run's figures and its peer's (peer_rate None: no ratio;
    at_least: peer_rate is the most the peer can have reached, so the ratio is a lower bound)."""
    idle = "—" if source in IDLE_BEFORE_WAITING or "device_idle_share" not in e else percent(e["device_idle_share"])
    rate = e["output_tokens_per_second"]
    # a run with shared prefixes whose roofline counted every prompt token as prefill (before prefill_tokens)
    roofline = "—" if e["prefix_hit_rate"] > 0.5 and "prefill_tokens" not in e else percent(
        e.get("roofline_fraction_at_session_peak", e.get("roofline_fraction")))
    ratio = (f"{rate / peer_rate:.0f}x" if rate > 10 * peer_rate else f"{rate / peer_rate:.2f}x") if peer_rate else "—"
    return [name, f"`{source}`", f"{rate:,.0f}", f"{e['total_tokens_per_second']:,.0f}", peer,
            f"≥ {ratio}" if at_least and peer_rate else ratio,
            "—" if not e["prefix_hit_rate"] else percent(e["prefix_hit_rate"]), f"{e['mean_ttft']:.2f} s",
            roofline, idle, f"{e['compile_seconds']:.0f} s", e["preemptions"]]


ENGINE_HEADER = [("run", "l"), ("source", "l"), ("engine output tok/s", "r"), ("total tok/s", "r"),
                 ("peer in the same run", "l"), ("engine / peer", "r"), ("prefix hits", "r"), ("mean TTFT", "r"),
                 ("roofline of spec", "r"), ("device idle", "r"), ("compile", "r"), ("preemptions", "r")]


def _versus_static(run):
    rate = run["A_static_generate"]["output_tokens_per_second"]
    return f"static `generate`, groups of 64: {rate:,.0f}", rate


def _manager_row(name, source, run, stopped="the peer's 60 s wait for the next ran out"):
    """Transformers' continuous batching manager in the same run: its rate, or how far it got where
    the peer stopped it. Then the tokens of the requests it had not finished are not known; where the
    run recorded the tokens asked, all of them over the time of the last request done is the most
    the manager can have produced by then, and the engine's ratio to that is a lower bound."""
    manager = run["A_transformers"]
    if "partial" in manager:
        done = manager["partial"]
        most = manager["tokens_asked"] / done["seconds"] if "tokens_asked" in manager else None
        bound = "" if most is None else f"; at most {most:,.0f} tok/s counting every token asked"
        return _engine_row(f"{name}: not finished", source, run["A"],
                           f"{done['done']} of {manager['requests']} requests done in {done['seconds']:.0f} s "
                           f"({done['tokens_of_done']:,} tokens{bound}); {stopped}", most, at_least=True)
    return _engine_row(name, source, run["A"], f"{manager['tokens_per_second']:,.0f} (all "
                       f"{manager['generated_tokens']:,} tokens asked)", manager["tokens_per_second"])


def _c_row(name, run, source):
    c = run["C"]
    return _engine_row(f"{name}: A's requests, a quarter of the blocks they need ({c['num_blocks']:,}); "
                       f"{c['completed']} of 256 completed, {c['requests_equal_to_A']} equal to A's tokens", source, c,
                       f"A: {run['A']['output_tokens_per_second']:,.0f}", run["A"]["output_tokens_per_second"])


def _engine_caption(run):
    return (f"*{run['device']} (jax {run.get('jax', '0.11.2')}), llama-1b's shape (unless a row names another) in "
            f"{run['dtype']} with random weights, greedy, EOS ignored; sources in `benchmarks/results/`.*")


def headline_engine(results):
    """The engine on its three workloads, each run beside its peers of the same run: the latest runs."""
    ac, b, peers, threads_8, before, qwen3 = (load(results, name) for name in (
        ENGINE_AC, ENGINE_B, ENGINE_PEERS, ENGINE_PEERS_8, ENGINE_PEERS_SEPARATE, ENGINE_QWEN3))
    manager = "transformers' continuous batching manager, the first 64 requests each to its own length"
    eight_b = load(results, ENGINE_MODELS[1][1])
    table = [
        _engine_row("A with both peers in one run (q/k/v and gate/up each one kernel; decode slots from the host's "
                    "blocks; the warm-up compiling 16 programs at once)", ENGINE_PEERS, peers["A"],
                    *_versus_static(peers)),
        _manager_row(f"A, that run: {manager}", ENGINE_PEERS, peers),
        _engine_row("A with both peers, the same code, the warm-up compiling 8 programs at once (an earlier call)",
                    ENGINE_PEERS_8, threads_8["A"], *_versus_static(threads_8)),
        _manager_row(f"A, that run: {manager}", ENGINE_PEERS_8, threads_8),
        _engine_row("A again, in C's run", ENGINE_AC, ac["A"], "—", None),
        _c_row("C, that run", ac, ENGINE_AC),
        _engine_row("B: a shared 1,024-token system prompt, 64-256 of their own, 128 out; prefix caching on",
                    ENGINE_B, b["B_caching_on"], f"caching off: {b['B_caching_off']['output_tokens_per_second']:,.0f}",
                    b["B_caching_off"]["output_tokens_per_second"]),
        _engine_row("A with both peers, the session before (separate q, k, v, gate and up weights)",
                    ENGINE_PEERS_SEPARATE, before["A"], *_versus_static(before)),
        _manager_row(f"A, that run: {manager}", ENGINE_PEERS_SEPARATE, before,
                     f"none more in the {before['args']['hf_timeout']:.0f} s the peer was given"),
        _engine_row("A on **qwen3-0.6b** with both peers in one run (two sessions before)", ENGINE_QWEN3, qwen3["A"],
                    *_versus_static(qwen3)),
        _manager_row(f"A on qwen3-0.6b, that run: {manager}", ENGINE_QWEN3, qwen3,
                     f"none more in the {qwen3['args']['hf_timeout']:.0f} s the peer was given"),
        _engine_row("A on **llama-8b** (before 64-bit offsets, its pool capped by 32-bit ones: "
                    f"{eight_b['A']['peak_used_blocks']:,} blocks, all in use at the peak)", ENGINE_MODELS[1][1],
                    eight_b["A"], *_versus_static(eight_b)),
    ]
    peaks = [run["ceilings"]["matmul_flops_per_second"] / 1e12 for run in (peers, threads_8, ac, b, before)]
    peak = qwen3["session_matmul_peak"]
    caption = _engine_caption(peers)[:-2] + (
        f"; the roofline's prefill term at the matrix-product peak: each llama-1b run measured its own "
        f"({min(peaks):.0f}-{max(peaks):.0f} TFLOP/s, the best of ten timings of eight chained products); the "
        f"qwen3-0.6b row takes its session's {peak['matmul_flops_per_second'] / 1e12:.0f} TFLOP/s "
        f"(`{peak['source']}`), where the run had measured less by an older method (its own figure is in its "
        f"file).*")
    return [caption + "\n\n" + markdown(ENGINE_HEADER, table)]


def headline_engine_before(results):
    """The engine's runs before the latest (NOTES.md), and A at each number of decode steps a call."""
    ac, a, later, rows, scanned, one_by_one = (load(results, name) for name in (
        ENGINE_AC_BEFORE, ENGINE_A, ENGINE_LATER, ENGINE_ROWS, ENGINE_SCANNED, ENGINE_PEERS_BEFORE))
    read, sixteen, qwen3_read, b = (load(results, name) for name in (ENGINE_PEERS_READ, ENGINE_PEERS_16,
                                                                      ENGINE_QWEN3_READ, ENGINE_B_BEFORE))
    first_static, hf = a["A_static_generate"]["output_tokens_per_second"], a["A_transformers"]
    qwen3 = load(results, ENGINE_MODELS[0][1])
    manager = "transformers' continuous batching manager, the first 64 requests each to its own length"
    table = [
        _engine_row("A with both peers in one run, 64 decode steps a call (inactive decode rows still read their "
                    "context)", ENGINE_PEERS_READ, read["A"], *_versus_static(read)),
        _manager_row(f"A, that run: {manager}", ENGINE_PEERS_READ, read),
        _engine_row("A with both peers in one run, 16 decode steps a call", ENGINE_PEERS_16,
                    sixteen["A"], *_versus_static(sixteen)),
        _manager_row(f"A, that run: {manager}", ENGINE_PEERS_16, sixteen),
        _engine_row("A on **qwen3-0.6b** with both peers in one run, 64 steps (inactive rows still read)",
                    ENGINE_QWEN3_READ, qwen3_read["A"], *_versus_static(qwen3_read)),
        _manager_row(f"A on qwen3-0.6b, that run: {manager}", ENGINE_QWEN3_READ, qwen3_read),
        _c_row("C, 16 decode steps a call, programs compiled as met", ac, ENGINE_AC_BEFORE),
        _engine_row("B, prefix caching on (before the tiles, 16 steps a call)", ENGINE_B_BEFORE, b["B_caching_on"],
                    f"caching off: {b['B_caching_off']['output_tokens_per_second']:,.0f}",
                    b["B_caching_off"]["output_tokens_per_second"]),
        _engine_row("A, the static peer alone (16 decode steps a call, as in every row here)", ENGINE_SCANNED,
                    scanned["A"], *_versus_static(scanned)),
        _engine_row("A with both peers in one run (every program unrolled and compiled ahead one by one, a slower "
                    "host)", ENGINE_PEERS_BEFORE, one_by_one["A"], *_versus_static(one_by_one)),
        _manager_row("A, that run: transformers' continuous batching manager, the first 64 requests each to its own "
                     "length", ENGINE_PEERS_BEFORE, one_by_one),
        _engine_row("A, programs compiled as met (`--no-warm-up`)", ENGINE_AC_BEFORE, ac["A"], *_versus_static(ac)),
        _engine_row("A, the run before: prefill chunks in rows padded to the longest, not in tiles", ENGINE_ROWS,
                    rows["A"], *_versus_static(rows)),
        _c_row("C, that run", rows, ENGINE_ROWS),
        _engine_row("A, an earlier run", ENGINE_A, a["A"], f"static `generate`: {first_static:,.0f}", first_static),
        _engine_row("A, that run: transformers' `generate_batch`, 64 requests each decoded to the longest", ENGINE_A,
                    a["A"], f"{hf['tokens_per_second']:,.0f} asked tokens/s (counting every generated one, "
                    f"{hf['generated_tokens'] / hf['seconds']:,.0f}: the engine "
                    f"{a['A']['output_tokens_per_second'] * hf['seconds'] / hf['generated_tokens']:.0f}x)",
                    hf["tokens_per_second"]),
        _engine_row("A, that run: device calls on the engine's own thread", ENGINE_A, a["A_caller_thread"],
                    f"the launcher thread: {a['A']['output_tokens_per_second']:,.0f}", a["A"]["output_tokens_per_second"]),
        _manager_row("A, another run (a variant, reverted): transformers' continuous batching manager, 64 requests "
                     "each to its own length", ENGINE_LATER, later),
        _engine_row("A on **qwen3-0.6b** (before 64-bit offsets, its pool capped by 32-bit ones: "
                    f"{qwen3['A']['peak_used_blocks']:,} blocks, all in use at the peak)", ENGINE_MODELS[0][1],
                    qwen3["A"], *_versus_static(qwen3)),
    ]
    steps = load(results, ENGINE_STEPS)
    header = [("decode steps a call", "l"), ("device call", "r"), ("output tok/s", "r"), ("roofline of spec", "r"),
              ("device idle", "r"), ("host's share", "r"), ("compile", "r")]
    sweep = [[r["name"], r["call"], f"{r['A']['output_tokens_per_second']:,.0f}",
              percent(r["A"]["roofline_fraction"]), percent(r["A"]["device_idle_share"]),
              percent(r["A"]["host_share"]), f"{r['A']['compile_seconds']:.0f} s"] for r in steps["runs"]]
    return [_engine_caption(ac) + "\n\n" + markdown(ENGINE_HEADER, table),
            f"*{steps['device']} (jax {steps['jax']}), llama-1b, workload A, one process a run. Source: "
            f"`benchmarks/results/{ENGINE_STEPS}`.*\n\n" + markdown(header, sweep)]


def headline_serve(results):
    """The server at each request rate, and the engine offline on the same requests in the same run."""
    run = load(results, SERVE)
    slo = run["slo"]
    header = [("requests/s", "l"), ("output tok/s", "r"),
              (f"goodput req/s (TTFT <= {slo['ttft_s']:g} s, TPOT <= {slo['tpot_s'] * 1e3:g} ms)", "r"),
              ("TTFT median / p99", "r"), ("TPOT median / p99", "r"), ("ITL median", "r"),
              ("compiled while serving", "r")]
    table = [[("all at once" if row["rate"] == "inf" else f"{row['rate']:g} (Poisson)"),
              f"{row['output_tokens_per_second']:,.0f}", f"{row['goodput_requests_per_second']:.2f}",
              f"{row['ttft_s']['median']:.2f} s / {row['ttft_s']['p99']:.2f} s",
              f"{row['tpot_s']['median'] * 1e3:.1f} ms / {row['tpot_s']['p99'] * 1e3:.1f} ms",
              f"{row['itl_s']['median'] * 1e3:.0f} ms", row["new_programs"]] for row in run["rates"]]
    table.append(["the engine offline, same requests", f"{run['offline']['output_tokens_per_second']:,.0f}",
                  "", "", "", "", ""])
    before = load(results, SERVE_BEFORE)
    table.append(["before the warm-up and the tiles: 32 (Poisson) / all at once",
                  " / ".join(f"{r['output_tokens_per_second']:,.0f}" for r in before["rates"]), "",
                  " / ".join(f"{r['ttft_s']['median']:.2f} s" for r in before["rates"]) + " (medians)", "", "",
                  "—"])
    caption = (f"*{run['device']} (jax {run['jax']}), {run['model']}'s shape with random weights; "
               f"{run['rates'][0]['requests']} requests of workload A, streamed over HTTP on the same machine; the "
               f"engine offline on the same requests in the same run (server overhead at saturation "
               f"{percent(run['overhead_at_saturation'])}). The server {run['warm_up']} before its first request "
               f"(up in {run['server_start_s']:.0f} s). Sources: `benchmarks/results/{SERVE}`, "
               f"`benchmarks/results/{SERVE_BEFORE}`.*")
    return [caption + "\n\n" + markdown(header, table)]


def headline_tensor_parallel(results):
    """The tensor-parallel benchmark's single-GPU baseline (no multi-GPU machine measured yet)."""
    run, engine = load(results, TP_BASELINE), load(results, ENGINE_MODELS[1][1])
    header = [("GPUs", "l"), ("decode tok/s, batch 1", "r"), ("batch 32", "r"), ("batch 128", "r"),
              ("of spec bandwidth at 128", "r"), ("workload A, output tok/s", "r"), ("source", "l")]
    decode = {r["batch"]: r for r in run["rows"]}
    table = [[str(run["tensor_parallel"]), *(f"{decode[b]['paged_decode_tokens_per_s']:,.0f}" for b in (1, 32, 128)),
              percent(decode[128]["roofline_vs_spec"]["paged"]), f"{engine['A']['output_tokens_per_second']:,.0f}",
              f"`{TP_BASELINE}`, `{ENGINE_MODELS[1][1]}`"]]
    caption = (f"*{run['device']} (jax {run['jax']}), {run['preset']}'s shape in {run['dtype']} with random weights "
               f"({run['weight_bytes'] / 1e9:.1f} GB), prompts of {decode[1]['prompt_len']}, "
               f"{decode[1]['new_tokens']} new tokens, the static `generate` on the paged cache; workload A on the "
               f"engine. Runs on 2 and 4 GPUs wait for a machine with several.*")
    return [caption + "\n\n" + markdown(header, table)]


def all_tables(results):
    """{title: [markdown section, ...]} of every table the docs show."""
    return {"memory": headline_memory(results), "decode attention": headline_decode(results),
            "prefill attention": headline_prefill(results), "generation": headline_generation(results),
            "8-bit K/V": headline_kv_quant(results), "the engine": headline_engine(results),
            "the engine, the runs before": headline_engine_before(results),
            "the server": headline_serve(results), "tensor parallelism": headline_tensor_parallel(results),
            "decode attention, every shape": headline_decode(results, full=True),
            "generation, every run": headline_generation(results, full=True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--check", nargs="+", metavar="MARKDOWN",
                        help="fail unless every table appears word for word in one of these files")
    args = parser.parse_args()
    tables = all_tables(args.results)
    if not args.check:
        for title, sections in tables.items():
            print(f"## {title}\n")
            print("\n\n".join(sections) + "\n")
        return
    docs = ""
    for path in args.check:
        with open(path) as f:
            docs += f.read()
    missing = [f"{title} ({i + 1})" for title, sections in tables.items() for i, section in enumerate(sections)
               if section not in docs]
    if missing:
        sys.exit(f"tables not in {', '.join(args.check)} as printed by headline.py: {', '.join(missing)}")
    print(f"all {sum(map(len, tables.values()))} tables found")


if __name__ == "__main__":
    main()

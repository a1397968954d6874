"""The engine's offline throughput benchmark: workloads, timed runs, the result table.

Workloads (random token prompts, EOS ignored, greedy; the random draws seeded, so every run of the
same arguments serves the same requests):
  A  `count` prompts of U[low, high] tokens, outputs of U[low, high] tokens (nano-vllm's bench; by
     default 256 requests, U[100, 1024]).
  B  requests sharing a system prompt of `high` tokens (at most 1,024), 64-256 tokens of their own
     and 128 output tokens (each capped at `high`), run with prefix caching on and off.
  C  workload A with a pool of a quarter of the blocks it needs: preemption by recompute, and the
     greedy tokens compared with A's.

Every timed run is preceded by an untimed run of the same requests in a fresh engine, which compiles
its programs ahead (`Engine.warm_up`) and then whatever else the requests meet; both are reported as
compilation.

`benchmarks/engine.py` runs these with peers beside them (the static generate, transformers) and,
on a GPU, the roofline; `jaxpaged bench` runs them from the installed package.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from jaxpaged.engine.block_manager import chain_hash
from jaxpaged.engine.engine import LLM, EngineStats
from jaxpaged.engine.request import RequestOutput
from jaxpaged.engine.sampling import SamplingParams

WORKLOADS = {
    "A": "random prompts and outputs of U[min-len, max-len] tokens each",
    "B": "a shared system prompt of max-len tokens (at most 1,024), 64-256 of their own, 128 out; "
         "prefix caching on and off",
    "C": "workload A in a pool of a quarter of the blocks it needs (preemption); tokens compared with A's",
}
BLOCK_SIZE = 16
VOCAB = 10000  # prompts draw token ids below this (or the model's vocabulary, if smaller)


def device_name(device=None) -> str:
    """The card's name as JAX reports it (`device_kind`), or the platform where there is none."""
    import jax

    device = device or jax.devices()[0]
    return getattr(device, "device_kind", device.platform)


def workload_a(rng: np.random.Generator, count: int, low: int, high: int,
               vocab: int) -> tuple[list[list[int]], list[int]]:
    """Workload A: `count` prompts of U[low, high] random tokens below `vocab`, each to produce
    U[low, high] tokens. Returns (prompts as token-id lists, output lengths)."""
    prompts = [rng.integers(0, vocab, rng.integers(low, high + 1)).tolist() for _ in range(count)]
    outputs = rng.integers(low, high + 1, count).tolist()
    return prompts, outputs


def workload_a_requests(config, num_requests: int, min_len: int, max_len: int) -> tuple[list[list[int]], list[int]]:
    """Workload A's requests as `run_workloads` makes them for a model of this config (seed 0; min_len
    capped at max_len): a peer run apart, before the engine, gets the very same ones."""
    return workload_a(np.random.default_rng(0), num_requests, min(min_len, max_len), max_len,
                      min(config.vocab_size, VOCAB))


def workload_b(rng: np.random.Generator, count: int, system_len: int, low: int, high: int, output_len: int,
               vocab: int) -> tuple[list[list[int]], list[int]]:
    """Workload B: `count` prompts that start with the same `system_len` random tokens and go on with
    U[low, high] of their own, each to produce `output_len` tokens. Returns (prompts, output lengths)."""
    system = rng.integers(0, vocab, system_len).tolist()
    return [system + rng.integers(0, vocab, rng.integers(low, high + 1)).tolist() for _ in range(count)], \
        [output_len] * count


def workload_c_blocks(prompts: Sequence[Sequence[int]], outputs: Sequence[int], block_size: int = BLOCK_SIZE) -> int:
    """Workload C's pool: a quarter of the blocks that workload A's requests take all at once, and at
    least what the largest one takes alone (so that every request can run)."""
    needs = [-(-(len(p) + o) // block_size) for p, o in zip(prompts, outputs)]
    return max(sum(needs) // 4, max(needs))


def params_for(outputs: Sequence[int]) -> list[SamplingParams]:
    """Greedy sampling to exactly each output length (EOS ignored)."""
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outputs]


class EngineRun(NamedTuple):
    """A timed run of the engine (`run_engine`)."""

    results: list[RequestOutput]  # in the order of the prompts
    seconds: float  # wall time of the timed run
    stats: EngineStats  # the engine's statistics at its end
    timeline: list[tuple[float, int, int]]  # after each step: (seconds, generated tokens, running requests)
    compile_seconds: float  # the warm-up's time and the untimed run's extra time
    attention: str  # the path paged attention took: "kernel" or "reference"
    kv_bytes_per_position: int  # of the pools, every layer's K and V (and 8-bit pools' scales)


def run_engine(model, prompts: Sequence[Sequence[int]], outputs: Sequence[int], engine_args: dict,
               warm_up: bool = True) -> EngineRun:
    """A timed run of the requests in a fresh engine, after an untimed one of the same requests.
    The untimed engine compiles its greedy programs ahead first (`Engine.warm_up`; not with
    warm_up=False, when its run compiles only the programs the requests meet), and its run compiles
    whatever else the requests meet: the compilation is the warm-up's time plus the untimed run's
    time beyond the timed one's.

    Args:
      model: a MiniLLM.
      prompts, outputs: the requests' token ids and output lengths.
      engine_args: keyword arguments of `Engine` (block_size, num_blocks, max_num_seqs, ...).
    """
    start = time.perf_counter()
    untimed = LLM(model, **engine_args)
    if warm_up:
        untimed.engine.warm_up(sampling=False)  # the requests are greedy (params_for)
    warm_up_seconds = time.perf_counter() - start
    start = time.perf_counter()
    untimed.generate(prompts, params_for(outputs), use_tqdm=False)
    untimed_seconds = time.perf_counter() - start
    # The timed engine takes the untimed one's pool (its programs were compiled for that shape): sized
    # afresh while the untimed pool still held the memory, it would differ and compile again.
    timed_args = dict(engine_args, num_blocks=untimed.engine.cache_config.num_blocks)
    del untimed
    gc.collect()  # its pool, before the timed engine takes its own
    engine = LLM(model, **timed_args).engine
    for i, (prompt, params) in enumerate(zip(prompts, params_for(outputs))):
        engine.add_request(str(i), prompt, params)
    timeline, done = [], {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[int(output.request_id)] = output
        stats = engine.stats()
        timeline.append((time.perf_counter() - start, stats.generated_tokens, stats.running))
    seconds = time.perf_counter() - start
    results = [done[i] for i in range(len(prompts))]
    return EngineRun(results, seconds, engine.stats(), timeline, warm_up_seconds + max(untimed_seconds - seconds, 0.0),
                     "kernel" if engine.runner.kernels else "reference", engine.cache_config.bytes_per_token)


def prefill_tokens(prompts: Sequence[Sequence[int]], block_size: int | None) -> int:
    """The prompt tokens a run has to compute: all of them, or with prefix caching (block_size given)
    all but the full blocks that an earlier prompt began with (each prompt's last token is always
    computed). A workload's count, not the engine's: blocks found again after a preemption count as
    work, so a run with preemptions does not lower its own roofline."""
    if block_size is None:
        return sum(map(len, prompts))
    seen, total = set(), 0
    for prompt in prompts:
        names, name = [], None  # the full blocks' names, as the block manager names them
        for start in range(0, len(prompt) // block_size * block_size, block_size):
            name = chain_hash(name, prompt[start:start + block_size])
            names.append(name)
        shareable = names[:(len(prompt) - 1) // block_size]
        shared = next((i for i, name in enumerate(shareable) if name not in seen), len(shareable))
        total += len(prompt) - shared * block_size
        seen.update(names)
    return total


def roofline_seconds(config, stats: EngineStats, prompt_tokens: int, matmul_flops: float, bandwidth: float,
                     kv_bytes_per_position: int | None = None) -> float:
    """The time the engine's work would take at the ceilings: prefill of `prompt_tokens` (those it
    has to compute: `prefill_tokens`) at `matmul_flops` (FLOP/s), and
    each decode step the engine ran reading the weights once plus every live K/V position once at
    `bandwidth` (bytes/s), a position being `kv_bytes_per_position` (default: K and V of every layer
    in the model's dtype; an 8-bit pool's are fewer). The achieved fraction is this over the
    measured time."""
    import jax.numpy as jnp

    item = jnp.dtype(config.dtype).itemsize
    e, f, layers, heads, kv, d, v = (config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads,
                                     config.num_kv_heads, config.head_dim, config.vocab_size)
    weights = (layers * (e * (heads + 2 * kv) * d + heads * d * e + 3 * e * f)
               + v * e * (1 if config.tie_embeddings else 2))
    kv_bytes_per_position = kv_bytes_per_position or 2 * layers * kv * d * item
    prefill_flops = 2 * weights * prompt_tokens
    return (prefill_flops / matmul_flops + stats.decode_steps * weights * item / bandwidth
            + stats.kv_positions_read * kv_bytes_per_position / bandwidth)


def summarise(prompts: Sequence[Sequence[int]], run: EngineRun) -> dict:
    """A run's row of the table: output and total (prompt + output) tokens/s, compilation, preemptions,
    prefix hit rate, the host's share of the wall time (not waiting for a device call), the device's
    idle share (no call to run: it waited for the host), mean time to the first token."""
    out_tokens = sum(len(r.outputs[0].token_ids) for r in run.results)
    stats, seconds = run.stats, run.seconds
    return {"attention": run.attention, "output_tokens_per_second": out_tokens / seconds,
            "total_tokens_per_second": (out_tokens + sum(map(len, prompts))) / seconds,
            "seconds": seconds, "compile_seconds": run.compile_seconds, "preemptions": stats.preemptions,
            "prefix_hit_rate": stats.prefix_hit_rate, "host_share": 1 - stats.device_seconds / seconds,
            "device_idle_share": stats.device_idle_seconds / seconds,
            "overlapped_calls": stats.overlapped_calls, "mixed_steps": stats.mixed_steps,
            "peak_used_blocks": stats.peak_used_blocks,
            "mean_ttft": float(np.mean([r.metrics.time_to_first_token for r in run.results]))}


def run_workloads(model, workloads: Sequence[str] = ("A", "B", "C"), *, num_requests: int = 256, min_len: int = 100,
                  max_len: int = 1024, engine_args: dict | None = None,
                  ceilings: tuple[float, float] | None = None,
                  on_workload_a: Callable[[list[list[int]], list[int], EngineRun], None] | None = None,
                  log: Callable[[str], None] | None = None, warm_up: bool = True) -> dict:
    """Runs the chosen workloads on the engine; returns their rows by name.

    Args:
      model: a MiniLLM (random weights do: the outputs' lengths are fixed).
      workloads: any of "A", "B", "C" (C runs A too, to compare tokens).
      num_requests, min_len, max_len: the workloads' sizes (min_len is capped at max_len).
      engine_args: `Engine` arguments (block_size default 16; max_model_len default twice max_len,
        or more where a request needs it).
      ceilings: (matmul FLOP/s, memory bytes/s): each row gets `roofline_fraction`.
      on_workload_a: called with workload A's prompts, output lengths and timed run.
      log: called with a line before each run.
      warm_up: whether each untimed engine compiles every program ahead (`run_engine`).

    Returns:
      {"A": row, "C": row, "B_caching_on": row, "B_caching_off": row} for the workloads run; A's row
      holds its `timeline`, C's `num_blocks`, `requests_equal_to_A` and `completed`.

    Raises:
      ValueError for an unknown workload or a request past the model's context.
    """
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"workloads: unknown {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    config = model.config
    vocab = min(config.vocab_size, VOCAB)
    engine_args = {"block_size": BLOCK_SIZE, **(engine_args or {})}
    block_size = engine_args["block_size"]
    say = log or (lambda line: None)
    result, runs = {}, {}

    def timed(name, prompts, outputs, args):
        longest = max(len(p) + o for p, o in zip(prompts, outputs))
        if longest > config.max_position_embeddings:
            raise ValueError(f"workload {name[0]}: a request takes {longest} positions, past the model's context of "
                             f"{config.max_position_embeddings}; lower --max-len")
        args = {"max_model_len": max(2 * max_len, longest), **args}
        say(f"{name}: {len(prompts)} requests, {sum(map(len, prompts))} prompt and {sum(outputs)} output "
            f"tokens (an untimed run first, then the timed one)")
        run = run_engine(model, prompts, outputs, args, warm_up)
        entry = summarise(prompts, run)
        if ceilings:
            caching = args.get("enable_prefix_caching", True)
            entry["prefill_tokens"] = prefill_tokens(prompts, block_size if caching else None)
            ideal = roofline_seconds(config, run.stats, entry["prefill_tokens"], *ceilings, run.kv_bytes_per_position)
            entry["roofline_fraction"] = ideal / run.seconds
        result[name], runs[name] = entry, run
        return run

    if "A" in workloads or "C" in workloads:
        prompts, outputs = workload_a_requests(config, num_requests, min_len, max_len)
        a_run = timed("A", prompts, outputs, engine_args)
        result["A"]["timeline"] = a_run.timeline
        if on_workload_a:
            on_workload_a(prompts, outputs, a_run)
        if "C" in workloads:
            num_blocks = workload_c_blocks(prompts, outputs, block_size)
            c_run = timed("C", prompts, outputs, dict(engine_args, num_blocks=num_blocks))
            same = sum(c.outputs[0].token_ids == a.outputs[0].token_ids for c, a in zip(c_run.results, a_run.results))
            result["C"].update(num_blocks=num_blocks, requests_equal_to_A=same,
                               completed=sum(r.finished for r in c_run.results))
    if "B" in workloads:
        b_prompts, b_outputs = workload_b(np.random.default_rng(2), num_requests, min(1024, max_len), min(64, max_len),
                                          min(256, max_len), min(128, max_len), vocab)
        for caching in (True, False):
            timed(f"B_caching_{'on' if caching else 'off'}", b_prompts, b_outputs,
                  dict(engine_args, enable_prefix_caching=caching))
    return result


def format_table(rows: dict) -> str:
    """The table of the rows (`run_workloads`' result; other entries are skipped): one line a run."""
    runs = {name: row for name, row in rows.items() if isinstance(row, dict) and "output_tokens_per_second" in row
            and "preemptions" in row}
    roofline = any("roofline_fraction" in row for row in runs.values())
    lines = [f"{'run':<16}{'out tok/s':>11}{'total tok/s':>13}{'compile s':>11}{'preempt':>9}{'hits':>7}{'idle':>7}"
             f"{'TTFT s':>9}" + (f"{'roofline':>10}" if roofline else "")]
    for name, e in runs.items():
        roof = f"{e['roofline_fraction']:.0%}" if "roofline_fraction" in e else "-"
        lines.append(f"{name:<16}{e['output_tokens_per_second']:>11.0f}{e['total_tokens_per_second']:>13.0f}"
                     f"{e['compile_seconds']:>11.1f}{e['preemptions']:>9}{e['prefix_hit_rate']:>7.0%}"
                     f"{e.get('device_idle_share', float('nan')):>7.0%}{e['mean_ttft']:>9.3f}" + (f"{roof:>10}" if roofline else ""))
    return "\n".join(lines)

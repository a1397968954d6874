"""The engine's warm-up: the time `Engine.warm_up` takes to compile every program ahead (workload A's
engine arguments: 256 rows, a budget of 8,192 tokens, 64 decode steps a call), and each program's
own compile time, with --threads programs compiled at once.

XLA keeps its autotuning results for the life of a process, so a second warm-up in one process
would reuse the first's: run each thread count in a process of its own.

Run: python benchmarks/warm_up.py --out FILE.json --threads 16 [--model llama-1b]
     python benchmarks/warm_up.py --out /tmp/w.json --model tiny --threads 2  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import jax

from jaxpaged.engine import LLM
from jaxpaged.engine import runner
from jaxpaged.models.checkpoint import preset_model


def timed_compiles(record: list[float]):
    """Wraps `jax.stages.Lowered.compile` so that each call's seconds are appended to `record`."""
    compile_ = jax.stages.Lowered.compile
    lock = threading.Lock()

    def compile_and_time(self, *args, **kwargs):
        start = time.perf_counter()
        executable = compile_(self, *args, **kwargs)
        with lock:
            record.append(time.perf_counter() - start)
        return executable

    jax.stages.Lowered.compile = compile_and_time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-1b", help="a preset (random weights)")
    parser.add_argument("--threads", type=int, default=runner.COMPILE_THREADS,
                        help="programs compiled at once (capped at the host's cores)")
    args = parser.parse_args()

    runner.COMPILE_THREADS = args.threads
    model = preset_model(args.model)
    start = time.perf_counter()
    llm = LLM(model, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192, decode_steps=64,
              min_prefill_tokens=16, min_decode_rows=8)  # benchmarks/engine.py's defaults
    built = time.perf_counter() - start
    seconds: list[float] = []
    timed_compiles(seconds)
    start = time.perf_counter()
    programs = llm.engine.warm_up(sampling=False)
    warm_up = time.perf_counter() - start
    result = {"device": jax.devices()[0].device_kind, "model": args.model, "threads": args.threads,
              "engine_built_seconds": built, "warm_up_seconds": warm_up, "programs": programs,
              "compile_seconds_each": sorted(seconds, reverse=True)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}, {args.model}, {args.threads} threads: warm-up {warm_up:.1f} s for {programs} programs "
          f"(the engine built in {built:.1f} s); the longest compiles: "
          f"{', '.join(f'{s:.1f}' for s in result['compile_seconds_each'][:5])} s")


if __name__ == "__main__":
    main()

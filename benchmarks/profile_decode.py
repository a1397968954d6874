"""Where a decode step's time goes on the GPU: one jitted decode chunk under the JAX profiler, device
kernels aggregated by name (the top ones printed, all written as JSON).

Run: python benchmarks/profile_decode.py --out-dir DIR [--batch 1] [--layers auto|scan|unroll]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
from flax import nnx

from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM
from timing import device_kernel_times


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", choices=("auto", "scan", "unroll"), default="auto")
    args = parser.parse_args()
    model = MiniLLM(preset("llama-1b", dtype="bfloat16", scan_layers={"auto": None, "scan": True, "unroll": False}[args.layers]), rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(0, 1000, size=(args.batch, 128)).tolist()
    run = lambda: generate(model, prompts, max_new_tokens=65, eos_token_ids=[], chunk_size=32)  # noqa: E731
    run()  # compile
    trace_dir = os.path.join(args.out_dir, "trace")
    jax.profiler.start_trace(trace_dir)
    result = run()
    jax.profiler.stop_trace()
    steps = result.decode_tokens // args.batch
    totals, counts, _ = device_kernel_times(trace_dir)
    total = sum(totals.values())
    print(f"batch {args.batch}: {steps} decode steps, device busy {total / 1e3:.1f} ms over the run "
          f"(decode wall {result.decode_seconds * 1e3:.1f} ms, prefill wall {result.prefill_seconds * 1e3:.1f} ms)")
    for name, us in totals.most_common(20):
        print(f"{us / 1e3:9.2f} ms {counts[name]:6d}x  {name[:110]}")
    with open(os.path.join(args.out_dir, f"profile_decode_b{args.batch}.json"), "w") as f:
        json.dump({"steps": steps, "kernels_us": dict(totals), "counts": dict(counts)}, f)


if __name__ == "__main__":
    main()

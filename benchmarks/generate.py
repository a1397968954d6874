"""Prefill and decode tokens/s of batched generation, paged cache against contiguous, same batch, same run.

Each configuration is generated once to compile, then timed `--repeats` times; the table gives
medians. Prompts are random token ids of one length, EOS is disabled so every sequence decodes
the full `--new-tokens`, and greedy paged and contiguous outputs are compared. The attention path
is `generate(..., impl=...)`: "kernel" (the Pallas kernels), "reference" (gather then attend) or
"auto" (the kernels where they run).
On a GPU, the decode roofline: each step reads every weight once and every live K/V once; those
bytes at the card's specified bandwidth (ceilings.py), times the cards the model is split over
(--tensor-parallel), give the step's floor, and the roofline fraction is that floor over the
measured step time. XLA's device copy, measured in the same run,
is reported beside as a peer (its fraction too, and alone where the card has no spec). Not on the
CPU, where an XLA elementwise pass (about 6 GB/s on a 2-core machine) is slower than the model's
matrix-vector products read.

Examples:
  python benchmarks/generate.py --preset tiny --batch-sizes 1 8
  python benchmarks/generate.py --preset smollm2-135m --batch-sizes 1 4          # real weights
  python benchmarks/generate.py --preset llama-1b --batch-sizes 1 32 128 --dtype bfloat16 --impl kernel
  python benchmarks/generate.py --preset smollm2-135m-random --batch-sizes 1 32 128 --dtype bfloat16 --impl reference
  python benchmarks/generate.py --preset llama-1b --batch-sizes 1 32 128 --dtype bfloat16 --tensor-parallel 2
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.parallel import shard_model
from jaxpaged.parallel import make_mesh
from ceilings import copy_bandwidth, device_name, spec_bandwidth


def load(args, mesh) -> MiniLLM:
    """The preset's model: real weights from the embedded file for smollm2-135m, else random; on the
    mesh's devices, if given."""
    if args.preset == "smollm2-135m" and not args.random_weights:
        from jaxpaged.models.gguf_weights import load_gguf

        return load_gguf(dtype=args.dtype, mesh=mesh)[0]
    model = MiniLLM(preset(args.preset, dtype=args.dtype), rngs=nnx.Rngs(0))
    return model if mesh is None else shard_model(model, mesh)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny, smollm2-135m (real weights from the embedded file), smollm2-135m-random or llama-1b (default tiny)")
    parser.add_argument("--random-weights", action="store_true", help="random weights even for smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=32, help="decode steps per jitted call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", choices=("auto", "kernel", "reference"), default="auto",
                        help="attention path: the Pallas kernels, gather-then-attend, or auto (kernels where they run)")
    parser.add_argument("--layers", choices=("auto", "scan", "unroll"), default="auto",
                        help="scanned [L, ...] stack or separate unrolled layers (auto: scan on the CPU only)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="split the model and the caches' kv heads over N devices (default 1: one device)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/generate_<preset>_<device>[_tp<N>].json)")
    parser.add_argument("--plot", default=None, help="PNG path for a plot of decode tokens/s (needs matplotlib)")
    args = parser.parse_args()

    mesh = make_mesh(args.tensor_parallel) if args.tensor_parallel > 1 else None
    model = load(args, mesh)
    device = device_name()
    cards = args.tensor_parallel  # each reads its share of the weights and K/V at once
    on_gpu = jax.default_backend() == "gpu"  # no roofline on the CPU (docstring)
    spec = spec_bandwidth(device) if on_gpu else None
    spec = spec and cards * spec
    copy = cards * copy_bandwidth(2**31) if on_gpu else None
    c = model.config
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(jnp.dtype(c.dtype)).itemsize
    rng = np.random.default_rng(0)
    rows = []
    for batch in tqdm(args.batch_sizes, desc="batch sizes"):
        prompts = rng.integers(0, model.config.vocab_size, size=(batch, args.prompt_len)).tolist()
        results = {}
        for cache in ("paged", "contiguous"):
            def run():
                return generate(model, prompts, max_new_tokens=args.new_tokens, cache=cache, block_size=args.block_size,
                                eos_token_ids=[], chunk_size=args.chunk_size, impl=args.impl,
                                scan_layers={"auto": None, "scan": True, "unroll": False}[args.layers], mesh=mesh)

            first = run()  # compiles
            timed = [run() for _ in range(args.repeats)]
            results[cache] = {
                "tokens": first.tokens,
                "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_second for r in timed),
                "decode_tokens_per_s": statistics.median(r.decode_tokens_per_second for r in timed),
                "peak_bytes_used": first.peak_memory.bytes_used,
            }
        paged, dense = results["paged"], results["contiguous"]
        # The decode roofline: each step reads every weight once and every live K/V once.
        step_bytes = weight_bytes + batch * (args.prompt_len + args.new_tokens / 2) * kv_bytes_per_token

        def fractions(bandwidth):  # the step's floor at `bandwidth` over the measured step time
            return bandwidth and {name: step_bytes / bandwidth * results[name]["decode_tokens_per_s"] / batch
                                  for name in results}

        rows.append({
            "decode_step_bytes": step_bytes,
            "decode_step_floor_ms": spec and step_bytes / spec * 1e3,
            "roofline_vs_spec": fractions(spec), "roofline_vs_copy": fractions(copy),
            "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "paged_prefill_tokens_per_s": paged["prefill_tokens_per_s"],
            "contiguous_prefill_tokens_per_s": dense["prefill_tokens_per_s"],
            "paged_decode_tokens_per_s": paged["decode_tokens_per_s"],
            "contiguous_decode_tokens_per_s": dense["decode_tokens_per_s"],
            "decode_ratio_paged_over_contiguous": paged["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            "prefill_ratio_paged_over_contiguous": paged["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "greedy_tokens_identical": paged["tokens"] == dense["tokens"],
            "paged_peak_bytes_used": paged["peak_bytes_used"], "contiguous_bytes_reserved": dense["peak_bytes_used"],
        })

    print(f"\n{args.preset} ({args.dtype}, {'random' if args.random_weights or args.preset != 'smollm2-135m' else 'real'} "
          f"weights, impl {args.impl}) on {device}{f' x {cards}' if cards > 1 else ''}, prompt {args.prompt_len}, {args.new_tokens} new tokens, block size {args.block_size}")
    print(f"{'batch':>6}{'prefill paged':>15}{'prefill contig':>16}{'decode paged':>14}{'decode contig':>15}"
          f"{'decode ratio':>14}{'same tokens':>13}{'of spec':>9}{'of copy':>9}")
    for r in rows:
        print(f"{r['batch']:>6}{r['paged_prefill_tokens_per_s']:>15.0f}{r['contiguous_prefill_tokens_per_s']:>16.0f}"
              f"{r['paged_decode_tokens_per_s']:>14.0f}{r['contiguous_decode_tokens_per_s']:>15.0f}"
              f"{r['decode_ratio_paged_over_contiguous']:>13.2f}x{str(r['greedy_tokens_identical']):>13}"
              + "".join(f"{r[key]['paged']:>9.0%}" if r[key] else f"{'—':>9}" for key in ("roofline_vs_spec", "roofline_vs_copy")))
    bandwidths = (f"specified {spec / 1e12:.2f} TB/s" if spec else "no spec for this card") + (
        f"; XLA copy {copy / 1e12:.2f} TB/s (read + write), measured in this run" if copy else "") + (
        f" (both for the {cards} cards together)" if cards > 1 else "")
    print(f"weights {weight_bytes / 1e9:.2f} GB; roofline (paged) = the step's bytes at the bandwidth / its time; "
          + (bandwidths if on_gpu else "no roofline on the CPU"))

    suffix = ("" if args.impl == "auto" else f"_{args.impl}") + (f"_tp{cards}" if cards > 1 else "")
    out = args.out or f"benchmarks/results/generate_{args.preset}_{device.replace(' ', '_')}{suffix}.json"
    with open(out, "w") as f:
        json.dump({"preset": args.preset, "dtype": args.dtype, "device": device, "tensor_parallel": cards,
                   "jax": jax.__version__, "impl": args.impl,
                   "spec_bandwidth_Bps": spec, "copy_Bps": copy, "weight_bytes": weight_bytes,
                   "block_size": args.block_size, "chunk_size": args.chunk_size, "repeats": args.repeats, "rows": rows}, f,
                  indent=2)
    print(f"wrote {out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batches = [r["batch"] for r in rows]
        plt.figure(figsize=(6, 4))
        plt.plot(batches, [r["paged_decode_tokens_per_s"] for r in rows], "o-", label="paged")
        plt.plot(batches, [r["contiguous_decode_tokens_per_s"] for r in rows], "s--", label="contiguous")
        plt.xscale("log", base=2)
        plt.yscale("log")
        plt.xlabel("batch")
        plt.ylabel("decode tokens/s")
        plt.title(f"{args.preset} {args.dtype}, impl {args.impl}, on {device}{f' x {cards}' if cards > 1 else ''}")
        plt.legend()
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

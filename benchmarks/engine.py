"""The engine end to end: offline throughput on three workloads, with peers in the same run.

The workloads, the timed runs and the table come from jaxpaged/engine/bench.py (which `jaxpaged
bench` runs without the peers); this script adds the peers, the roofline and the plot.

Workloads (random token prompts, random weights, EOS ignored; seed 0):
  A  --num-requests prompts of U[100, 1024] tokens, outputs of U[100, 1024] tokens (nano-vllm's bench).
     Peers: the static `generate` (models/generate.py) in groups of --static-group requests, each
     group decoded to its longest output (only the tokens asked for count), and Hugging Face
     transformers' continuous batching (`generate_batch`) on the first --hf-requests requests, run
     first, in a process of its own, while this one holds no device memory.
  B  requests sharing a 1,024-token system prompt, 64-256 tokens of their own, 128 output tokens:
     prefix caching on and off (throughput, mean time to first token, hit rate).
  C  workload A with a pool of a quarter of the blocks it needs: throughput, preemptions, and the
     greedy tokens' agreement with A's.
Every timed run is preceded by an untimed run of the same requests, whose engine first compiles its
programs ahead on parallel threads (`Engine.warm_up`; with --no-warm-up only those its run meets);
that time and the untimed run's extra time are reported as compilation. Decoding is greedy. --min-len is capped at --max-len, and workload
B's lengths at --max-len too, so that small smoke runs fit.

Roofline (on a GPU): prefill of the prompt tokens a run has to compute at the measured bf16 matmul
peak (`matmul_peak`), and each decode step the engine ran reading the weights once plus every live
K/V position once, at the card's specified bandwidth (benchmarks/ceilings.py); the achieved
fraction is that time over the measured time.

Examples:
  python benchmarks/engine.py --model tiny --num-requests 8 --max-len 64          # CPU smoke run
  python benchmarks/engine.py --model llama-1b --workloads A B C                   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.engine.bench import format_table, run_workloads, workload_a_requests
from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.llama import MiniLLM

sys.path.insert(0, os.path.dirname(__file__))
from ceilings import device_name, spec_bandwidth  # noqa: E402


def matmul_peak(dtype, products: int = 8, repeats: int = 10) -> float:
    """Measured FLOP/s of large matrix products in the model dtype: the best of `repeats` timings of
    `products` back-to-back 8192^3 products in one call, after two untimed calls. A ceiling is the
    fastest the card went: one product timed 5 times (the median) read 561-744 TFLOP/s across five
    runs of one H200 session, and the roofline's prefill term moved with it."""
    n = 8192
    operands = [jnp.full((n, n), 1 + i, dtype) for i in range(products)]  # distinct: no product is shared
    chain = jax.jit(lambda xs: [x @ x for x in xs])
    for _ in range(2):
        jax.block_until_ready(chain(operands))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chain(operands))
        times.append(time.perf_counter() - start)
    return 2 * n**3 * products / min(times)


def run_static(model, prompts, outputs, group):
    """Useful output tokens/s of the static generate, in groups, each to its longest output; a first,
    untimed pass over the same groups compiles every shape (its extra time is reported apart)."""
    groups = [(prompts[i:i + group], outputs[i:i + group]) for i in range(0, len(prompts), group)]
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        for group_prompts, group_outputs in groups:
            generate(model, group_prompts, max_new_tokens=max(group_outputs), eos_token_ids=[])
        passes.append(time.perf_counter() - start)
    return {"output_tokens_per_second": sum(outputs) / passes[1], "compile_seconds": max(passes[0] - passes[1], 0.0)}


def run_hf(args, prompts, outputs):
    """Output tokens/s of transformers' continuous batching on the same requests, in a process of
    its own (stopped after --hf-timeout seconds), or the reason it gave none."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts, "outputs": outputs}, f)
    command = [sys.executable, __file__, "--hf-worker", f.name, "--model", args.model]
    command += [] if args.dtype is None else ["--dtype", args.dtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.hf_timeout)
    except subprocess.TimeoutExpired as stopped:
        partial = [line for line in (stopped.stdout or b"").decode(errors="replace").splitlines() if '"done"' in line]
        return {"failed": f"not done in {args.hf_timeout} s", "requests": len(prompts), "tokens_asked": sum(outputs),
                **({"partial": json.loads(partial[-1])} if partial else {})}
    finally:
        os.unlink(f.name)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"failed": (done.stderr or done.stdout)[-300:], "requests": len(prompts)}
    return json.loads(lines[-1])


def hf_worker(config, path):
    """The transformers peer itself (`run_hf` runs it apart): prints its result as one JSON line."""
    import torch
    import transformers

    with open(path) as f:
        work = json.load(f)
    prompts, outputs = work["prompts"], work["outputs"]
    hf_config = getattr(transformers, "Qwen3Config" if config.qk_norm else "LlamaConfig")(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")})
    cls = getattr(transformers, "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cls(hf_config).to(device=device, dtype=getattr(torch, config.dtype)).eval()
    generation = transformers.GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None,
                                               pad_token_id=0)
    model.generate_batch(inputs=prompts[:1], generation_config=generation, progress_bar=False)  # warm-up
    start = time.perf_counter()
    try:  # each request to its own length, as the engine's: the manager under generate_batch takes that
        manager = model.init_continuous_batching(generation_config=generation)
        manager.start()
    except Exception as error:  # an older transformers: generate_batch, every request to the longest output
        manager = None
        mode = f"generate_batch, every request to the longest output (no manager: {error})"[:300]
        results = model.generate_batch(inputs=prompts, generation_config=generation, progress_bar=False)
    if manager is not None:
        mode = "each request to its own length (ContinuousBatchingManager.add_request)"
        for i, (prompt, count) in enumerate(zip(prompts, outputs)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=count)
        results, finished_tokens = {}, 0
        while len(results) < len(prompts):  # a manager that hangs is stopped by the parent's --hf-timeout
            result = manager.get_result(timeout=1)
            if result is None:
                continue
            results[result.request_id] = result
            finished_tokens += outputs[int(result.request_id)]
            print(json.dumps({"done": len(results), "tokens_of_done": finished_tokens,  # what a stopped run shows
                              "seconds": time.perf_counter() - start}), flush=True)
        manager.stop(block=True)
    seconds = time.perf_counter() - start
    produced = sum(len(getattr(r, "generated_tokens", ())) for r in results.values())
    print(json.dumps({"tokens_per_second": sum(outputs) / seconds, "requests": len(prompts), "seconds": seconds,
                      "generated_tokens": produced, "tokens_asked": sum(outputs), "mode": mode,
                      "attn_implementation": getattr(model.config, "_attn_implementation", None),
                      "transformers": transformers.__version__, "torch": torch.__version__}))


def plot_timeline(result, path):
    """Workload A over time: output tokens/s in bins of 0.1 s (a step can return two decode calls'
    tokens at once where calls overlap, so rates between steps spike) and the running requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "timeline" not in result.get("A", {}):
        return
    times, generated, running = (np.asarray(column, float) for column in zip(*result["A"]["timeline"]))
    edges = np.arange(0.0, times[-1] + 0.1, 0.1)
    rate = np.diff(np.interp(edges, times, generated)) / 0.1
    fig, left = plt.subplots(figsize=(8, 4))
    left.step(edges[1:], rate, color="tab:blue", lw=1, where="pre")
    left.set_xlabel("seconds into the run")
    left.set_ylabel("output tokens/s", color="tab:blue")
    right = left.twinx()
    right.plot(times, running, color="tab:orange", lw=1)
    right.set_ylabel("running requests", color="tab:orange")
    left.set_title(f"engine, workload A: {result['model']} ({result['dtype']}), {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, workload A's size and the engine's batch options (this script's and serve.py's)."""
    parser.add_argument("--model", default="llama-1b", help="a preset (random weights): llama-1b, qwen3-0.6b, tiny, ...")
    parser.add_argument("--dtype", default=None, help="default: the preset's")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="pool blocks of workloads A and B (default: what fits, up to what they can use)")
    parser.add_argument("--min-prefill-tokens", type=int, default=16,
                        help="the smallest prefill call in packed tokens (fewer programs to compile)")
    parser.add_argument("--min-decode-rows", type=int, default=8, help="the smallest decode call in rows")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="compile only the programs the untimed run meets, not every shape bucket ahead")


SCAN_LAYERS = {"auto": None, "on": True, "off": False, "prefill": "prefill"}  # --scan-layers -> Engine(scan_layers=)


def runner_arguments(parser: argparse.ArgumentParser) -> None:
    """--scan-layers and --xla-option (this script's and profile_engine.py's); `runner_options` reads them."""
    parser.add_argument("--scan-layers", choices=tuple(SCAN_LAYERS), default="auto",
                        help="run the layers as one scanned body in every call (on), in none (off), in prefill "
                             "calls (prefill); auto: every call on the CPU, prefill calls on a GPU")
    parser.add_argument("--xla-option", action="append", default=None, metavar="NAME=VALUE",
                        help="an XLA option for the engine's compilations (repeatable), e.g. "
                             "xla_gpu_enable_command_buffer=FUSION,CUBLAS,WHILE")


def runner_options(args) -> dict:
    """The Engine keyword arguments that --scan-layers and --xla-option give."""
    pairs = [option.split("=", 1) for option in args.xla_option or []]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--xla-option: NAME=VALUE, got {args.xla_option}")
    return dict(scan_layers=SCAN_LAYERS[args.scan_layers], compiler_options=dict(pairs) or None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(parser)
    parser.add_argument("--workloads", nargs="+", default=["A", "B", "C"], choices=("A", "B", "C"))
    parser.add_argument("--static-group", type=int, default=64, help="0 skips the static generate peer")
    runner_arguments(parser)
    parser.add_argument("--no-mixed", action="store_true",
                        help="prefill and decode in separate calls (the engine's mixed_batches=False)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="the engine on N devices, every layer split over them (its peers stay on one)")
    parser.add_argument("--hf-requests", type=int, default=16, help="0 skips the transformers peer")
    parser.add_argument("--hf-timeout", type=float, default=300, help="seconds the transformers peer may take")
    parser.add_argument("--compare-launcher", action="store_true",
                        help="run A again with the device calls on the engine's own thread (launcher_thread=False)")
    parser.add_argument("--hf-worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot of a result file written before")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot_timeline(json.load(f), args.replot.removesuffix(".json") + ".png")
        return

    start = time.perf_counter()

    def say(line):  # each stage's line with the seconds since the start: where a run's time goes
        print(f"[{time.perf_counter() - start:5.0f} s] {line}", flush=True)

    config = preset(args.model, **({} if args.dtype is None else {"dtype": args.dtype}))
    if args.hf_worker:
        return hf_worker(config, args.hf_worker)
    transformers_peer = None
    if args.hf_requests and "A" in args.workloads:  # first, while JAX holds no device memory: the card to itself
        prompts, outputs = workload_a_requests(config, args.num_requests, args.min_len, args.max_len)
        transformers_peer = run_hf(args, prompts[:args.hf_requests], outputs[:args.hf_requests])
        say(f"A_transformers: {json.dumps(transformers_peer)}")
    model = MiniLLM(config, rngs=nnx.Rngs(0))
    gpu = jax.default_backend() == "gpu"
    engine_args = dict(block_size=16, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       decode_steps=args.decode_steps, mixed_batches=not args.no_mixed, num_blocks=args.num_blocks,
                       min_prefill_tokens=args.min_prefill_tokens, min_decode_rows=args.min_decode_rows,
                       **runner_options(args))
    engine_model = model
    if args.tensor_parallel > 1:
        from jaxpaged.models.parallel import shard_model
        from jaxpaged.parallel import make_mesh

        engine_args["mesh"] = make_mesh(args.tensor_parallel)
        engine_model = shard_model(model, engine_args["mesh"])
    result = {"device": device_name(), "jax": jax.__version__, "model": args.model, "dtype": config.dtype,
              "args": vars(args)}
    bandwidth = spec_bandwidth(device_name()) * args.tensor_parallel if gpu else None  # the N cards' together
    flops = matmul_peak(jnp.dtype(config.dtype)) * args.tensor_parallel if gpu else None
    if gpu:  # the roofline's ceilings, so that its fraction can be recomputed from the file
        result["ceilings"] = {"matmul_flops_per_second": flops, "bandwidth_bytes_per_second": bandwidth}
    say(f"the model built{' and the ceilings measured' if gpu else ''}")

    def peers(prompts, outputs, run):
        """The static generate and transformers on workload A's requests, right after the engine's run."""
        if "A" not in args.workloads:
            return
        say(f"A: {run.stats.generated_tokens / run.seconds:.0f} tokens/s, compile {run.compile_seconds:.1f} s")
        if args.static_group:
            result["A_static_generate"] = run_static(model, prompts, outputs, args.static_group)
            say(f"A_static_generate: {json.dumps(result['A_static_generate'])}")
        if transformers_peer is not None:
            result["A_transformers"] = transformers_peer

    rows = run_workloads(engine_model, args.workloads, num_requests=args.num_requests, min_len=args.min_len,
                         max_len=args.max_len, engine_args=engine_args,
                         ceilings=(flops, bandwidth) if bandwidth and flops else None, on_workload_a=peers,
                         log=say, warm_up=not args.no_warm_up)
    result.update(rows)
    if args.compare_launcher and "A" in args.workloads:
        rows["A_caller_thread"] = run_workloads(
            engine_model, ["A"], num_requests=args.num_requests, min_len=args.min_len, max_len=args.max_len,
            engine_args=dict(engine_args, launcher_thread=False),
            ceilings=(flops, bandwidth) if bandwidth and flops else None)["A"]
        result["A_caller_thread"] = rows["A_caller_thread"]

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot_timeline(result, args.out.removesuffix(".json") + ".png")
    print(f"\n{result['device']}, {args.model} ({config.dtype}), {args.num_requests} requests; written to {args.out}")
    print(format_table(rows))
    for peer in ("A_static_generate", "A_transformers"):
        if peer in result:
            print(f"{peer:<16}{json.dumps(result[peer])}")


if __name__ == "__main__":
    main()

"""The server online: workload A's requests arriving as a Poisson process, through HTTP with streaming.

For each request rate (requests/s; "inf" sends them all at once: saturation), the requests of the
engine's workload A (random token prompts of U[--min-len, --max-len], as many output tokens with EOS
ignored, greedy) go to a `jaxpaged serve` process over HTTP with `stream: true`, each at its arrival
time. Every rate's requests have workload A's lengths and tokens of their own (no run finds another's
blocks in the prefix cache). The server compiles every program greedy and sampled requests can
need before it answers (`jaxpaged serve`'s warm-up, timed and reported); the sweep is the first
traffic it sees, and each rate's row counts the programs it met that the warm-up had not compiled
(0 expected). Per request: time to first token (TTFT), time per output token after the first
(TPOT), and the gaps between streamed chunks (ITL; a chunk carries the tokens of one engine step,
up to a decode call's 16). Per rate: output tokens/s over the run, mean, median and p99 of each,
and goodput (the requests/s that met the SLO: TTFT <= --slo-ttft and TPOT <= --slo-tpot).

In the same run and on the same card, before the server starts: the engine's offline throughput on
the same requests (`benchmarks/engine.py --workloads A`, its own process), so the server's overhead
at saturation reads as 1 - (server output tokens/s at "inf") / (offline output tokens/s).

Examples:
  python benchmarks/serve.py --model tiny --num-requests 16 --max-len 64 --rates 8 inf    # CPU smoke run
  python benchmarks/serve.py --model llama-1b --rates 4 8 16 32 inf                       # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ceilings import device_name  # noqa: E402
from engine import workload_arguments  # noqa: E402

from jaxpaged.engine.bench import VOCAB, workload_a_requests  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client, url, model, prompt, max_tokens, delay):
    """Sends one streamed completion after `delay` seconds; returns its timings."""
    await asyncio.sleep(delay)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks, usage = [], None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"failed": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            payload = json.loads(line[5:])
            if payload.get("choices"):
                chunks.append(time.perf_counter())
            usage = payload.get("usage") or usage
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    ttft = chunks[0] - start if chunks else None
    return {"start": start, "end": end, "ttft": ttft, "tokens": tokens,
            "tpot": (end - chunks[0]) / (tokens - 1) if chunks and tokens > 1 else None,
            "itl": np.diff(chunks).tolist(), "chunks": len(chunks)}


async def run_rate(url, model, prompts, outputs, rate, seed):
    """All requests at Poisson arrivals of `rate` per second (inf: at once); their timings."""
    import httpx

    gaps = np.random.default_rng(seed).exponential(1 / rate, len(prompts)) if np.isfinite(rate) else np.zeros(
        len(prompts))
    arrivals = np.cumsum(gaps) - gaps[0]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        return await asyncio.gather(*(one_request(client, url, model, p, n, t)
                                      for p, n, t in zip(prompts, outputs, arrivals)))


def summarise(results, slo_ttft, slo_tpot) -> dict:
    done = [r for r in results if "failed" not in r]
    wall = max(r["end"] for r in done) - min(r["start"] for r in done)

    def stats(values):
        values = np.asarray([v for v in values if v is not None], float)
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "p99": float(np.percentile(values, 99))} if values.size else None

    good = [r for r in done if r["ttft"] is not None and r["ttft"] <= slo_ttft
            and (r["tpot"] is None or r["tpot"] <= slo_tpot)]
    return {"requests": len(results), "failed": len(results) - len(done), "seconds": wall,
            "output_tokens_per_second": sum(r["tokens"] for r in done) / wall,
            "goodput_requests_per_second": len(good) / wall, "slo_met": len(good) / len(results),
            "ttft_s": stats(r["ttft"] for r in done), "tpot_s": stats(r["tpot"] for r in done),
            "itl_s": stats(x for r in done for x in r["itl"]),
            "tokens_per_chunk": sum(r["tokens"] for r in done) / max(sum(r["chunks"] for r in done), 1)}


def start_server(args, port, log):
    command = [sys.executable, "-m", "jaxpaged.models", "serve", "--model", args.model, "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--chunk-size", str(args.decode_steps), "--max-model-len", str(2 * args.max_len),
               "--max-waiting", str(args.num_requests), "--log-level", "warning"]
    command += ["--dtype", args.dtype] if args.dtype else []
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited; the end of its log:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not come up in 600 s")


def programs(port) -> int:
    """The distinct device programs the server has run so far (from /metrics): each one compiled once."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("jaxpaged_device_programs "))))


def offline(args) -> dict:
    """The engine's offline throughput on the same requests, in its own process (benchmarks/engine.py)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "engine.json")
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine.py"),
                   "--model", args.model, "--workloads", "A", "--num-requests", str(args.num_requests),
                   "--min-len", str(args.min_len), "--max-len", str(args.max_len),
                   "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
                   str(args.max_num_batched_tokens), "--decode-steps", str(args.decode_steps),
                   "--static-group", "0", "--hf-requests", "0", "--out", out]
        command += ["--dtype", args.dtype] if args.dtype else []
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            row = json.load(f)["A"]
    return {k: v for k, v in row.items() if k != "timeline"}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rates"]
    labels = [str(r["rate"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        left.plot(labels, [r[key]["median"] for r in rows], marker="o", label=f"{name} median")
        left.plot(labels, [r[key]["p99"] for r in rows], marker="x", ls="--", label=f"{name} p99")
    left.set_yscale("log")
    left.set_xlabel("request rate (requests/s)")
    left.set_ylabel("seconds")
    left.legend()
    right.plot(labels, [r["output_tokens_per_second"] for r in rows], marker="o", label="server")
    right.axhline(result["offline"]["output_tokens_per_second"], color="gray", ls=":", label="engine offline")
    right.set_xlabel("request rate (requests/s)")
    right.set_ylabel("output tokens/s")
    right.legend()
    fig.suptitle(f"jaxpaged serve, workload A: {result['model']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(parser)
    parser.add_argument("--rates", nargs="+", type=float, default=[4, 8, 16, 32, float("inf")],
                        help="request rates in requests/s; inf sends every request at once (default 4 8 16 32 inf)")
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="seconds to the first token (default 1)")
    parser.add_argument("--slo-tpot", type=float, default=0.025, help="seconds per output token (default 0.025)")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()

    import jax

    from jaxpaged.models.config import preset

    config = preset(args.model)
    prompts, outputs = workload_a_requests(config, args.num_requests, args.min_len, args.max_len)
    vocab = min(config.vocab_size, VOCAB)
    result = {"device": device_name(), "jax": jax.__version__, "model": args.model, "args": vars(args),
              "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot}}
    print("the engine offline, same requests ...", flush=True)
    result["offline"] = offline(args)
    port = free_port()
    url, rows, runs = f"http://127.0.0.1:{port}/v1/completions", [], itertools.count(1)

    def requests():
        """Workload A's lengths with tokens of their own: no run finds another's blocks in the prefix cache."""
        shift = next(runs) * 7919
        return [[(t + shift) % vocab for t in p] for p in prompts]

    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        server = start_server(args, port, log)
        result["server_start_s"] = time.perf_counter() - start
        log.seek(0)
        found = re.search(r"compiled \d+ programs in \d+ s", log.read())
        result["warm_up"] = found.group(0) if found else None
        result["warm_up_programs"] = programs(port)
        try:
            for rate in tqdm.tqdm(args.rates, desc="request rates"):
                before = programs(port)
                timings = asyncio.run(run_rate(url, args.model, requests(), outputs, rate, 1))
                rows.append({"rate": rate if np.isfinite(rate) else "inf", "new_programs": programs(port) - before,
                             **summarise(timings, args.slo_ttft, args.slo_tpot)})
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    result["rates"] = rows
    saturated = next((r for r in rows if r["rate"] == "inf"), None)
    if saturated:
        result["overhead_at_saturation"] = 1 - saturated["output_tokens_per_second"] / result["offline"][
            "output_tokens_per_second"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out.removesuffix(".json") + ".png")
    print(f"\n{result['device']}, {args.model}, {args.num_requests} requests; engine offline "
          f"{result['offline']['output_tokens_per_second']:,.0f} output tokens/s; server up in "
          f"{result['server_start_s']:.0f} s ({result['warm_up']}); written to {args.out}")
    print(f"{'rate':>6}{'out tok/s':>11}{'goodput':>9}{'TTFT med':>10}{'TTFT p99':>10}{'TPOT med':>10}"
          f"{'TPOT p99':>10}{'ITL med':>9}{'failed':>8}{'compiled':>9}")
    for r in rows:
        print(f"{r['rate']:>6}{r['output_tokens_per_second']:>11,.0f}{r['goodput_requests_per_second']:>9.2f}"
              f"{r['ttft_s']['median']:>10.3f}{r['ttft_s']['p99']:>10.3f}{r['tpot_s']['median']:>10.4f}"
              f"{r['tpot_s']['p99']:>10.4f}{r['itl_s']['median']:>9.4f}{r['failed']:>8}{r['new_programs']:>9}")
    if saturated:
        print(f"server overhead at saturation: {result['overhead_at_saturation']:.1%}")


if __name__ == "__main__":
    main()

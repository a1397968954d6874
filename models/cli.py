"""The `jaxpaged` command: generate text on the engine, benchmark it, or train a MiniLLM.

    jaxpaged generate "The capital of France is"            # the embedded SmolLM2-135M-Instruct
    jaxpaged generate --chat "Tell me a joke" --temperature 0.7 --top-p 0.9
    jaxpaged generate --file prompts.txt --max-num-seqs 16   # continuous batching over many prompts
    jaxpaged bench --model llama-1b --workload A --out engine.json
    jaxpaged train --text corpus.txt --out my-model && jaxpaged generate --model my-model "Once"

Only the generated text goes to stdout; progress, memory statistics and speed go to stderr. By
default the dequantised weights of a GGUF file and XLA's compiled programs are cached under
$JAXPAGED_CACHE_DIR, else $XDG_CACHE_HOME/jaxpaged, else ~/.cache/jaxpaged (--no-cache: neither).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from jaxpaged.config import QUANTIZED_KV_DTYPES
from jaxpaged.engine.bench import WORKLOADS
from jaxpaged.engine.detokenize import TextStream
from jaxpaged.models.config import PRESET_NAMES

DTYPES = ("float32", "bfloat16", "float16")
LONG_PREFILL_TOKENS = 1024  # a prefill this long takes seconds on a CPU: say so before it starts
DEFAULT_MAX_NUM_SEQS = 64  # generate's default ceiling on the sequences the engine runs at once
# generate's flags that only the engine takes (--cache contiguous and --data-parallel refuse them)
ENGINE_ONLY = ("min_p", "repetition_penalty", "stop", "n", "max_num_seqs", "max_num_batched_tokens")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _power_of_two(text: str) -> int:
    value = _positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _attention_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention", choices=("auto", "kernel", "reference"),
                        default=os.environ.get("JAXPAGED_ATTENTION", "auto"),
                        help="paged attention's path: the GPU kernels where they run (auto, the default; "
                             "$JAXPAGED_ATTENTION sets another), the kernels or an error (kernel), or the "
                             "gather-then-attend reference (reference)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpaged", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from prompts", description=(
        "Generate text on the inference engine (jaxpaged.engine): every prompt, from the arguments or a file "
        "(one per line), is a request with the same sampling flags; the engine runs them with continuous "
        "batching over one paged pool, and the completions are printed in the prompts' order. With one prompt "
        "the text streams as it is produced. Only the text goes to stdout; loading progress, a progress bar, "
        "memory statistics and tokens/s go to stderr. --cache contiguous runs the static one-shot generate "
        "instead (one batch, a contiguous cache: the engine is paged only), without the engine's options "
        "(--min-p, --repetition-penalty, --stop, --n, --max-num-seqs, --max-num-batched-tokens)."))
    gen.add_argument("prompts", nargs="*", help="prompt texts")
    gen.add_argument("--file", help="a file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template as a user message")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64,
                     help="tokens to generate per prompt (default 64); prompt + this must fit the model's context")
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 (default) keeps all")
    gen.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling threshold (default 1: off)")
    gen.add_argument("--min-p", type=_unit_interval, default=0.0,
                     help="drop tokens less likely than this times the most likely one (default 0: off)")
    gen.add_argument("--repetition-penalty", type=_positive_float, default=1.0,
                     help="above 1 discourages tokens already in the prompt or the completion (default 1: off)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end a completion where TEXT appears (TEXT not printed); repeatable")
    gen.add_argument("--n", type=_positive_int, default=1,
                     help="completions per prompt (default 1), sampled from the prompt's shared blocks; above 1 "
                          "they are printed as --- [PROMPT.COMPLETION] and nothing streams")
    gen.add_argument("--seed", type=int, default=0,
                     help="seed of the sampling (default 0); with the paged cache each request draws its own "
                          "stream from it")
    gen.add_argument("--cache", choices=("paged", "contiguous"), default="paged",
                     help="paged (default): the engine, continuous batching; contiguous: the static one-shot "
                          "generate over a contiguous cache")
    gen.add_argument("--block-size", type=_power_of_two, default=16, help="positions per block (default 16)")
    gen.add_argument("--num-blocks", type=_positive_int, default=None,
                     help="blocks in the paged pool (default: enough for the --max-num-seqs largest requests to "
                          "reach their maximum together; fewer queue or preempt requests, each must fit alone)")
    gen.add_argument("--max-num-seqs", type=_positive_int, default=None,
                     help="sequences the engine runs at once (default: the number asked for, up to "
                          f"{DEFAULT_MAX_NUM_SEQS}, rounded up to a power of two)")
    gen.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                     help="prompt tokens one prefill step computes at most (default 2048; longer prompts go in chunks)")
    gen.add_argument("--model", default=None,
                     help="a .gguf file or a checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and cache dtype (default float32)")
    gen.add_argument("--kv-dtype", choices=QUANTIZED_KV_DTYPES, default=None,
                     help="store the paged cache's K and V in 8 bits, with a float16 scale per position and kv head "
                          "(default: in --dtype); about half the bytes, so about twice the sequences in a pool")
    gen.add_argument("--chunk-size", type=_positive_int, default=16, help="decode steps per device call (default 16)")
    gen.add_argument("--tensor-parallel", type=_positive_int, default=1, metavar="N",
                     help="split every layer over N devices: the kv heads (and their K/V in the cache), the MLP "
                          "(default 1); on the engine (with --cache contiguous or --data-parallel, the static "
                          "one-shot generate)")
    gen.add_argument("--data-parallel", type=_positive_int, default=1, metavar="M",
                     help="M replicas, each with its own cache and 1/M of the prompts (default 1); M x N devices "
                          "must divide the devices here; M > 1 runs the static one-shot generate, over the paged "
                          "cache unless --cache contiguous, without the engine's options")
    _attention_argument(gen)
    gen.set_defaults(run=run_generate, subparser=gen)

    bench = commands.add_parser("bench", help="run the engine's throughput benchmark", description=(
        "Run the engine's offline throughput benchmark (jaxpaged.engine.bench) and print one row a run: "
        "output and total (prompt + output) tokens/s, compilation seconds, preemptions, prefix cache hit "
        "rate, the device's idle share (time it waited for the host), and the mean time to the first token. Prompts are random "
        "tokens, decoding is greedy with EOS ignored, and every timed run follows an untimed run of the same "
        "requests that compiles its shapes (the difference is the compile column). XLA's compilation cache "
        "is not used. The workloads: " + "; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()) + ". "
        "The defaults are the GPU workload (256 requests of U[100, 1024] tokens in and out); on a CPU, "
        "try --model tiny --num-requests 8 --max-len 64. benchmarks/engine.py runs the same with peers beside."))
    bench.add_argument("--model", default="llama-1b",
                       help=f"a preset with random weights ({', '.join(PRESET_NAMES)}; default llama-1b), or a "
                            ".gguf file or a checkpoint directory (its weights)")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="parameter and cache dtype (default: the model's)")
    bench.add_argument("--workload", nargs="+", choices=tuple(WORKLOADS), default=["A"],
                       help="one or more of A, B, C (default A; C runs A too, to compare tokens)")
    bench.add_argument("--num-requests", type=_positive_int, default=256,
                       help="requests of each workload (default 256)")
    bench.add_argument("--min-len", type=_positive_int, default=100,
                       help="shortest prompt and output of workloads A and C (default 100, capped at --max-len)")
    bench.add_argument("--max-len", type=_positive_int, default=1024,
                       help="longest prompt and output of A and C (default 1024); B's system prompt (up to 1024)")
    bench.add_argument("--block-size", type=_power_of_two, default=16, help="positions per block (default 16)")
    bench.add_argument("--max-num-seqs", type=_positive_int, default=256,
                       help="sequences the engine runs at once (default 256)")
    bench.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192,
                       help="prompt tokens one prefill step computes at most (default 8192)")
    bench.add_argument("--decode-steps", type=_positive_int, default=64,
                       help="decode steps per device call (default 64)")
    _attention_argument(bench)
    bench.add_argument("--out", metavar="FILE.json", default=None,
                       help="also write the results (each run's row, A's timeline, the arguments) as JSON")
    bench.set_defaults(run=run_bench, subparser=bench)

    serve = commands.add_parser("serve", help="serve a model over HTTP with OpenAI's API", description=(
        "Serve a model on the engine over HTTP, speaking OpenAI's API: POST /v1/completions, "
        "POST /v1/chat/completions (the model's chat template), GET /v1/models, GET /health and GET /metrics "
        "(Prometheus). Requests join the running batch as they arrive; stream: true answers with server-sent "
        "events. SIGINT or SIGTERM stops it: running requests get --shutdown-grace seconds to finish, then are "
        "aborted."))
    serve.add_argument("--model", default=None,
                       help="a .gguf file or a checkpoint directory (default: the embedded SmolLM2-135M-Instruct), "
                            f"or a preset with random weights and no tokenizer ({', '.join(PRESET_NAMES)}): token-id "
                            "prompts only")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in requests and /v1/models (default: the file's or preset's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"),
                       help="require Authorization: Bearer KEY on every endpoint but /health (default "
                            "$JAXPAGED_API_KEY; none: open)")
    serve.add_argument("--max-waiting", type=_positive_int, default=256,
                       help="requests that may wait for admission; more are answered 503 with Retry-After (default 256)")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=DEFAULT_MAX_NUM_SEQS,
                       help=f"sequences the engine runs at once (default {DEFAULT_MAX_NUM_SEQS})")
    serve.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                       help="prompt tokens one prefill step computes at most (default 2048)")
    serve.add_argument("--max-model-len", type=_positive_int, default=None,
                       help="longest prompt + output (default: the model's context)")
    serve.add_argument("--block-size", type=_power_of_two, default=16, help="positions per block (default 16)")
    serve.add_argument("--num-blocks", type=_positive_int, default=None,
                       help="blocks in the pool (default: what the device's free memory holds, at most room for "
                            "every sequence at --max-model-len)")
    serve.add_argument("--dtype", choices=DTYPES, default=None,
                       help="parameter and cache dtype (default: float32 for a file, the preset's for a preset)")
    serve.add_argument("--kv-dtype", choices=QUANTIZED_KV_DTYPES, default=None,
                       help="store K and V in 8 bits with a float16 scale per position and kv head (default: --dtype)")
    serve.add_argument("--chunk-size", type=_positive_int, default=16, help="decode steps per device call (default 16)")
    serve.add_argument("--tensor-parallel", type=_positive_int, default=1, metavar="N",
                       help="split every layer over N devices: the kv heads (and their K/V in the pool), the MLP "
                            "(default 1); N must divide the devices here")
    serve.add_argument("--shutdown-grace", type=_non_negative_float, default=30.0,
                       help="seconds running requests may take to finish after SIGINT/SIGTERM before they are "
                            "aborted (default 30)")
    serve.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                       help="start serving at once; by default every program that greedy and sampled requests can "
                            "need is compiled first (a progress bar), so that no request waits on a compilation "
                            "later")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                       help="the HTTP server's log level (default info)")
    _attention_argument(serve)
    serve.set_defaults(run=run_serve, subparser=serve)

    train = commands.add_parser("train", help="train or fine-tune a MiniLLM on a text file", description=(
        "Train a MiniLLM with optax (AdamW) on a text file and save a checkpoint directory that "
        "`jaxpaged generate --model` loads. From scratch with a preset and a byte-level tokenizer, "
        "or fine-tune a model given by --init."))
    train.add_argument("--text", required=True, help="the training text file")
    train.add_argument("--out", required=True, help="directory to write the checkpoint to")
    train.add_argument("--preset", default="tiny", help="architecture when training from scratch (default tiny)")
    train.add_argument("--init", default=None, help="fine-tune this model (.gguf or checkpoint directory) instead")
    train.add_argument("--steps", type=_positive_int, default=200, help="optimiser steps (default 200)")
    train.add_argument("--batch-size", type=_positive_int, default=8, help="windows per step (default 8)")
    train.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per window (default 64)")
    train.add_argument("--learning-rate", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the windows (default 0)")
    train.set_defaults(run=run_train, subparser=train)

    for command in (gen, serve, train):
        command.add_argument("--no-cache", action="store_true",
                             help="neither read nor write the weight and compilation caches")
    bench.add_argument("--no-cache", action="store_true",
                       help="neither read nor write the cache of a GGUF file's weights (XLA's compilation cache "
                            "is never used here)")
    return parser


def _status(args, message: str) -> None:
    """One line of progress or diagnostics on stderr, prefixed like the command's errors."""
    print(f"jaxpaged {args.command}: {message}", file=sys.stderr, flush=True)


def enable_compilation_cache(cache_dir: str) -> None:
    """Keeps XLA's compiled programs in cache_dir/xla, every one of them (by default JAX keeps only
    those that took over a second to compile; on a CPU the many small ones add up too)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _cache_dir(args) -> str | None:
    """The user's cache directory (None with --no-cache), with the compilation cache turned on there."""
    from jaxpaged.models.gguf_weights import user_cache_dir

    if args.no_cache:
        return None
    cache_dir = user_cache_dir()
    enable_compilation_cache(cache_dir)
    return cache_dir


def _open(args, path: str | None):
    """Opens a model (ModelFiles) with the command's cache settings and progress on stderr."""
    from jaxpaged.models.checkpoint import open_model

    return open_model(path, cache_dir=_cache_dir(args), progress=True)


def _load(args, files, dtype: str | None, mesh=None):
    """The model's weights (each read into its shards on `mesh`, if given), with a line on stderr
    saying where from and how long it took."""
    _status(args, f"loading weights from {files.weights_path}")
    start = time.perf_counter()
    model = files.load(dtype, mesh=mesh)
    _status(args, f"loaded in {time.perf_counter() - start:.1f} s")
    return model


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as error:
            args.subparser.error(f"cannot read --file: {error}")
    if not prompts:
        args.subparser.error("give at least one prompt, as an argument or with --file")
    return prompts


def blocks_needed(prompt_lengths: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """Blocks each request takes at its longest, as the engine counts them: the prompt plus max_new_tokens
    positions, in whole blocks (the engine refuses a request that needs more than the pool holds)."""
    return [math.ceil((length + max_new_tokens) / block_size) for length in prompt_lengths]


def default_max_num_seqs(num_seqs: int) -> int:
    """The sequences asked for (prompts times --n), rounded up to a power of two (a shape the compiled
    programs share with other runs), and at most DEFAULT_MAX_NUM_SEQS."""
    return min(DEFAULT_MAX_NUM_SEQS, 1 << max(num_seqs - 1, 0).bit_length())


def default_num_blocks(needs: list[int], n: int, max_num_seqs: int) -> int:
    """A pool in which the max_num_seqs largest sequences (n per request) reach their maximum together,
    so that nothing is ever preempted."""
    per_seq = sorted((need for need in needs for _ in range(n)), reverse=True)
    return sum(per_seq[:max_num_seqs])


def _check_sizes(args, ids: list[list[int]], context: int) -> None:
    """Refuses, before any work, a prompt that cannot fit the context or a request that cannot fit the pool."""
    error = args.subparser.error
    for i, prompt in enumerate(ids):
        if len(prompt) + args.max_new_tokens > context:
            which = "the prompt" if len(ids) == 1 else f"prompt {i}"
            error(f"{which} has {len(prompt)} tokens; with --max-new-tokens {args.max_new_tokens} that is "
                  f"{len(prompt) + args.max_new_tokens} positions, more than the model's context of {context}")
    if args.cache == "paged" and args.num_blocks is not None:
        needs = blocks_needed([len(p) for p in ids], args.max_new_tokens, args.block_size)
        i = max(range(len(ids)), key=lambda j: (needs[j], len(ids[j])))
        if args.num_blocks < needs[i]:
            which = "the prompt" if len(ids) == 1 else f"prompt {i}"
            error(f"--num-blocks {args.num_blocks} is too few: {which} has {len(ids[i])} tokens; with "
                  f"--max-new-tokens {args.max_new_tokens} it needs {needs[i]} blocks of {args.block_size} positions")


def run_generate(args) -> int:
    prompts = _read_prompts(args)
    if args.top_k < 0:
        args.subparser.error("--top-k must be >= 0")
    if args.kv_dtype and args.cache == "contiguous":
        args.subparser.error("--kv-dtype: 8-bit K/V is for the paged cache; the contiguous cache holds --dtype")
    mesh = _mesh(args)
    static = args.cache == "contiguous" or args.data_parallel > 1
    if static:
        defaults = args.subparser.parse_args([])
        given = [name for name in ENGINE_ONLY if getattr(args, name) != getattr(defaults, name)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            args.subparser.error(f"{flags}: the engine's options, for --cache paged only" if args.cache == "contiguous"
                                 else f"{flags}: the engine's options; with --data-parallel the static one-shot "
                                 "generate runs (the engine takes a tensor axis only)")
    files = _open(args, args.model)
    tokenizer = files.tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: cannot turn text into tokens")
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not i for i in ids):
        args.subparser.error("a prompt encodes to no tokens")
    _check_sizes(args, ids, files.config.max_position_embeddings)
    model = _load(args, files, args.dtype, mesh)
    if mesh is not None:
        c = model.config
        _status(args, f"tensor parallel {args.tensor_parallel} x data parallel {args.data_parallel} on "
                      f"{mesh.devices.flat[0].platform} devices: {c.num_heads} query and {c.num_kv_heads} kv heads "
                      f"laid out, {c.num_kv_heads // args.tensor_parallel} kv head(s) a device")
    eos = tuple(dict.fromkeys(tokenizer.eos_token_ids + model.config.eos_token_ids))
    prompt_tokens = sum(map(len, ids))
    if prompt_tokens >= LONG_PREFILL_TOKENS:
        _status(args, f"prefilling {prompt_tokens} prompt tokens")
    shown = ["" if args.chat else prompt for prompt in prompts]  # what is printed before each completion
    if static:
        return _generate_static(args, model, tokenizer, shown, ids, eos, mesh)
    return _generate_on_engine(args, model, tokenizer, shown, ids, eos, mesh)


def _mesh(args):
    """The device mesh of --tensor-parallel (and generate's --data-parallel), or None for one device."""
    data_parallel = getattr(args, "data_parallel", 1)
    if args.tensor_parallel * data_parallel == 1:
        return None
    from jaxpaged.parallel import make_mesh

    try:
        return make_mesh(args.tensor_parallel, data_parallel)
    except ValueError as error:
        args.subparser.error(f"--tensor-parallel {args.tensor_parallel}, --data-parallel {data_parallel}: {error}")


def _generate_static(args, model, tokenizer, shown: list[str], ids: list[list[int]], eos: tuple[int, ...],
                     mesh=None) -> int:
    """--cache contiguous, or data-parallel replicas: the static one-shot generate (models/generate.py), one batch."""
    import jax

    from jaxpaged.models.generate import generate
    from jaxpaged.models.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    streamed = []
    stream = TextStream()

    def on_tokens(new_tokens):
        streamed.extend(new_tokens[0])
        sys.stdout.write(stream.update(tokenizer.decode(streamed)))
        sys.stdout.flush()

    one = len(ids) == 1
    if one:
        sys.stdout.write(shown[0])
    result = generate(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed),
                      cache=args.cache, block_size=args.block_size, num_blocks=args.num_blocks, eos_token_ids=eos,
                      chunk_size=args.chunk_size, on_tokens=on_tokens if one else None, impl=args.attention,
                      show_progress=True, kv_dtype=args.kv_dtype, mesh=mesh)
    if one:
        sys.stdout.write(stream.update(tokenizer.decode(streamed), finished=True) + "\n")
    else:
        for i, tokens in enumerate(result.tokens):
            print(f"--- [{i}] {shown[i]}{tokenizer.decode(tokens)}")
    sys.stdout.flush()
    _note_cut(args, [str(i) for i, reason in enumerate(result.finish_reasons) if reason == "length"], len(ids))
    _status(args, f"{args.cache} cache, peak memory:\n{result.peak_memory.format()}")
    _status(args, f"prefill: {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.1f} tokens/s; "
                  f"decode: {result.decode_tokens} tokens, {result.decode_tokens_per_second:.1f} tokens/s "
                  f"(wall time on {jax.devices()[0].platform}, first calls include compilation)")
    return 0


def _note_cut(args, cut: list[str], count: int) -> None:
    """Says on stderr which completions stopped at --max-new-tokens rather than at an end-of-text token."""
    if cut:
        which = "the completion" if count == 1 else f"completion{'s' * (len(cut) > 1)} {', '.join(cut)}"
        _status(args, f"{which} stopped at --max-new-tokens {args.max_new_tokens}, not at an end-of-text token")


def _generate_on_engine(args, model, tokenizer, shown: list[str], ids: list[list[int]], eos: tuple[int, ...],
                        mesh=None) -> int:
    """--cache paged: every prompt a request on the engine (its pools sharded over kv heads on a mesh's
    tensor axis); one prompt streams, several get a progress bar."""
    import jax
    import tqdm

    from jaxpaged.engine import Engine, SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            max_tokens=args.max_new_tokens, stop=tuple(args.stop), stop_token_ids=eos)
    max_num_seqs = args.max_num_seqs or default_max_num_seqs(len(ids) * args.n)
    needs = blocks_needed([len(p) for p in ids], args.max_new_tokens, args.block_size)
    num_blocks = args.num_blocks or default_num_blocks(needs, args.n, max_num_seqs)
    engine = Engine(model, tokenizer, block_size=args.block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed, impl=args.attention,
                    decode_steps=args.chunk_size, kv_dtype=args.kv_dtype, mesh=mesh)
    for i, prompt in enumerate(ids):
        engine.add_request(str(i), prompt, params)
    streaming = len(ids) == 1 and args.n == 1
    stream = TextStream(params.stop)
    if streaming:
        sys.stdout.write(shown[0])
        sys.stdout.flush()
    done = {}
    with tqdm.tqdm(total=len(ids), desc="requests", unit="request", disable=streaming, leave=False,
                   file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if not outputs:
                raise RuntimeError("the engine could not schedule the waiting requests")
            for output in outputs:
                if streaming:
                    sys.stdout.write(stream.update(output.outputs[0].text, output.finished))
                    sys.stdout.flush()
                if output.finished:
                    done[int(output.request_id)] = output
                    bar.update(1)
            bar.set_postfix_str(engine.stats().format(), refresh=False)
    results = [done[i] for i in range(len(ids))]
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, result in enumerate(results):
            for completion in result.outputs:
                label = f"{i}" if args.n == 1 else f"{i}.{completion.index}"
                print(f"--- [{label}] {shown[i]}{completion.text}")
    sys.stdout.flush()
    _note_cut(args, [f"{i}" if args.n == 1 else f"{i}.{c.index}" for i, r in enumerate(results) for c in r.outputs
                     if c.finish_reason == "length"], len(ids) * args.n)
    stats, config, mib = engine.stats(), engine.cache_config, 1 / 2**20
    peak_blocks = stats.peak_used_blocks
    kind = "paged cache" + (f" in {args.kv_dtype}" if args.kv_dtype else "")
    _status(args, f"{kind}, peak memory: {peak_blocks} of {config.num_blocks} blocks of {config.block_size} "
                  f"positions held at most ({peak_blocks * config.bytes_per_block * mib:.2f} MiB of "
                  f"{config.pool_bytes * mib:.2f} MiB reserved), up to {max_num_seqs} sequences at once")
    host = 1 - stats.device_seconds / stats.step_seconds if stats.step_seconds else 0.0
    _status(args, f"engine: {len(ids)} request(s), {sum(map(len, ids))} prompt tokens, {stats.generated_tokens} "
                  f"tokens generated in {stats.step_seconds:.1f} s, {stats.tokens_per_second:.1f} tokens/s; "
                  f"preempted {stats.preemptions}, prefix hits {stats.prefix_hit_rate:.0%}, host share {host:.0%} "
                  f"(wall time on {jax.devices()[0].platform}, first calls include compilation)")
    return 0


def _bench_model(args):
    """A preset with random weights, or a model file's weights (cached as generate caches them, but
    without XLA's compilation cache, so that the compile column measures this run)."""
    if args.model in PRESET_NAMES:
        from jaxpaged.models.checkpoint import preset_model

        return preset_model(args.model, args.dtype)
    from jaxpaged.models.checkpoint import open_model
    from jaxpaged.models.gguf_weights import user_cache_dir

    files = open_model(args.model, cache_dir=None if args.no_cache else user_cache_dir(), progress=True)
    return _load(args, files, args.dtype)


def run_bench(args) -> int:
    import json

    from jaxpaged.engine.bench import device_name, format_table, run_workloads

    model = _bench_model(args)
    engine_args = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, decode_steps=args.decode_steps,
                       impl=args.attention)
    rows = run_workloads(model, args.workload, num_requests=args.num_requests, min_len=args.min_len,
                         max_len=args.max_len, engine_args=engine_args, log=lambda line: _status(args, line))
    arguments = {k: v for k, v in vars(args).items() if k not in ("run", "subparser", "command")}
    result = {"device": device_name(), "model": args.model, "dtype": model.config.dtype, "args": arguments, **rows}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    where = f"; written to {args.out}" if args.out else ""
    print(f"{result['device']}, {args.model} ({model.config.dtype}), {args.num_requests} requests{where}")
    print(format_table(rows))
    if "C" in rows:
        c = rows["C"]
        print(f"C: a pool of {c['num_blocks']} blocks; {c['requests_equal_to_A']} of {args.num_requests} requests "
              f"gave workload A's tokens, {c['completed']} completed")
    return 0


def run_serve(args) -> int:
    from jaxpaged.engine.engine import Engine
    from jaxpaged.engine.server import run

    mesh = _mesh(args)
    if args.model in PRESET_NAMES:
        _cache_dir(args)
        from jaxpaged.models.checkpoint import preset_model

        model, tokenizer, name = preset_model(args.model, args.dtype, mesh=mesh), None, args.model
    else:
        files = _open(args, args.model)
        model, tokenizer = _load(args, files, args.dtype or "float32", mesh), files.tokenizer
        name = "SmolLM2-135M-Instruct" if args.model is None else os.path.splitext(
            os.path.basename(os.path.normpath(args.model)))[0]
    engine = Engine(model, tokenizer, block_size=args.block_size, num_blocks=args.num_blocks,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=args.max_model_len, impl=args.attention, decode_steps=args.chunk_size,
                    kv_dtype=args.kv_dtype, mesh=mesh)
    name = args.served_model_name or name
    if args.warm_up:
        start = time.perf_counter()
        compiled = engine.warm_up(use_tqdm=True)
        _status(args, f"compiled {compiled} programs in {time.perf_counter() - start:.0f} s")
    _status(args, f"serving {name} on http://{args.host}:{args.port} ({engine.cache_config.num_blocks} blocks of "
                  f"{args.block_size}, {args.max_num_seqs} sequences at once)")
    run(engine, name, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_waiting,
        shutdown_grace=args.shutdown_grace, log_level=args.log_level)
    return 0


def run_train(args) -> int:
    import numpy as np
    from flax import nnx

    from jaxpaged.models.checkpoint import save_checkpoint
    from jaxpaged.models.config import preset
    from jaxpaged.models.llama import MiniLLM
    from jaxpaged.models.tokenizer import Tokenizer
    from jaxpaged.models.train import train

    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        args.subparser.error(f"cannot read --text: {error}")
    if args.init:
        files = _open(args, args.init)
        tokenizer = files.tokenizer
        if tokenizer is None:
            raise ValueError(f"{args.init} has no tokenizer")
        model = _load(args, files, None)
    else:
        _cache_dir(args)
        tokenizer = Tokenizer.byte_level()
        config = preset(args.preset, vocab_size=tokenizer.vocab_size, eos_token_ids=tokenizer.eos_token_ids)
        model = MiniLLM(config, rngs=nnx.Rngs(args.seed))
    token_ids = np.asarray(tokenizer.encode(text), np.int32)
    model, losses = train(model, token_ids, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          learning_rate=args.learning_rate, seed=args.seed)
    save_checkpoint(model, args.out, tokenizer)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; saved to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"jaxpaged {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

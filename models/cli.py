"""The `jaxpaged` command: generate text through the paged cache, or train a MiniLLM.

    jaxpaged generate "The capital of France is"            # the embedded SmolLM2-135M-Instruct
    jaxpaged generate --chat "Tell me a joke" --temperature 0.7 --top-p 0.9
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

DTYPES = ("float32", "bfloat16", "float16")
LONG_PREFILL_TOKENS = 1024  # a prefill this long takes seconds on a CPU: say so before it starts


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpaged", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from prompts", description=(
        "Generate text through the paged KV cache. Prompts come from the arguments or a file (one per line). "
        "With one prompt the text streams as it is produced. Only the text goes to stdout; loading progress, "
        "memory statistics and tokens/s go to stderr."))
    gen.add_argument("prompts", nargs="*", help="prompt texts")
    gen.add_argument("--file", help="a file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template as a user message")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64,
                     help="tokens to generate per prompt (default 64); prompt + this must fit the model's context")
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 (default) keeps all")
    gen.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling threshold (default 1: off)")
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    gen.add_argument("--cache", choices=("paged", "contiguous"), default="paged", help="KV cache kind (default paged)")
    gen.add_argument("--block-size", type=_power_of_two, default=16, help="positions per block (default 16)")
    gen.add_argument("--num-blocks", type=_positive_int, default=None,
                     help="blocks in the paged pool (default: enough for every prompt to reach its maximum)")
    gen.add_argument("--model", default=None,
                     help="a .gguf file or a checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and cache dtype (default float32)")
    gen.add_argument("--chunk-size", type=_positive_int, default=16, help="decode steps per jitted call (default 16)")
    gen.add_argument("--attention", choices=("auto", "kernel", "reference"),
                     default=os.environ.get("JAXPAGED_ATTENTION", "auto"),
                     help="paged attention's path: the GPU kernels where they run (auto, the default; "
                          "$JAXPAGED_ATTENTION sets another), the kernels or an error (kernel), or the "
                          "gather-then-attend reference (reference)")
    gen.set_defaults(run=run_generate, subparser=gen)

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

    for command in (gen, train):
        command.add_argument("--no-cache", action="store_true",
                             help="neither read nor write the weight and compilation caches")
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


def _load(args, files, dtype: str | None):
    """The model's weights, with a line on stderr saying where from and how long it took."""
    _status(args, f"loading weights from {files.weights_path}")
    start = time.perf_counter()
    model = files.load(dtype)
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


def blocks_needed(prompt_lengths: list[int], max_new_tokens: int, block_size: int) -> int:
    """Blocks of the paged pool that the prompts take if every one runs to max_new_tokens.

    The cache holds a prompt and every new token but the last (which is sampled, never attended to).
    """
    return sum(math.ceil((length + max_new_tokens - 1) / block_size) for length in prompt_lengths)


def _check_sizes(args, ids: list[list[int]], context: int) -> None:
    """Refuses, before any work, a prompt that cannot fit the context or a pool that cannot hold the prompts."""
    error = args.subparser.error
    for i, prompt in enumerate(ids):
        if len(prompt) + args.max_new_tokens > context:
            which = "the prompt" if len(ids) == 1 else f"prompt {i}"
            error(f"{which} has {len(prompt)} tokens; with --max-new-tokens {args.max_new_tokens} that is "
                  f"{len(prompt) + args.max_new_tokens} positions, more than the model's context of {context}")
    if args.cache == "paged" and args.num_blocks is not None:
        needed = blocks_needed([len(p) for p in ids], args.max_new_tokens, args.block_size)
        if args.num_blocks < needed:
            error(f"--num-blocks {args.num_blocks} is too few: {len(ids)} prompt(s) of {sum(map(len, ids))} tokens "
                  f"with --max-new-tokens {args.max_new_tokens} need {needed} blocks of {args.block_size} positions")


def run_generate(args) -> int:
    prompts = _read_prompts(args)
    if args.top_k < 0:
        args.subparser.error("--top-k must be >= 0")
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

    import jax

    from jaxpaged.models.generate import generate
    from jaxpaged.models.sampling import SamplingParams

    model = _load(args, files, args.dtype)
    eos = tuple(dict.fromkeys(tokenizer.eos_token_ids + model.config.eos_token_ids))
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    streamed = [[] for _ in prompts]
    shown = [""]

    def stream(new_tokens):
        streamed[0].extend(new_tokens[0])
        text = tokenizer.decode(streamed[0])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    prompt_tokens = sum(map(len, ids))
    if prompt_tokens >= LONG_PREFILL_TOKENS:
        _status(args, f"prefilling {prompt_tokens} prompt tokens")
    if len(prompts) == 1:
        sys.stdout.write(prompts[0] if not args.chat else "")
    result = generate(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed),
                      cache=args.cache, block_size=args.block_size, num_blocks=args.num_blocks, eos_token_ids=eos,
                      chunk_size=args.chunk_size, on_tokens=stream if len(prompts) == 1 else None,
                      impl=args.attention, show_progress=True)
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for i, (prompt, tokens) in enumerate(zip(prompts, result.tokens)):
            print(f"--- [{i}] {prompt if not args.chat else ''}{tokenizer.decode(tokens)}")
    sys.stdout.flush()
    cut = [i for i, reason in enumerate(result.finish_reasons) if reason == "length"]
    if cut:
        which = "the completion" if len(prompts) == 1 else f"completions {', '.join(map(str, cut))}"
        _status(args, f"{which} stopped at --max-new-tokens {args.max_new_tokens}, not at an end-of-text token")
    _status(args, f"{args.cache} cache, peak memory:\n{result.peak_memory.format()}")
    _status(args, f"prefill: {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.1f} tokens/s; "
                  f"decode: {result.decode_tokens} tokens, {result.decode_tokens_per_second:.1f} tokens/s "
                  f"(wall time on {jax.devices()[0].platform}, first calls include compilation)")
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

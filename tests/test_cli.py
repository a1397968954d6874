"""The jaxpaged command end to end: generate on the engine (and the static path) with the embedded model and a
trained one, streaming, bench, train, caches, bad arguments."""

import functools
import json
import os
import subprocess
import sys

import pytest
from flax import nnx
from model_files import write_llama_gguf

from jaxpaged.models import cli
from jaxpaged.models.checkpoint import load_checkpoint, save_checkpoint
from jaxpaged.engine.detokenize import TextStream
from jaxpaged.engine.bench import prefill_tokens
from jaxpaged.models.cli import blocks_needed, main
from jaxpaged.models.config import preset
from jaxpaged.models.generate import generate
from jaxpaged.models.gguf_weights import weight_cache_entry
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import Tokenizer

PATTERN = "the quick brown fox jumps over the lazy dog. "
CONTEXT = 32  # of the random checkpoint: small, so that prompts can reach it cheaply


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """The command's cache directory, in tmp."""
    path = tmp_path / "cache"
    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def compilation_cache_dirs(monkeypatch):
    """JAX's compilation cache is process-wide: here the command's turning it on is only recorded (a subprocess
    test turns it on for real)."""
    enabled = []
    monkeypatch.setattr(cli, "enable_compilation_cache", enabled.append)
    return enabled


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tokenizer = Tokenizer.byte_level()
    config = preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=CONTEXT)
    save_checkpoint(MiniLLM(config, rngs=nnx.Rngs(0)), str(path), tokenizer)
    return str(path)


def test_generate_writes_only_the_text_to_stdout(capsys, cache_dir, compilation_cache_dirs):
    assert main(["generate", "The capital of France is", "--max-new-tokens", "4", "--no-cache"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The capital of France is Paris") and out.endswith("\n"), out
    assert not any(word in out for word in ("jaxpaged", "tokens/s", "memory", "blocks", "loaded")), out
    assert "tokens/s" in err and "peak memory" in err and "paged cache" in err and "loaded in" in err
    assert "the completion stopped at --max-new-tokens 4" in err
    assert not cache_dir.exists() and compilation_cache_dirs == [], "--no-cache reads and writes no cache"


def test_generate_from_a_file_with_every_option(random_checkpoint, tmp_path, capsys, cache_dir, compilation_cache_dirs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nworld, again\n")
    code = main(["generate", "--model", random_checkpoint, "--file", str(prompts), "extra", "--max-new-tokens", "6",
                 "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--cache", "contiguous",
                 "--block-size", "8", "--chunk-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.count("--- [") == 3 and "--- [0] extra" in out and "--- [2] world, again" in out
    assert "contiguous cache" in err and "contiguous cache" not in out
    assert compilation_cache_dirs == [str(cache_dir)], "the compilation cache is on by default"


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--block-size", "12"], "power of two"),
    (["generate", "x", "--top-p", "1.5"], "must be in (0, 1]"),
    (["generate", "x", "--max-new-tokens", "0"], "positive integer"),
    (["generate", "x", "--cache", "ring"], "invalid choice"),
    (["generate", "x", "--top-k", "-1"], "--top-k must be >= 0"),
    (["generate"], "at least one prompt"),
    (["generate", "--file", "/no/such/prompts.txt"], "cannot read --file"),
    (["generate", "x", "--max-num-seqs", "0"], "positive integer"),
    (["generate", "x", "--max-num-batched-tokens", "-3"], "positive integer"),
    (["generate", "x", "--min-p", "1.5"], "must be in [0, 1]"),
    (["generate", "x", "--repetition-penalty", "0"], "must be > 0"),
    (["generate", "x", "--n", "0"], "positive integer"),
    (["generate", "x", "--cache", "contiguous", "--stop", ".", "--n", "2"], "--stop, --n: the engine's options"),
    (["bench", "--workload", "D"], "invalid choice"),
    (["bench", "--num-requests", "0"], "positive integer"),
    (["bench", "--block-size", "10"], "power of two"),
    (["train", "--out", "x"], "--text"),
    (["train", "--out", "x", "--text", "/no/such/corpus.txt"], "cannot read --text"),
])
def test_bad_arguments_exit_2_with_the_subcommands_usage_and_prefix(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert f"usage: jaxpaged {args[0]} " in err and f"jaxpaged {args[0]}: error: " in err
    assert "jaxpaged: error" not in err


def test_an_unknown_command_gets_the_top_level_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2 and "jaxpaged: error: argument COMMAND: invalid choice" in capsys.readouterr().err


def test_bad_model_and_chat_without_template_exit_1(random_checkpoint, capsys):
    assert main(["generate", "--model", "/no/such/model", "x"]) == 1
    assert "jaxpaged generate: error: no model at /no/such/model" in capsys.readouterr().err
    assert main(["generate", "--model", random_checkpoint, "--chat", "x"]) == 1
    assert "no chat template" in capsys.readouterr().err


def test_prompt_and_new_tokens_past_the_context_are_refused_before_loading(random_checkpoint, capsys):
    prompt_len = len("hello")  # one token per byte
    assert main(["generate", "--model", random_checkpoint, "hello", "--max-new-tokens", str(CONTEXT - prompt_len),
                 "--block-size", "8"]) == 0  # exactly the context
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", random_checkpoint, "hello", "--max-new-tokens", str(CONTEXT - prompt_len + 1)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"jaxpaged generate: error: the prompt has {prompt_len} tokens; with --max-new-tokens "
            f"{CONTEXT - prompt_len + 1} that is {CONTEXT + 1} positions, more than the model's context of {CONTEXT}") in err
    assert "loading weights" not in err


PROMPTS = ["hello", "x", "sixteen letters!", "two words"]  # 5, 1, 16 and 9 tokens: one prefill width
# Every run here has the same pool and table and needs one block of 32 per request: the engine's compiled
# programs are shared between the tests. Two requests run at a time; the others queue.
ENGINE_ARGS = ["--max-new-tokens", "9", "--block-size", "32", "--num-blocks", "2", "--max-num-seqs", "4",
               "--chunk-size", "4"]


@pytest.fixture(scope="module")
def static_texts(random_checkpoint):
    """Each of PROMPTS with its greedy completion from the static generate, as the command printed it before
    the engine ran it."""
    model, tokenizer = load_checkpoint(random_checkpoint)
    result = generate(model, [tokenizer.encode(p) for p in PROMPTS], max_new_tokens=9, block_size=32,
                      eos_token_ids=tokenizer.eos_token_ids)
    return [p + tokenizer.decode(tokens) for p, tokens in zip(PROMPTS, result.tokens)]


def _completions(out: str, count: int) -> list[str]:
    """The text after each '--- [i] ' marker of the several-prompt output (markers in order)."""
    parts = []
    for i in range(count):
        start = out.index(f"--- [{i}] ") + len(f"--- [{i}] ")
        end = out.index(f"--- [{i + 1}] ") if i + 1 < count else len(out)
        parts.append(out[start:end].removesuffix("\n"))
    return parts


def test_the_engine_prints_the_static_generates_greedy_text_in_prompt_order(random_checkpoint, static_texts, capsys):
    assert main(["generate", "--model", random_checkpoint, *PROMPTS, *ENGINE_ARGS]) == 0
    out, err = capsys.readouterr()
    assert _completions(out, len(PROMPTS)) == static_texts
    assert "paged cache, peak memory: 2 of 2 blocks of 32 positions held at most" in err, err
    assert "tokens/s" in err and "prefix hits" in err
    assert "completions 0, 1, 2, 3 stopped at --max-new-tokens 9" in err


def test_a_pool_too_small_for_one_request_is_refused_before_loading(random_checkpoint, capsys):
    prompts = ["hello", "hello world, again"]  # 5 and 18 tokens
    assert blocks_needed([5, 18], 9, 16) == [1, 2]  # ceil((prompt + 9) / 16): the engine's most for a request
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", random_checkpoint, *prompts, "--max-new-tokens", "9", "--block-size", "16",
              "--num-blocks", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert ("jaxpaged generate: error: --num-blocks 1 is too few: prompt 1 has 18 tokens; with --max-new-tokens 9 "
            "it needs 2 blocks of 16 positions") in err
    assert "loading weights" not in err


class _Writes:
    """A stdout that keeps every write apart."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


def test_one_prompt_streams_the_text_of_a_batched_run_in_pieces(random_checkpoint, static_texts, monkeypatch):
    stdout = _Writes()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "--model", random_checkpoint, PROMPTS[0], *ENGINE_ARGS]) == 0
    assert "".join(stdout.writes) == static_texts[0] + "\n"
    assert stdout.writes[0] == PROMPTS[0] and len([w for w in stdout.writes[1:-1] if w]) >= 2, stdout.writes


def test_text_stream_holds_back_partial_characters_and_stop_string_starts():
    stream = TextStream(stop=("\n\n", "END"))
    assert stream.update("caf\ufffd") == "caf"  # the first byte of a two-byte character
    assert stream.update("caf\u00e9 E") == "\u00e9 "  # 'E' may start 'END'
    assert stream.update("caf\u00e9 EN") == ""
    assert stream.update("caf\u00e9 ENO\n") == "ENO"  # not a stop after all; '\n' may start '\n\n'
    assert stream.update("caf\u00e9 ENO\n", finished=True) == "\n"  # finished: everything
    assert stream.shown == "caf\u00e9 ENO\n"
    plain = TextStream()
    assert plain.update("a\ufffd\ufffd") == "a" and plain.update("a\ufffd\ufffd", finished=True) == "\ufffd\ufffd"


def test_the_engines_sampling_flags_and_several_completions(random_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld, again\n")
    code = main(["generate", "--model", random_checkpoint, "--file", str(prompts), *ENGINE_ARGS,
                 "--temperature", "0.8", "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.2",
                 "--stop", "zz", "--stop", "q", "--n", "2", "--seed", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert [out.count(f"--- [{label}] ") for label in ("0.0", "0.1", "1.0", "1.1")] == [1, 1, 1, 1], out
    assert "--- [1.0] world, again" in out and "paged cache" in err


def test_help_on_every_command(capsys):
    for command in ("generate", "bench", "serve", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith(f"usage: jaxpaged {command} ") and "--no-cache" in out
    result = subprocess.run([sys.executable, "-m", "jaxpaged.models", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: jaxpaged" in result.stdout and "generate" in result.stdout


def test_bench_runs_a_small_workload_and_writes_its_row(tmp_path, capsys):
    out = tmp_path / "bench" / "engine.json"
    assert main(["bench", "--model", "tiny", "--workload", "A", "--num-requests", "4", "--max-len", "32",
                 "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--decode-steps", "8", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    written = json.loads(out.read_text())
    assert {"device", "model", "dtype", "args", "A"} <= set(written) and written["model"] == "tiny"
    row = written["A"]
    assert {"output_tokens_per_second", "total_tokens_per_second", "compile_seconds", "preemptions",
            "prefix_hit_rate", "host_share", "device_idle_share", "mean_ttft", "seconds", "timeline"} <= set(row)
    assert row["total_tokens_per_second"] > row["output_tokens_per_second"] > 0 and row["preemptions"] == 0
    assert written["args"]["num_requests"] == 4 and written["args"]["workload"] == ["A"]
    assert "out tok/s" in printed and "TTFT s" in printed and "\nA " in printed and str(out) in printed
    assert "A: 4 requests" in err


def test_the_roofline_counts_prompt_tokens_a_prefix_cache_serves_once():
    """prefill_tokens: without caching every prompt token; with it, the full blocks an earlier prompt
    began with are computed once, never a prompt's last token, and a block shared only past a
    differing one is not shared."""
    system = list(range(100, 132))  # two blocks of 16
    prompts = [system + [1, 2, 3], system + [4], system[:16] + [9] * 16 + [5], system, [7] * 40]
    assert prefill_tokens(prompts, None) == sum(map(len, prompts)) == 35 + 33 + 33 + 32 + 40
    # the second shares both blocks, the third the first block only, the fourth one block (its last
    # token is in its second), the fifth nothing
    assert prefill_tokens(prompts, 16) == 35 + (33 - 32) + (33 - 16) + (32 - 16) + 40
    assert prefill_tokens([[1] * 16 + [2] * 16, [3] * 16 + [2] * 16], 16) == 64


@pytest.mark.slow
def test_train_then_generate_the_pattern_through_the_paged_cache(tmp_path, capsys):
    text = tmp_path / "pattern.txt"
    text.write_text(PATTERN * 60)
    out_dir = tmp_path / "trained"
    assert main(["train", "--text", str(text), "--out", str(out_dir), "--steps", "150", "--seq-len", "48"]) == 0
    trained = capsys.readouterr().out
    first, last = (float(x) for x in trained.split("loss ")[1].split(" over")[0].split(" -> "))
    assert last < 0.2 < first
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out_dir.iterdir()}
    assert set(modes) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert len(set(modes.values())) == 1, f"the weights file has other permissions than its siblings: {modes}"
    assert main(["generate", "--model", str(out_dir), "the quick", "--max-new-tokens", "60", "--block-size", "8"]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith("the quick" + (PATTERN * 2)[len("the quick"):60]), generated


# Runs the command in a fresh process, counting the compilation cache's hits and misses through JAX's monitoring events.
_COUNTING_RUN = """
import json, sys
import jax.monitoring
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
from jaxpaged.models.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}), file=sys.stderr)
"""


@pytest.mark.slow
def test_a_second_run_reads_the_weights_and_the_compiled_programs_from_the_cache(tmp_path, cache_dir):
    gguf = str(tmp_path / "tiny.gguf")
    write_llama_gguf(gguf, MiniLLM(preset("tiny", vocab_size=260), rngs=nnx.Rngs(1)))
    env = {**os.environ, "JAXPAGED_CACHE_DIR": str(cache_dir)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COUNTING_RUN, "generate", "--model", gguf, "abc",
                               "--max-new-tokens", "3"], capture_output=True, text=True, env=env)
        runs.append((done.stdout, done.stderr, json.loads(done.stderr.strip().splitlines()[-1])))
    entry = weight_cache_entry(str(cache_dir), gguf)
    (first_out, first_err, first), (second_out, second_err, second) = runs
    assert first["code"] == second["code"] == 0, first_err + second_err
    assert first_out == second_out and first_out.startswith("abc")
    assert f"loading weights from {gguf}" in first_err
    assert f"loading weights from {os.path.join(entry, 'model.safetensors')}" in second_err
    assert first["misses"] > 0 and first["hits"] == 0
    assert second["misses"] == 0 and second["hits"] >= 2, second  # at least the prefill and the decode chunk
    assert os.listdir(cache_dir / "xla")

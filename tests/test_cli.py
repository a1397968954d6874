"""The jaxpaged command end to end: generate with the embedded model and a trained one, train, and bad arguments."""

import subprocess
import sys

import pytest
from flax import nnx

from jaxpaged.models.checkpoint import save_checkpoint
from jaxpaged.models.cli import main
from jaxpaged.models.config import preset
from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import Tokenizer

PATTERN = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tokenizer = Tokenizer.byte_level()
    model = MiniLLM(preset("tiny", vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    save_checkpoint(model, str(path), tokenizer)
    return str(path)


def test_generate_with_the_embedded_model(capsys):
    assert main(["generate", "The capital of France is", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is Paris")
    assert "peak memory" in out and "tokens/s" in out and "paged cache" in out


def test_generate_from_a_file_with_every_option(random_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nworld, again\n")
    code = main(["generate", "--model", random_checkpoint, "--file", str(prompts), "extra", "--max-new-tokens", "6",
                 "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--cache", "contiguous",
                 "--block-size", "8", "--chunk-size", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("--- [") == 3 and "--- [0] extra" in out and "--- [2] world, again" in out and "contiguous cache" in out


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--block-size", "12"], "power of two"),
    (["generate", "x", "--top-p", "1.5"], "must be in (0, 1]"),
    (["generate", "x", "--max-new-tokens", "0"], "positive integer"),
    (["generate", "x", "--cache", "ring"], "invalid choice"),
    (["generate"], "at least one prompt"),
    (["generate", "--file", "/no/such/prompts.txt"], "cannot read --file"),
    (["train", "--out", "x"], "--text"),
    (["fly"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_model_and_chat_without_template_exit_1(random_checkpoint, capsys):
    assert main(["generate", "--model", "/no/such/model", "x"]) == 1
    assert "no model at /no/such/model" in capsys.readouterr().err
    assert main(["generate", "--model", random_checkpoint, "--chat", "x"]) == 1
    assert "no chat template" in capsys.readouterr().err


def test_help_everywhere():
    for args in ([], ["generate"], ["train"]):
        result = subprocess.run([sys.executable, "-m", "jaxpaged.models", *args, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: jaxpaged" in result.stdout


def test_train_then_generate_the_pattern_through_the_paged_cache(tmp_path, capsys):
    text = tmp_path / "pattern.txt"
    text.write_text(PATTERN * 60)
    out_dir = str(tmp_path / "trained")
    assert main(["train", "--text", str(text), "--out", out_dir, "--steps", "150", "--seq-len", "48"]) == 0
    trained = capsys.readouterr().out
    first, last = (float(x) for x in trained.split("loss ")[1].split(" over")[0].split(" -> "))
    assert last < 0.2 < first
    assert main(["generate", "--model", out_dir, "the quick", "--max-new-tokens", "60", "--block-size", "8"]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith("the quick" + (PATTERN * 2)[len("the quick"):60]), generated

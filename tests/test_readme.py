"""The README's Python blocks run as written: each on its own, in a fresh namespace, as a reader would paste it."""

import pathlib

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block of the README, in order."""
    blocks, heading, fence, code = [], "top", None, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if fence is None and line.startswith("```"):
            fence, code = line[3:].strip(), []
        elif fence is not None and line.strip() == "```":
            if fence == "python":
                blocks.append((heading, "\n".join(code) + "\n"))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3 and {"The cache", "The model"} <= {heading for heading, _ in BLOCKS}


@pytest.mark.slow  # the blocks compile the cache's ops; "The model" loads SmolLM2 and generates
@pytest.mark.parametrize("heading, code", BLOCKS, ids=[f"{i}-{h.replace(' ', '-')}" for i, (h, _) in enumerate(BLOCKS)])
def test_a_readme_block_runs_on_its_own(heading, code, request, monkeypatch):
    if "load_gguf()" in code:  # it returns the run's one load of SmolLM2: the `smollm2` fixture, load_gguf() itself
        from jaxpaged.models import gguf_weights

        loaded, load = request.getfixturevalue("smollm2"), gguf_weights.load_gguf
        monkeypatch.setattr(gguf_weights, "load_gguf", lambda *args, **kwargs: load(*args, **kwargs) if args or kwargs
                            else loaded)
    exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "__readme__"})

"""Strict settings for every test, and small helpers shared by the test files."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

DTYPES = ("float32", "float16", "bfloat16")
PROPERTY_REPORT = "property_report"  # a property test's line (examples, coverage, time): record_property's key
_PROPERTY_LINES: list[str] = []  # gathered from the reports (a worker's too, under pytest-xdist), printed after the run


def pytest_runtest_logreport(report):
    if report.when == "call":
        _PROPERTY_LINES.extend(value for key, value in report.user_properties if key == PROPERTY_REPORT)


def pytest_terminal_summary(terminalreporter):
    if _PROPERTY_LINES:
        terminalreporter.section("property tests")
        for line in _PROPERTY_LINES:
            terminalreporter.write_line(line)


def random_array(rng: np.random.Generator, shape, dtype) -> jax.Array:
    """Random normal values in `dtype`; never zeros, which would hide unwritten slots."""
    return jax.numpy.asarray(rng.standard_normal(shape).astype(np.float32) + 0.5).astype(dtype)


def bits(x) -> bytes:
    """The raw bytes of an array: equality of these is bit-for-bit equality, NaN and -0.0 included."""
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def assert_bit_equal(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert bits(actual) == bits(expected), f"{what}: values differ"


_EMBEDDED_READERS: dict = {}  # the embedded GGUF file's parsed gguf.GGUFReader, once a run


def _parse_the_embedded_gguf_once(monkeypatch):
    """gguf.GGUFReader, for the embedded SmolLM2 file only, returns the run's one parse of it.

    Parsing its metadata (a 49k-token vocabulary and its merges) takes 5-6 s on a 2-core CPU, and
    each of our loader, preset("smollm2-135m"), transformers' GGUF model loader (twice) and its
    tokenizer loader parses it again. The reader is read-only (its arrays map the file read-only),
    so every caller still does its own reading of the same bytes. Any other file or mode parses as
    always.
    """
    import gguf

    from jaxpaged.models.gguf_weights import default_gguf_path

    embedded, reader_class = os.path.realpath(default_gguf_path()), gguf.GGUFReader

    def reader(path, mode="r"):
        if mode != "r" or os.path.realpath(path) != embedded:
            return reader_class(path, mode)
        if embedded not in _EMBEDDED_READERS:
            _EMBEDDED_READERS[embedded] = reader_class(path, mode)
        return _EMBEDDED_READERS[embedded]

    monkeypatch.setattr(gguf, "GGUFReader", reader)


@pytest.fixture
def embedded_gguf_parsed_once(monkeypatch):
    _parse_the_embedded_gguf_once(monkeypatch)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, `load_gguf()` as a user calls it: loaded
    once a run (it costs tens of seconds on a 2-core CPU) for every test that reads the real weights."""
    from jaxpaged.models.gguf_weights import load_gguf

    with pytest.MonkeyPatch.context() as monkeypatch:
        _parse_the_embedded_gguf_once(monkeypatch)
        return load_gguf()


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so each test draws its own reproducible data."""
    return np.random.default_rng(abs(hash(request.node.nodeid)) % 2**32)

"""Strict settings for every test, and small helpers shared by the test files."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

DTYPES = ("float32", "float16", "bfloat16")
PROPERTY_REPORT: list[str] = []  # a line per property test (examples, coverage, time), printed after the run


def pytest_terminal_summary(terminalreporter):
    if PROPERTY_REPORT:
        terminalreporter.section("property tests")
        for line in PROPERTY_REPORT:
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


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, `load_gguf()` as a user calls it: loaded
    once a run (it costs tens of seconds on a 2-core CPU) for every test that reads the real weights."""
    from jaxpaged.models.gguf_weights import load_gguf

    return load_gguf()


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so each test draws its own reproducible data."""
    return np.random.default_rng(abs(hash(request.node.nodeid)) % 2**32)

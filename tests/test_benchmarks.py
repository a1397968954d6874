"""The benchmark scripts run where the suite runs: every one answers --help, and the attention
benchmark's smoke mode (small shapes, Pallas in interpret mode) writes its JSON, which --replot
draws again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if "argparse" in p.read_text())


def _run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help(script):
    result = _run(f"benchmarks/{script}", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_attention_benchmark_smoke_writes_prefill_and_chunked_prefill(tmp_path):
    result = _run("benchmarks/attention.py", "--quick", "--interpret", "--only", "prefill", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "prefill.json").read_text())["prefill"]
    assert [(r["prefix"], r["chunk"]) for r in rows] == [(0, 128), (64, 64)]  # a whole prompt, a chunk on a prefix
    for row in rows:
        assert set(row["tokens_per_s"]) >= {"jaxpaged", "jaxpaged_reference", "xla_dense"}
        assert all(tps > 0 for tps in row["tokens_per_s"].values())
        assert row["rel_err_vs_xla_dense"]["jaxpaged"] < 1e-5  # (on a CPU both run the reference)
    assert "prefill, M tokens/s" in result.stdout
    replot = _run("benchmarks/attention.py", "--replot", str(tmp_path / "prefill.json"))
    assert replot.returncode == 0, replot.stderr
    assert (tmp_path / "prefill.png").exists() or "matplotlib not installed" in replot.stdout

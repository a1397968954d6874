"""The benchmark scripts run where the suite runs: every one answers --help, the attention
benchmark's smoke mode (small shapes, Pallas in interpret mode) writes its JSON, which --replot
draws again, bandwidths are looked up by the card's name, and the docs hold the tables that
headline.py computes from the result files."""

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


# Runs each script as __main__ with --help, one after another in one interpreter: the start-up and the
# imports (jax above all) are paid once rather than once a script.
_HELP_EACH = """
import contextlib, io, json, runpy, sys, traceback
answers = {}
for script in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), None
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path("benchmarks/" + script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        except Exception:
            traceback.print_exc()
            code = 1
    answers[script] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_answers():
    result = _run("-c", _HELP_EACH, *SCRIPTS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help(script, help_answers):
    code, stdout, stderr = help_answers[script]
    assert code == 0, stderr
    assert stdout.startswith("usage:")


@pytest.mark.slow
def test_attention_benchmark_smoke_writes_prefill_and_chunked_prefill(tmp_path):
    result = _run("benchmarks/attention.py", "--quick", "--interpret", "--only", "prefill", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "prefill.json").read_text())["prefill"]
    assert [(r["prefix"], r["chunk"]) for r in rows] == [(0, 128), (64, 64)]  # a whole prompt, a chunk on a prefix
    for row in rows:
        assert set(row["tokens_per_s"]) >= {"jaxpaged", "jaxpaged_reference", "xla_dense"}
        assert all(tps > 0 for tps in row["tokens_per_s"].values())
        assert row["rel_err_vs_xla_dense"]["jaxpaged"] < 1e-2  # the prefill kernel, interpreted, in bfloat16
        assert row["rel_err_vs_xla_dense"]["jaxpaged_reference"] < 1e-5  # gather then attend: XLA dense's arithmetic
    assert "prefill, M tokens/s" in result.stdout
    replot = _run("benchmarks/attention.py", "--replot", str(tmp_path / "prefill.json"))
    assert replot.returncode == 0, replot.stderr
    assert (tmp_path / "prefill.png").exists() or "matplotlib not installed" in replot.stdout


@pytest.mark.slow
def test_generation_benchmark_runs_the_chosen_attention_path(tmp_path):
    out = tmp_path / "generate.json"
    result = _run("benchmarks/generate.py", "--preset", "tiny", "--batch-sizes", "1", "--prompt-len", "8", "--new-tokens", "8",
                  "--chunk-size", "8", "--repeats", "1", "--impl", "reference", "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert (written["impl"], written["spec_bandwidth_Bps"], written["copy_Bps"]) == ("reference", None, None)
    (row,) = written["rows"]
    assert row["greedy_tokens_identical"]
    assert row["roofline_vs_spec"] is None and row["decode_step_bytes"] > written["weight_bytes"]  # no roofline on a CPU
    assert row["paged_decode_tokens_per_s"] > 0 and row["contiguous_decode_tokens_per_s"] > 0


def test_spec_bandwidth_is_looked_up_by_the_exact_device_name():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from ceilings import share, spec_bandwidth
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert spec_bandwidth("NVIDIA H200") == 4.8e12
    assert spec_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert spec_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    for unknown in ("cpu", "NVIDIA H100", "NVIDIA GeForce RTX 4090", ""):
        assert spec_bandwidth(unknown) is None
    assert share(2.4e12, {"spec_bandwidth_Bps": 4.8e12, "copy_Bps": 3.2e12}) == (0.5, "spec")
    assert share(1.6e12, {"spec_bandwidth_Bps": None, "copy_Bps": 3.2e12}) == (0.5, "copy")  # no spec: the copy alone


def test_docs_hold_the_tables_computed_from_the_results():
    result = _run("benchmarks/headline.py", "--check", "BENCHMARKS.md", "benchmarks/NOTES.md")
    assert result.returncode == 0, result.stderr


def test_sass_summary_groups_instructions_by_how_often_they_ran(tmp_path):
    """profile_kernel.py --sass-summary reads Nsight Compute's per-instruction CSV: a prologue run once
    a warp, a loop body run 1000 times, an epilogue; each run of equal counts is one line."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
              "# Samples", "Instructions Executed"]
    body = [["0x0", "IMAD R1, R2, R3, RZ", "5", "0", "5", "10"], ["0x10", "LDG.E R4, [R2]", "700", "0", "700", "10"],
            ["0x20", "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], RZ", "900", "0", "900", "1000"],
            ["0x30", "FMUL R9, R9, R10", "300", "0", "300", "1005"], ["0x40", "@P0 BRA 0x20", "50", "0", "50", "1000"],
            ["0x50", "STG.E [R2], R9", "1", "0", "1", "10"]]
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(",".join(f'"{x}"' for x in row) for row in [["Kernel Name", "k"], header, *body]))
    result = _run("benchmarks/profile_kernel.py", "--sass-summary", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "k: 0.0 M warp instructions, 1956 stall samples"
    assert "3 instructions x      1000 =    0.0 M,    1250 samples  (HGMMA 1 FMUL 1 BRA 1)" in lines[2]
    assert len(lines) == 3  # the prologue (705 samples) and the loop; the one-instruction epilogue is below both bars

"""The command line: info, check, demo, and a bench run on tiny cases."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import pyops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, interpret=True):
    env = dict(os.environ)
    if not interpret:  # as a user runs it: the Triton interpreter is a test vehicle, not a backend
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "pyops", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)


def test_info():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "backends" in out.stdout and "CUDA kernels" in out.stdout
    d = pyops.info(file=open(os.devnull, "w"))
    assert d["torch"] == torch.__version__
    assert "native" in d["backends"]["cpu"]


def test_check_passes():
    out = _run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout


def test_demo_runs_on_digits():
    out = _run("demo", interpret=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "digits" in out.stdout and "relu" in out.stdout and "maxout" in out.stdout


def test_bench_writes_table_csv_and_plot(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from bench import activation, harness
    finally:
        sys.path.remove(ROOT)
    cases = [c for c in activation.cases("cpu", quick=True) if c.op in ("relu", "maxout")]
    shrunk = [activation._case(c.op, c.mode, 1 << 14, c.dtype, "cpu") for c in cases]
    results = []
    for c in shrunk:
        results += harness.measure(c, ["native"], repeats=3, with_compile=False)
    harness.write_csv(results, tmp_path / "a.csv", "test")
    rows = list(csv.DictReader(open(tmp_path / "a.csv")))
    assert {r["backend"] for r in rows} == {"torch eager", "native"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    relu_bwd = [r for r in rows if r["op"] == "relu" and r["mode"] == "fwd+bwd"]
    saved = {r["backend"]: float(r["saved_MB"]) for r in relu_bwd}
    assert saved["native"] * 30 < saved["torch eager"]
    if harness.write_plot(results, tmp_path / "a.png", "test"):
        assert os.path.getsize(tmp_path / "a.png") > 0


def test_bench_cli_help():
    out = _run("bench", "--help")
    assert out.returncode == 0 and "--quick" in out.stdout


def test_bad_command():
    assert _run("nope").returncode != 0


def test_triton_listed_for_cpu_only_when_interpreted():
    code = "import pyops; print(pyops.available_backends('cpu'))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    interp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(env, TRITON_INTERPRET="1"), cwd=ROOT)
    assert "triton" not in plain.stdout and "native" in plain.stdout, plain.stderr
    assert "triton" in interp.stdout, interp.stderr

"""bench/gpu_check.sh's flow without a GPU (GPU_CHECK_DRY_RUN=1: stand-ins for every command): the
stages in order under their limits, a stage past its limit recorded as timed out with what it wrote
kept and the later stages still run, the budget's end skipping what is left, a failed build skipping
the rest, the summary and the merged benchmark rows written, at most 7 files in OUTDIR; exit 2 with
no GPU. And the commands it runs exist with the flags it gives them."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyops.testing import BENCH_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="bash")
STAGES = ["build", "info", "tests", "check"] + [
    f"bench_{f}" for f in ("activation", "batch_norm", "conv", "loss", "optim", "overhead", "models")
]


def _run(tmp_path, dry=True, **env):
    out = tmp_path / "out"
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full |= {"PYTHON": sys.executable, **({"GPU_CHECK_DRY_RUN": "1"} if dry else {}), **env}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=full, capture_output=True, text=True, timeout=120)
    return proc, out


def _stages(out):
    """{stage: (limit, rc, result)} from summary.md's table."""
    table = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            table[cells[0]] = (cells[2], cells[3], cells[4])
    return table


def test_every_stage_runs_and_the_summary_holds_the_rows(tmp_path):
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = _stages(out)
    assert list(stages) == STAGES
    assert all(rc == "0" for _, rc, _ in stages.values())
    assert stages["tests"][2] == "7 passed, 2 skipped in 0.10s"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu.txt", "build.log", "tests.log", "check.log", "bench.log", "bench.csv", "summary.md"]
    )
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert {r["family"] for r in rows} == {s.removeprefix("bench_") for s in STAGES if s.startswith("bench_")}
    summary = (out / "summary.md").read_text()
    assert "| conv | conv_op | fwd | 64x1024 | float32 | native | 0.2500 |" in summary
    assert "torch eager" not in summary.split("Benchmark rows")[1].split("\n", 1)[1]  # baselines: csv only
    assert "-m pytest -q -rfE -m cuda" in (out / "tests.log").read_text()


def test_a_timeout_keeps_what_finished_and_the_rest_runs(tmp_path):
    proc, out = _run(
        tmp_path, GPU_CHECK_DRY_HANG="bench_conv", GPU_CHECK_LIMIT_bench_conv="2", GPU_CHECK_DRY_FAIL="check"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stages = _stages(out)
    assert stages["bench_conv"] == ("2", "124", "timed out, 0 rows")
    assert stages["check"][1] == "1"
    assert stages["bench_models"][1] == "0" and stages["bench_activation"][2] == "3 rows"


def test_the_budget_ends_the_run(tmp_path):
    proc, out = _run(tmp_path, GPU_CHECK_DRY_HANG="tests", GPU_CHECK_BUDGET="12")
    assert proc.returncode == 1
    stages = _stages(out)
    limit, rc, result = stages["tests"]
    assert rc == "124" and int(limit) <= 12, stages["tests"]
    assert all(stages[s][2] == "skipped: the budget is spent" for s in STAGES[STAGES.index("check") :])


def test_a_failed_build_skips_the_rest(tmp_path):
    proc, out = _run(tmp_path, GPU_CHECK_DRY_FAIL="build")
    assert proc.returncode == 1
    stages = _stages(out)
    assert stages["build"][1] == "1"
    assert all(stages[s][2] == "skipped: the build failed" for s in STAGES[1:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_no_gpu_exits_2(tmp_path):
    proc, _ = _run(tmp_path, dry=False)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr


def test_its_commands_take_its_flags(capsys):
    from pyops.__main__ import main

    text = SCRIPT.read_text()
    families = re.search(r"for spec in ([^;]+); do", text).group(1).split()
    assert [f.split(":")[0] for f in families] == [s.removeprefix("bench_") for s in STAGES if s.startswith("bench_")]
    assert set(f.split(":")[0] for f in families) <= set(BENCH_FAMILIES)

    def helptext(*args):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    bench = helptext("bench")
    for flag in ("--quick", "--device", "--family", "--out", "--no-compile"):
        assert flag in bench and flag in text, flag
    assert "--device" in helptext("check") and "-m pyops check --device cuda" in text
    assert "info" in helptext()

"""The command line: info, check, demo, and a bench run on tiny cases."""

import csv
import io
import os
import subprocess
import sys

import pytest
import torch

import pyops
from pyops.testing import BENCH_FAMILIES, FAMILIES, SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, interpret=True):
    env = dict(os.environ)
    if not interpret:  # as a user runs it: the Triton interpreter is a test vehicle, not a backend
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-m", "pyops", *args], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env
    )


def test_info():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "backends" in out.stdout and "CUDA kernels" in out.stdout
    d = pyops.info(file=open(os.devnull, "w"))
    assert d["torch"] == torch.__version__
    assert "native" in d["backends"]["cpu"]


def _bench_modules():
    sys.path.insert(0, ROOT)
    try:
        from bench import activation, harness, overhead
    finally:
        sys.path.remove(ROOT)
    return activation, harness, overhead


def _bench_module(name):
    sys.path.insert(0, ROOT)
    try:
        import importlib

        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(ROOT)


def test_check_passes():
    """Every family, every entry of the spec table and every backend available to a user here is
    checked (the Triton interpreter's rows are the family tests' business: they take minutes)."""
    out = _run("check", interpret=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()]
    for family, specs in SPECS.items():
        for name in specs:
            backends = {row[3] for row in rows if row[:2] == [family, name]}
            assert backends == {"native", "torch"}, (family, name, backends)


def test_tour_runs_every_family_on_digits():
    """The tour: every activation, batch norm (plain and fused), conv2d, every loss and every optimizer, on
    each backend a user has here, each row within tolerance of the oracle."""
    out = _run("tour", interpret=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "scikit-learn digits" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()]
    rows = [row for row in rows if len(row) == 8 and row[0] in FAMILIES]
    expected = {("activation", name) for name in SPECS["activation"]}
    expected |= {("batch_norm", "batch_norm"), ("batch_norm", "bn_add_relu"), ("conv", "conv2d")}
    expected |= {("loss", name) for name in SPECS["loss"]} | {("optim", name) for name in SPECS["optim"]}
    assert {(row[0], row[1]) for row in rows} == expected
    for family, name in expected:
        backends = {row[3] for row in rows if row[:2] == [family, name]}
        assert backends == {"native", "torch"}, (family, name, backends)
    assert all(row[6] == "yes" for row in rows), out.stdout


def test_demo_trains_both_sides_and_plots(tmp_path):
    """The main job: both sides trained from the same start, a table each, the plot written."""
    png = tmp_path / "curves.png"
    out = _run("demo", "--epochs", "2", "--no-progress", "--plot", str(png), interpret=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("pyops: cnn (pyops modules, pyops.optim.Adam)", "torch: cnn (torch modules, torch.optim.Adam)"):
        assert line in out.stdout
    assert out.stdout.count("macro F1") == 2 and out.stdout.count("per-class recall") == 2
    assert "time per epoch, pyops / torch" in out.stdout
    assert png.stat().st_size > 10_000


def test_demo_trains_the_pyops_side_with_quantized_adam_states():
    """--state-dtype 8bit: the pyops side's Adam keeps 8-bit states (its large tensors), the torch side float32."""
    out = _run("demo", "--model", "mlp3", "--epochs", "1", "--no-progress", "--state-dtype", "8bit", interpret=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pyops (8bit Adam states): mlp3 (pyops modules, pyops.optim.Adam)" in out.stdout
    assert "torch: mlp3 (torch modules, torch.optim.Adam)" in out.stdout


def _demo_extra():
    """setup.py's distribution name and its "demo" extra, read from the setup() call."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    return ast.literal_eval(kwargs["name"]), ast.literal_eval(kwargs["extras_require"])["demo"]


def test_demo_extra_declares_what_the_demo_imports():
    from pyops import demo

    name, extra = _demo_extra()
    assert demo.DISTRIBUTION == name
    assert {"scikit-learn", "matplotlib", "tqdm"} <= set(extra)


@pytest.mark.parametrize(
    "module,package,args",
    [("sklearn", "scikit-learn", []), ("matplotlib", "matplotlib", ["--plot", "curves.png"])],
)
def test_demo_without_a_package_is_one_line_naming_the_extra(module, package, args, tmp_path):
    """A missing scikit-learn (or matplotlib, asked for --plot) stops the demo before it trains, with one
    line naming the package and the install command, and no traceback."""
    code = f"import sys; sys.modules[{module!r}] = None; from pyops.__main__ import main; main(sys.argv[1:])"
    out = subprocess.run(
        [sys.executable, "-c", code, "demo", "--epochs", "1", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    name, _ = _demo_extra()
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stdout == "", out.stdout + out.stderr
    assert f"{package} is not installed" in out.stderr and f'pip install "{name}[demo]"' in out.stderr


def test_demo_trains_without_tqdm(monkeypatch):
    """tqdm only draws the progress bar: without it the demo trains with none."""
    from pyops import demo

    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = demo._progress(3, "x", enabled=True)
    assert isinstance(bar, demo._NoBar)
    bar.update(1)
    bar.close()


def test_bench_writes_table_csv_and_plot(tmp_path):
    activation, harness, _ = _bench_modules()
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


def test_overhead_cases_print_torch_beside_each_backend(tmp_path):
    """The overhead family: per op and mode torch's time per call, each backend's and the ratio; the
    case's one thread is the process's setting again afterwards."""
    _, harness, overhead = _bench_modules()
    threads = torch.get_num_threads()
    results = []
    for mode in overhead.MODES:
        case = overhead._case("relu", mode, 64, "cpu", calls=5)
        assert case.threads == 1 and case.auto
        results += harness.measure(case, ["native"], repeats=3, with_compile=False)
    assert torch.get_num_threads() == threads
    assert [r.backend for r in results[:3]] == ["torch", "native", "auto"]
    assert all(r.ms > 0 for r in results)
    table = io.StringIO()
    overhead.print_table(results, file=table)
    lines = table.getvalue().splitlines()
    assert "torch us" in lines[1] and "native us" in lines[1] and "auto us" in lines[1]
    assert [line.split()[:3] for line in lines[2:]] == [["relu", "64", mode] for mode in overhead.MODES]
    harness.write_csv(results, tmp_path / "o.csv", "test")
    assert all(float(r["median_us"]) > 0 for r in csv.DictReader(open(tmp_path / "o.csv")))


def test_fma_peak_is_measured_and_sane():
    """pyops._C._fma_peak: register-only vector FMAs, GFLOP/s summed over the threads; positive and
    finite, below what any CPU core reaches (64 lanes x 2 flops x 4 pipes x 6 GHz ~ 3 TFLOP/s a core),
    above a scalar core's crawl; bad arguments are a ValueError."""
    import math

    one = pyops._C._fma_peak(1, 0.05)
    assert math.isfinite(one) and 1.0 < one < 3000.0, one
    two = pyops._C._fma_peak(2, 0.05)
    assert math.isfinite(two) and 1.0 < two < 6000.0, two
    for bad in [(0, 0.1), (1, 0.0), (1, -1.0), (1, float("nan")), (1, 100.0)]:
        with pytest.raises(ValueError, match="_fma_peak"):
            pyops._C._fma_peak(*bad)
    harness = _bench_module("harness")
    peak = harness.fma_peak("cpu")  # one core, measured once, times torch's threads
    assert peak == harness.fma_peak("cpu") > 0 and peak >= 0.5 * one * torch.get_num_threads()
    assert harness.fma_peak("cuda") is None


def test_conv_bench_prints_the_roofline(tmp_path):
    """The conv family on the CPU: the header names the measured FMA peak and copy bandwidth, and every
    row, torch's and pyops', its GFLOP/s as %peak and GB/s as %bw; the CSV carries them too."""
    harness, conv = _bench_module("harness"), _bench_module("conv")
    assert "memory-bound" in conv.__doc__ and "compute-bound" in conv.__doc__
    results = []
    for label, shape, k, groups in [("depthwise", (2, 8, 16, 16), 8, 8), ("grouped", (2, 16, 16, 16), 16, 4)]:
        case = conv._case(label, shape, k, groups, 1, "fwd", torch.float32, "cpu")
        results += harness.measure(case, ["native"], repeats=3, roofline=True)
    assert [r.backend for r in results] == ["torch eager", "native", "auto"] * 2
    assert all(r.peak_gflops > 0 and r.copy_gbps > 0 for r in results)
    table = io.StringIO()
    conv.print_table(results, file=table)
    lines = table.getvalue().splitlines()
    assert lines[0].startswith("# roofline: FMA peak ") and "GFLOP/s" in lines[0] and "GB/s" in lines[0]
    header = lines[1].split()
    for col in ("GFLOP/s", "%peak", "GB/s", "%bw", "vs_eager"):
        assert col in header, header
    for col in ("%peak", "%bw"):  # fixed-width columns: the cell under each header
        at = lines[1].index(f" {col} ") + 1
        assert all(float(line[at:].split()[0]) >= 0 for line in lines[2:]), (col, lines)
    harness.write_csv(results, tmp_path / "c.csv", "test")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert len(rows) == len(results)
    for row, r in zip(rows, results):
        assert float(row["peak_GFLOP/s"]) > 0 and float(row["copy_GB/s"]) > 0, row
        # the shares of the unrounded figures (the CSV's GB/s and ceilings are rounded to 0.1, too coarse
        # to recompute a share of a few percent from)
        assert float(row["pct_peak"]) == pytest.approx(100 * r.gflops / r.peak_gflops, rel=0.06, abs=0.006), row
        assert float(row["pct_copy_bw"]) == pytest.approx(100 * r.gbps / r.copy_gbps, rel=0.06, abs=0.006), row
    assert harness._pct(5.0, 200.0) == "2.5" and harness._pct(30.0, 200.0) == "15" and harness._pct(1, 400) == "0.25"


def test_models_bench_cases(tmp_path):
    """The models family: the digits and CIFAR-sized inputs, at most one CIFAR case in --quick, and each
    implementation's first step (its compile) reported beside the timed rounds; torch.compile of the pyops
    model is a row of its own, left out with the torch.compile baseline."""
    harness, models = _bench_module("harness"), _bench_module("models")
    full = [(c.op, c.shape) for c in models.cases("cpu")]
    assert len(full) == 2 * len(models.MODELS) and (64, 3, 32, 32) in {s for _, s in full}
    quick = [c.shape for c in models.cases("cpu", quick=True)]
    assert quick.count((64, 3, 32, 32)) <= 1 and quick.count((64, 1, 8, 8)) == 2
    case = models._case("cnn", "cpu", models.INPUTS["cifar"], batch=4)
    assert ("auto+compile", "pyops_compile", "auto") in case.variants
    results = harness.measure(case, ["native"], repeats=2, with_compile=False, roofline=True)
    assert [r.backend for r in results] == ["torch eager", "native", "auto"]
    assert all(r.ms > 0 and r.first_s > 0 for r in results)
    table = io.StringIO()
    harness.print_table(results, file=table)
    assert "first_s" in table.getvalue().splitlines()[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_bench_steadies_the_heap_without_device(tmp_path, monkeypatch):
    """With no --device the bench runs on the CPU here, and steadies glibc's heap there."""
    _, harness, _ = _bench_modules()
    calls = []
    monkeypatch.setattr(harness, "steady_malloc", lambda: calls.append(1) or True)
    harness.run([], None, True, str(tmp_path))
    assert calls == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("command", ["bench", "check", "demo"])
def test_cuda_without_a_gpu_is_one_clear_line(command):
    out = _run(command, "--device", "cuda")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert "no CUDA GPU" in out.stderr


def test_bench_cli_help():
    out = _run("bench", "--help")
    assert out.returncode == 0 and "--quick" in out.stdout
    for family in BENCH_FAMILIES:
        assert family in out.stdout
    out = _run("check", "--help")
    assert out.returncode == 0 and all(family in out.stdout for family in FAMILIES)


def test_bad_command():
    assert _run("nope").returncode != 0


def test_triton_listed_for_cpu_only_when_interpreted():
    code = "import pyops; print(pyops.available_backends('cpu'))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    interp = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(env, TRITON_INTERPRET="1"), cwd=ROOT
    )
    assert "triton" not in plain.stdout and "native" in plain.stdout, plain.stderr
    assert "triton" in interp.stdout, interp.stderr

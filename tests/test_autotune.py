"""pyops.autotune(): `auto` measured on this machine, with a fake clock (pyops/autotune.py)."""

import json
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import pyops
import pyops.functional as PF
from pyops import _C

AT = sys.modules["pyops.autotune"]  # (pyops.autotune is the context manager)


class FakeClock:
    """Each reading advances by the cost of the backend being timed, so a timed run of backend b
    lasts costs[b]; counts its readings."""

    def __init__(self, **costs):
        self.costs, self.t, self.calls = costs, 0.0, 0

    def __call__(self):
        self.calls += 1
        self.t += self.costs[AT._timing]
        return self.t


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache file and an empty memory; the choices are forgotten afterwards."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("PYOPS_AUTOTUNE_CACHE", str(path))
    AT.clear()
    yield path
    AT.clear()


def clock(monkeypatch, **costs):
    fake = FakeClock(**costs)
    monkeypatch.setattr(AT, "_clock", fake)
    return fake


def entries(op):
    return {k: b for k, b in AT.cache_entries().items() if k.split("|")[1] == op}


def test_the_winner_is_taken(cache, monkeypatch):
    """A 64-element relu goes to torch by the static rule; measured faster, native is taken."""
    fake = clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(64, requires_grad=True)
    assert type(PF.relu(x).grad_fn).__name__ == "ReluBackward0"  # autotune off: the static rule
    assert fake.calls == 0
    with pyops.autotune():
        y = PF.relu(x)
    assert y.grad_fn.name() == "pyops::ReluBackward"
    assert fake.calls == 2 * AT.REPEATS * 2  # two candidates (native, torch), start and end readings
    assert list(entries("relu").values()) == ["native"]
    (key,) = entries("relu")
    assert key == "cpu|relu|float32|contiguous|n64|grad"
    # the other way round for another key
    fake.costs = dict(native=5.0, torch=1.0)
    big = torch.randn(1 << 20)
    with pyops.autotune():
        z = PF.relu(big)
    assert entries("relu")["cpu|relu|float32|contiguous|n1048576|nograd"] == "torch"
    assert torch.equal(z, torch.relu(big))


def test_the_second_call_does_not_time(cache, monkeypatch):
    fake = clock(monkeypatch, native=1.0, torch=5.0)
    with pyops.autotune():
        PF.sigmoid(torch.randn(100))
        n = fake.calls
        assert n > 0
        for size in (100, 128, 65):  # the same bucket
            y = PF.sigmoid(torch.randn(size, requires_grad=True).detach())
        assert fake.calls == n
        PF.sigmoid(torch.randn(129))  # the next bucket
        assert fake.calls == 2 * n
    assert y.shape == (65,)


def test_the_cache_round_trips_through_the_file(cache, monkeypatch):
    fake = clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(8, 16)
    with pyops.autotune():
        PF.tanh(x)
        PF.elu(x)
    data = json.loads(cache.read_text())
    assert data["format"] == 1
    (section,) = data["sections"]
    assert f"torch {torch.__version__}" in section and f"pyops {pyops.__version__}" in section
    assert data["sections"][section]["tanh|float32|contiguous|n128|nograd"] == "native"
    # a new process: memory forgotten, the file read again
    AT.clear()
    assert _C._autotune_entries() == {}
    fake.costs = dict(native=5.0, torch=1.0)  # would pick torch if timed
    calls = fake.calls
    with pyops.autotune():
        y = PF.tanh(torch.randn(8, 16, requires_grad=True).detach())
    assert fake.calls == calls  # not timed: the file's choice
    assert AT.cache_entries()["cpu|tanh|float32|contiguous|n128|nograd"] == "native"
    assert y.shape == (8, 16)
    info = pyops.info(file=open(os.devnull, "w"))
    assert info["autotune cache"]["path"] == str(cache)
    assert "cpu|tanh|float32|contiguous|n128|nograd" in info["autotune cache"]["entries"]


@pytest.mark.parametrize("text", ["{not json", '{"format": 1, "sections": {"x": {"k": "cudnn"}}}', "[1, 2]"])
def test_a_corrupted_cache_file_is_ignored_with_a_warning(cache, monkeypatch, text):
    cache.write_text(text)
    fake = clock(monkeypatch, native=1.0, torch=5.0)
    with pytest.warns(UserWarning, match="pyops.autotune: ignoring the"):
        with pyops.autotune():
            PF.relu(torch.randn(32))
    assert fake.calls > 0
    data = json.loads(cache.read_text())  # replaced by a readable one
    assert any("relu|float32" in k for s in data["sections"].values() for k in s)


def test_nothing_is_timed_under_torch_compile(cache, monkeypatch):
    fake = clock(monkeypatch, native=1.0, torch=5.0)

    def f(x):
        return PF.relu(x) + PF.sigmoid(x)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(16, requires_grad=True)
    with pyops.autotune():
        y = compiled(x)
    assert fake.calls == 0
    assert AT.cache_entries() == {}
    torch.testing.assert_close(y, f(x))


def test_nothing_is_timed_under_a_dispatch_mode(cache, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    fake = clock(monkeypatch, native=1.0, torch=5.0)

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with pyops.autotune():
        with FakeTensorMode():
            y = PF.relu(torch.randn(64))
            assert y.shape == (64,)
        with PassThrough():
            PF.elu(torch.randn(64))
        torch.func.grad(lambda t: PF.tanh(t).sum())(torch.randn(64))  # functorch's wrapped tensors
        torch.func.jvp(PF.sigmoid, (torch.randn(64),), (torch.randn(64),))
    assert fake.calls == 0
    assert AT.cache_entries() == {}


def test_timing_leaves_running_statistics_and_grads_untouched(cache, monkeypatch):
    clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with pyops.autotune():
        y = PF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, activation="relu")
    torch.nn.functional.batch_norm(x.detach(), rm_ref, rv_ref, training=True, momentum=0.3)
    torch.testing.assert_close(rm, rm_ref)  # moved once, by the call itself
    torch.testing.assert_close(rv, rv_ref)
    assert x.grad is None and w.grad is None and b.grad is None  # timing's backward accumulates nothing
    (key,) = entries("batch_norm")
    assert key == "cpu|batch_norm|float32|contiguous|4x4x8x8|grad|training,fused|v1"
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_in_place_ops_time_their_out_of_place_form(cache, monkeypatch):
    fake = clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(64)
    expected = torch.nn.functional.leaky_relu(x, 0.2)
    version = x._version
    with pyops.autotune():
        out = PF.leaky_relu(x, 0.2, inplace=True)
    assert out is x
    assert fake.calls > 0
    assert torch.equal(x, expected)  # applied once: timing ran on the untouched input
    assert x._version == version + 1
    assert list(entries("leaky_relu")) == ["cpu|leaky_relu|float32|contiguous|n64|nograd"]
    # the out-of-place op shares the choice
    calls = fake.calls
    with pyops.autotune():
        PF.leaky_relu(torch.randn(50), 0.2)
    assert fake.calls == calls


def test_conv2d_key_names_what_picks_the_kernel(cache, monkeypatch):
    clock(monkeypatch, native=5.0, torch=1.0)
    x = torch.randn(2, 4, 6, 6)
    with pyops.autotune():
        y = PF.conv2d(x, torch.randn(8, 2, 3, 3), stride=2, padding=1, groups=2)
    (key,) = entries("conv2d")
    assert key == "cpu|conv2d|float32|contiguous|2x4x8x8|nograd|groups=2,per_group=2,out=8,k=3x3,s=2x2"
    assert AT.cache_entries()[key] == "torch"
    assert y.shape == (2, 8, 3, 3)


def test_losses_and_cross_entropy_are_tuned(cache, monkeypatch):
    clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(32, 10, requires_grad=True)
    t = torch.randint(0, 10, (32,))
    with pyops.autotune():
        loss = PF.cross_entropy(x, t) + PF.mse_loss(x, torch.zeros(32, 10))
    assert set(entries("cross_entropy").values()) == {"native"}
    assert set(entries("mse_loss").values()) == {"native"}
    loss.backward()
    ref = torch.nn.functional.cross_entropy(x, t) + torch.nn.functional.mse_loss(x, torch.zeros(32, 10))
    (g,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(x.grad, g)


def test_off_is_unchanged_and_explicit_backends_are_never_tuned(cache, monkeypatch):
    fake = clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(64, requires_grad=True)
    with pyops.autotune(False):
        assert type(PF.relu(x).grad_fn).__name__ == "ReluBackward0"
    with pyops.autotune(), pyops.backend("torch"):
        assert type(PF.relu(x).grad_fn).__name__ == "ReluBackward0"
    with pyops.autotune(), pyops.autotune(False):
        PF.relu(x)
    assert fake.calls == 0
    assert not AT.enabled()


def test_per_thread_decorator_and_process_default(cache, monkeypatch):
    clock(monkeypatch, native=1.0, torch=5.0)
    seen = {}

    def probe(name):
        seen[name] = AT.enabled()

    @pyops.autotune()
    def decorated():
        probe("decorated")
        t = threading.Thread(target=probe, args=("other thread",))
        t.start()
        t.join()

    decorated()
    assert seen == {"decorated": True, "other thread": False}
    assert not AT.enabled()
    _C._autotune_set_default(True)  # PYOPS_AUTOTUNE=1
    try:
        t = threading.Thread(target=probe, args=("default",))
        t.start()
        t.join()
        with pyops.autotune(False):
            probe("off in a block")
    finally:
        _C._autotune_set_default(False)
    assert seen["default"] and not seen["off in a block"]


def test_environment_variable_turns_it_on(tmp_path):
    path = tmp_path / "cache.json"
    code = "import pyops, torch; print(pyops.autotune.__module__); import sys; at = sys.modules['pyops.autotune']; "
    code += "print(at.enabled()); pyops.functional.relu(torch.randn(64)); print(sorted(at.cache_entries().values()))"
    env = dict(os.environ, PYOPS_AUTOTUNE="1", PYOPS_AUTOTUNE_CACHE=str(path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[1] == "True"
    assert lines[2] in ("['native']", "['torch']")
    assert path.exists()


def test_tune_command_fills_the_cache(tmp_path):
    path = tmp_path / "cache.json"
    env = dict(os.environ, PYOPS_AUTOTUNE_CACHE=str(path))
    cmd = [sys.executable, "-m", "pyops", "tune", "--model", "cnn", "--batch-size", "4", "--device", "cpu"]
    with warnings.catch_warnings():
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(path.read_text())
    (section,) = data["sections"].values()
    ops = {k.split("|")[0] for k in section}
    assert {"conv2d", "batch_norm", "cross_entropy"} <= ops
    assert any(k.endswith("|grad") or "|grad|" in k for k in section)
    assert any("|nograd" in k for k in section)
    assert "pyops tune: cnn" in out.stdout


def test_python_twins_defer_to_the_measurement(cache, monkeypatch):
    """The twins of pyops.functional hand small CPU inputs to torch themselves under the static
    rule only: under autotuning the op decides (here native, measured faster)."""
    clock(monkeypatch, native=1.0, torch=5.0)
    x = torch.randn(64, requires_grad=True)
    assert type(PF._py_relu(x).grad_fn).__name__ == "ReluBackward0"
    with pyops.autotune():
        assert PF._py_relu(x).grad_fn.name() == "pyops::ReluBackward"
        assert PF._py_elu(x).grad_fn.name() == "pyops::EluBackward"

"""torch's semantics where users lean on them, and bad input that must never crash, for the
activation family and the machinery every family shares (backend selection, convert, scripting)."""

import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import pyops
import pyops.functional as PF
import pyops.nn as pnn
from oracle import assert_close
from pyops.ops import PRIMITIVES

CPU_KERNEL_BACKENDS = [b for b in pyops.available_backends("cpu") if b != "torch"]


# ---- crashes: every primitive of every backend checks before it launches --------------------------
def test_primitives_refuse_bad_input_without_crashing():
    """Each bad argument to each primitive of each backend is an error naming the op, never a
    signal (run in a subprocess, where a crash would show as one)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "bad_calls_activation.py")
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, script, *CPU_KERNEL_BACKENDS], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "all refused" in r.stdout


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("name,args", [("relu_fwd_", ()), ("leaky_relu_fwd_", (0.1,)), ("elu_fwd_", (1.0,))])
def test_inplace_primitives_bump_the_version_once_and_refuse_leaves(backend, name, args):
    op = PRIMITIVES[backend][name]
    x = torch.randn(10)
    v = x._version
    op(x, *args)
    assert x._version == v + 1
    leaf = torch.randn(10, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        op(leaf, *args)


# ---- the backend selection is per thread and per block ------------------------------------------
def test_backend_selection_is_per_thread():
    seen, entered, release = {}, threading.Event(), threading.Event()

    def holder():
        with pyops.backend("torch"):
            entered.set()
            release.wait(10)
            seen["holder"] = pyops.current_backend()

    t = threading.Thread(target=holder)
    t.start()
    entered.wait(10)
    seen["main"] = pyops.current_backend()
    with pyops.backend("native"):  # exits on this thread restore this thread's choice only
        pass
    release.set()
    t.join()
    assert seen == {"holder": "torch", "main": "auto"}
    assert pyops.current_backend() == "auto"


def test_backend_as_decorator_holds_in_each_generator_resumption():
    @pyops.backend("torch")
    def gen():
        for _ in range(2):
            yield pyops.current_backend()

    g = gen()
    assert next(g) == "torch"
    assert pyops.current_backend() == "auto"  # nothing leaks to the caller while suspended
    assert next(g) == "torch"


def test_nested_blocks_restore_in_order():
    with pyops.backend("torch"):
        with pyops.backend("native"):
            assert pyops.current_backend() == "native"
        assert pyops.current_backend() == "torch"
    assert pyops.current_backend() == "auto"


# ---- torch.compile and torch.export with dynamic shapes under `auto` ------------------------------
def test_compile_dynamic_shapes_with_auto():
    def f(x):
        return PF.relu(x) + PF.elu(x) + PF.maxout(x, 2, 1).sum() + PF.sigmoid(x) * PF.tanh(x)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (3, 5, 1 << 15):  # across auto's CPU crossover sizes
        x = torch.randn(batch, 4, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        xr = x.detach().requires_grad_()
        f(xr).sum().backward()
        assert_close(y, f(x.detach()).double(), torch.float32)
        assert_close(x.grad, xr.grad.double(), torch.float32)


def test_export_with_a_dynamic_batch():
    class M(nn.Module):
        def forward(self, x):
            return PF.leaky_relu(PF.relu(x), 0.2) * PF.sigmoid(x)

    batch = torch.export.Dim("batch", min=2, max=1 << 20)
    ep = torch.export.export(M(), (torch.randn(4, 3),), dynamic_shapes={"x": {0: batch}})
    for n in (2, 7, 1 << 16):
        x = torch.randn(n, 3)
        assert_close(ep.module()(x), M()(x).double(), torch.float32)


# ---- saved tensors, double backward --------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_elu_saves_its_input_as_torch(backend):
    """torch's out-of-place elu saves its input, so its output can be modified in place."""
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    res = torch.randn(20, dtype=torch.float64)
    with pyops.backend(backend):
        out = PF.elu(x, 0.7)
        out += res
        out.sum().backward()
    xr = x.detach().requires_grad_()
    outr = TF.elu(xr, 0.7)
    outr += res
    outr.sum().backward()
    assert_close(x.grad, xr.grad, torch.float64)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_double_backward_through_masked_activations_is_zero(backend, name):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    op = getattr(PF, name)
    with pyops.backend(backend):
        (g,) = torch.autograd.grad(op(x).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
    (gt,) = torch.autograd.grad(getattr(TF, name)(x).sum(), x, create_graph=True)
    (ggt,) = torch.autograd.grad(gt.sum(), x)
    assert torch.equal(gg, ggt) and not gg.any()


# ---- scalars in every form torch accepts, of any magnitude ---------------------------------------
@pytest.mark.parametrize("value", [np.float32(0.2), np.float64(0.3), torch.tensor(0.25), True, 2])
def test_scalar_forms(value):
    x = torch.randn(30, dtype=torch.float64)
    with pyops.backend("native"):
        assert_close(PF.leaky_relu(x, value), TF.leaky_relu(x, float(value)), torch.float64)
        assert_close(PF.elu(x, value), TF.elu(x, float(value)), torch.float64)
    m = pyops.convert(nn.Sequential(nn.LeakyReLU(value), nn.ELU(value)))
    with pyops.backend("native"):
        assert_close(m(x), TF.elu(TF.leaky_relu(x, float(value)), float(value)), torch.float64)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("value", [1e39, -1e39, 1e300, math.inf, -math.inf, 5e-324])
def test_huge_and_non_finite_scalars_match_torch(backend, value):
    x = torch.tensor([-3.0, -1e-3, -0.0, 0.0, 2.0, math.inf, -math.inf], dtype=torch.float64)
    g = torch.linspace(-1, 1, 7, dtype=torch.float64)
    for op, ref in [(PF.leaky_relu, TF.leaky_relu), (PF.elu, TF.elu)]:
        xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        with pyops.backend(backend):
            y = op(xp, value)
            y.backward(g)
        yr = ref(xr, value)
        yr.backward(g)
        assert_close(y, yr, torch.float64)  # NaN and inf where torch has them, the rest to 1e-10
        assert_close(xp.grad, xr.grad, torch.float64, what="gradient")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS + ["torch"])
def test_relu_keeps_negative_zero(backend):
    x = torch.tensor([-0.0, 0.0, -2.0, math.nan])
    with pyops.backend(backend):
        y = PF.relu(x)
        z = PF.relu(x.clone(), inplace=True)
    for out in (y, z):
        assert torch.equal(out.signbit(), TF.relu(x).signbit()) and out[3].isnan()


# ---- convert keeps hooks and sharing, and converts the root ---------------------------------------
def test_convert_copies_unless_inplace():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    copied = pyops.convert(model)
    assert copied is not model and isinstance(model[1], nn.ReLU) and not isinstance(model[1], pnn.ReLU)
    assert isinstance(copied[1], pnn.ReLU) and copied[0].weight is not model[0].weight
    assert torch.equal(copied[0].weight, model[0].weight) and copied.state_dict().keys() == model.state_dict().keys()
    same = pyops.convert(model, inplace=True)
    assert same is model and isinstance(model[1], pnn.ReLU)


def test_convert_keeps_hooks_sharing_and_converts_the_root():
    shared, calls = nn.ReLU(), []
    shared.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    shared.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared, nn.Sequential(nn.Tanh()))
    model.eval()
    assert pyops.convert(model, inplace=True) is model
    assert isinstance(model[1], pnn.ReLU) and model[1] is model[3] and isinstance(model[4][0], pnn.Tanh)
    assert not model[1].training
    model(torch.randn(2, 3))
    assert calls == ["pre", "fwd", "pre", "fwd"]
    root = pyops.convert(nn.LeakyReLU(0.3))
    assert isinstance(root, pnn.LeakyReLU) and root.negative_slope == 0.3


# ---- TorchScript and forward-mode AD ------------------------------------------------------------
def test_jit_script_of_pyops_modules():
    model = nn.Sequential(
        pnn.Maxout(4, 6, 2), pnn.ReLU(), pnn.LeakyReLU(0.1, True), pnn.ELU(0.5), pnn.Sigmoid(), pnn.Tanh()
    )
    scripted = torch.jit.script(model)
    x = torch.randn(3, 4)
    assert_close(scripted(x), model(x).double(), torch.float32)
    assert "pyops::maxout" in str(scripted._modules["0"].forward.graph)


def test_forward_mode_ad():
    """Dual tensors get the tangent torch's op gives (tests/test_autodiff.py checks every op and mode)."""
    import torch.autograd.forward_ad as fwAD

    x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for backend in CPU_KERNEL_BACKENDS:
        with pyops.backend(backend), fwAD.dual_level():
            y = fwAD.unpack_dual(PF.relu(fwAD.make_dual(x, v)))
            yr = fwAD.unpack_dual(TF.relu(fwAD.make_dual(x, v)))
            assert_close(y.primal, yr.primal, torch.float64)
            assert_close(y.tangent, yr.tangent, torch.float64)


def test_vmap_runs_the_ops_batched():
    """torch.vmap uses pyops' batching rules (no per-sample loop). torch.func's autograd transforms
    (grad, vjp, jvp, jacrev, jacfwd, hessian) work too: tests/test_autodiff.py."""
    import warnings

    x = torch.randn(3, 4, 6, dtype=torch.float64)
    with pyops.backend("native"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop fallback warns
        for f, ref in [
            (PF.relu, TF.relu),
            (lambda t: PF.leaky_relu(t, 0.3), lambda t: TF.leaky_relu(t, 0.3)),
            (lambda t: PF.elu(t, 0.7), lambda t: TF.elu(t, 0.7)),
            (PF.sigmoid, torch.sigmoid),
            (PF.tanh, torch.tanh),
        ]:
            assert_close(torch.vmap(f, in_dims=1)(x), ref(x).movedim(1, 0), torch.float64)
        y = torch.vmap(lambda t: PF.maxout(t, 3, -1), in_dims=1)(x)
        assert_close(y, torch.stack([PF.maxout(x[:, i], 3, -1) for i in range(4)]), torch.float64)


# ---- the C entry points of pyops.functional -----------------------------------------------------
C_FUNCTIONS = ["relu", "leaky_relu", "elu", "sigmoid", "tanh", "maxout", "batch_norm", "cross_entropy"]


@pytest.mark.parametrize("name", C_FUNCTIONS)
def test_c_functions_carry_the_twins_signature_and_the_math(name):
    import inspect
    import types

    f = getattr(PF, name)
    assert isinstance(f, types.BuiltinFunctionType)
    assert inspect.signature(f) == inspect.signature(getattr(PF, "_py_" + name))
    assert "gradient" in f.__doc__.lower() or "maximal" in f.__doc__


_CALL_FORMS = [
    ("relu", (), {}),
    ("relu", (False,), {}),
    ("relu", (), {"inplace": False}),
    ("leaky_relu", (0.2,), {}),
    ("leaky_relu", (), {"negative_slope": 0.3, "inplace": False}),
    ("leaky_relu", (0.2, False), {}),
    ("elu", (), {"alpha": 0.5}),
    ("elu", (1.5, False), {}),
    ("maxout", (3,), {}),
    ("maxout", (2,), {"dim": -1}),
    ("maxout", (), {"pieces": 2, "dim": 0}),
    ("sigmoid", (), {}),
    ("tanh", (), {}),
]


@pytest.mark.parametrize("backend", ["auto"] + CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("name,args,kwargs", _CALL_FORMS)
def test_c_functions_equal_their_twins_in_every_call_form(backend, name, args, kwargs):
    """Positional and keyword arguments, defaults: the same values and gradients as the Python twin."""
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(getattr(PF, "_py_" + name)(x, *args, **kwargs))
    with pyops.backend(backend):
        y = getattr(PF, name)(x, *args, **kwargs)
        yt = getattr(PF, "_py_" + name)(x, *args, **kwargs)
        (gx,) = torch.autograd.grad(y, x, g)
        (gt,) = torch.autograd.grad(yt, x, g)
    assert torch.equal(y, yt) and torch.equal(gx, gt)


def test_c_functions_in_place_return_the_input_object():
    x = torch.randn(5, 5)
    for f, kw in [(PF.relu, {}), (PF.leaky_relu, {"negative_slope": 0.1}), (PF.elu, {"alpha": 0.5})]:
        with pyops.backend("native"):
            assert f(x, inplace=True, **kw) is x
            assert f(x, *kw.values(), True) is x


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: PF.relu(3), "pyops.relu: input must be a Tensor"),
        (lambda: PF.sigmoid([1.0]), "pyops.sigmoid: input must be a Tensor"),
        (lambda: PF.relu(), "missing"),
        (lambda: PF.relu(torch.ones(2), bogus=1), "unexpected keyword"),
        (lambda: PF.tanh(torch.ones(2), torch.ones(2)), "positional"),
        (lambda: PF.maxout(torch.ones(4), 2.0), "pieces must be an int"),
        (lambda: PF.leaky_relu(torch.ones(2), "a"), "negative_slope must be a number"),
        (lambda: PF.leaky_relu(torch.ones(2, dtype=torch.int32)), "dtype"),
        (lambda: PF.maxout(torch.ones(4), 3, 0), "does not divide"),
        (lambda: PF.maxout(torch.ones(4), 2**70), "pieces must be an int in"),
    ],
)
def test_c_functions_report_bad_input_as_the_twins(call, error):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=error):
        call()


def test_torch_function_modes_and_subclasses_see_the_calls():
    """A __torch_function__ mode sees each call, and a tensor subclass keeps its type, as with torch's
    own functions (the C functions hand such calls to the twins)."""
    from torch.overrides import TorchFunctionMode

    class Log(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    x = torch.randn(3, 4)
    for backend in ["auto"] + CPU_KERNEL_BACKENDS:
        with pyops.backend(backend):
            with Log() as log:
                y = PF.relu(x)
            assert log.seen and torch.equal(y, TF.relu(x))
            s = x.as_subclass(Sub)
            for f in (PF.relu, PF.sigmoid, lambda t: PF.maxout(t, 2)):
                assert type(f(s)) is Sub


_BN_FORMS = [
    ((False,), {}),
    ((True, 0.2, 1e-3), {}),
    ((True,), {"activation": "relu"}),
    ((True,), {"activation": "leaky_relu", "negative_slope": 0.2, "residual": "r"}),
    ((), {"training": True, "momentum": 0.3, "activation": "elu", "alpha": 0.5, "memory_efficient": True}),
]


@pytest.mark.parametrize("backend", ["auto"] + CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("args,kwargs", _BN_FORMS)
def test_c_batch_norm_equals_its_twin(backend, args, kwargs):
    """Values, gradients and running statistics as the Python twin's, in every call form."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    kwargs = {k: (torch.randn_like(x) if v == "r" else v) for k, v in kwargs.items()}
    results = []
    for f in (PF.batch_norm, PF._py_batch_norm):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        with pyops.backend(backend):
            y = f(x, rm, rv, w, b, *args, **kwargs)
            grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        results.append((y, *grads, rm, rv))
    for a, t in zip(*results):
        assert torch.equal(a, t)


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda x, s: PF.batch_norm(x, *s, training=True, eps=0.0), "eps must be positive"),
        (lambda x, s: PF.batch_norm(x, *s, eps=-1.0), "eps must be non-negative"),
        (lambda x, s: PF.batch_norm(x, *s, activation="gelu"), "activation must be one of"),
        (lambda x, s: PF.batch_norm(x[:1, :, :1, :1], *s, training=True), "more than 1 value per channel"),
        (lambda x, s: PF.batch_norm(x[0, 0, 0], *s), "running_mean should contain 0 elements"),  # torch's words
        (lambda x, s: PF.batch_norm(x, *s, None, None, False, 0.1, 1e-5, None), "positional"),
        (lambda x, s: PF.batch_norm(x, *s, weight="w"), "weight"),
    ],
)
def test_c_batch_norm_reports_bad_input_as_torch(call, error):
    x = torch.randn(2, 3, 4, 4)
    stats = (torch.zeros(3), torch.ones(3))
    with pytest.raises((TypeError, ValueError, RuntimeError), match=error):
        call(x, stats)


@pytest.mark.parametrize("backend", ["auto"] + CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"reduction": "sum"}, {"reduction": "none", "ignore_index": 2}, {"label_smoothing": 0.1, "weight": "w"},
     {"size_average": False}, {"reduction": "mean", "label_smoothing": 1}],
)  # fmt: skip
def test_c_cross_entropy_equals_its_twin(backend, kwargs):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    kwargs = {k: (torch.rand(5, dtype=torch.float64) if v == "w" else v) for k, v in kwargs.items()}
    with pyops.backend(backend):
        y, yt = PF.cross_entropy(x, t, **kwargs), PF._py_cross_entropy(x, t, **kwargs)
        g = torch.ones_like(y)
        assert torch.equal(y, yt)
        assert torch.equal(*(torch.autograd.grad(v, x, g)[0] for v in (y, yt)))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        PF.cross_entropy(x, t, reduction="avg")

"""The loss family against the float64 torch oracle, on every backend that runs here: outputs and the
gradients of input and target over shapes, layouts, dtypes, reductions and edge values; cross entropy
over class indices and probabilities, class weights, ignored targets and label smoothing."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import pyops
import pyops.functional as PF
import pyops.nn as pnn
from oracle import DTYPES, assert_close, device_backends, kernel_device_backends, opcheck_primitive, skip_unreliable
from pyops.ops import PRIMITIVES
from pyops.ops.loss import FAKES as LOSS_FAKES
from pyops.ops.loss import rmse_reference
from pyops.testing import compare

REDUCTIONS = ["none", "mean", "sum"]
POINTWISE = {
    "l1_loss": (PF.l1_loss, TF.l1_loss, {}),
    "mse_loss": (PF.mse_loss, TF.mse_loss, {}),
    "huber_loss": (PF.huber_loss, TF.huber_loss, {"delta": 0.7}),
    "rmse_loss": (PF.rmse_loss, rmse_reference, {}),
}


def _transposed(t):
    return t.t()


# (input shape, target shape, view applied to both): odd sizes, several chunks, non-contiguous,
# channels_last, broadcast target, empty, 0-d.
LAYOUTS = {
    "odd": ((13, 9), (13, 9), None),
    "chunks": ((3, 9001), (3, 9001), None),
    "transposed": ((9, 21), (9, 21), _transposed),
    "sliced": ((6, 34), (6, 34), lambda t: t[1:, ::3]),
    "channels_last": ((2, 5, 3, 7), (2, 5, 3, 7), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "broadcast": ((7, 5), (1, 5), None),
    "empty": ((0, 3), (0, 3), None),
    "0d": ((), (), None),
}


def _draw(shape, dtype, device, view=None):
    t = (torch.randn(shape, dtype=torch.float64) * 2).to(dtype).to(device)
    return view(t) if view is not None else t


def _run(fn, x, t, kw, g=None):
    """fn's output and the gradients of x and t (zeros where the output is empty)."""
    xr = x.detach().clone().requires_grad_()
    tr = t.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fn(xr, tr, **kw)
    if g is None:
        g = torch.randn(y.shape, dtype=torch.float64).to(y.dtype).to(y.device)
    if y.numel() == 0:
        return y, torch.zeros_like(xr), torch.zeros_like(tr), g
    gx, gt = torch.autograd.grad(y, (xr, tr), g)
    return y, gx, gt, g


def _compare_pointwise(name, x, t, kw):
    fn, ref, base = POINTWISE[name]
    kw = {**base, **kw}
    dtype = x.dtype
    y, gx, gt, g = _run(fn, x, t, kw)
    y64, gx64, gt64, _ = _run(ref, x.double(), t.double(), kw, g.double())
    yt, gxt, gtt, _ = _run(ref, x, t, kw, g)
    n = max(1, x.numel() if kw.get("reduction") != "none" else 1)
    assert_close(y, y64, dtype, yt, reduced=n)
    assert_close(gx, gx64, dtype, gxt, what="input gradient")
    assert_close(gt, gt64, dtype, gtt, what="target gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_against_oracle(name, reduction, device, backend, dtype):
    """Every layout: outputs and both gradients, against the float64 oracle."""
    skip_unreliable(device, backend, dtype)
    for layout, (xs, ts, view) in LAYOUTS.items():
        if backend == "triton" and layout == "chunks":
            continue  # the interpreter is slow: several programs are covered by "odd" already
        torch.manual_seed(1)
        x = _draw(xs, dtype, device, view)
        t = _draw(ts, dtype, device, view)
        with pyops.backend(backend):
            try:
                _compare_pointwise(name, x, t, {"reduction": reduction})
            except AssertionError as e:
                raise AssertionError(f"{layout}: {e}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_edge_values(name, device, backend, dtype):
    """Zero error (L1/RMSE gradient 0), errors at +-delta, tiny and huge values, inf and NaN."""
    skip_unreliable(device, backend, dtype)
    vals = [0, -0.0, 1e-30, 0.7, -0.7, 0.6999, 1, -1, 20, 1e30, float("inf"), float("nan"), 3, -3]
    x = torch.tensor(vals, dtype=torch.float64)
    t = torch.tensor([0, 0, 0, 0, 0, 0, 0.5, 0, -20, 0, 0, 0, 3, -3], dtype=torch.float64)
    x, t = x.to(dtype).to(device), t.to(dtype).to(device)
    for reduction in REDUCTIONS:
        with pyops.backend(backend):
            if name == "rmse_loss" and reduction != "none":  # finite values only: its scale is global
                _compare_pointwise(name, x[:10], t[:10], {"reduction": reduction})
            else:
                _compare_pointwise(name, x, t, {"reduction": reduction})


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", ["l1_loss", "rmse_loss"])
def test_zero_error_gradient_is_zero(name, device, backend):
    """L1's gradient at zero error is 0 (as torch's), RMSE's too where the whole loss is 0: never NaN."""
    fn = POINTWISE[name][0]
    x = torch.zeros(10, device=device, requires_grad=True)
    t = torch.zeros(10, device=device, requires_grad=True)
    with pyops.backend(backend):
        for reduction in ("mean", "sum", "none"):
            y = fn(x, t, reduction=reduction)
            gx, gt = torch.autograd.grad(y.sum(), (x, t))
            assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("device,backend", device_backends())
def test_rmse_propagates_nan_and_inf(device, backend):
    """sqrt(mse + eps) for mean and sum: a NaN error gives NaN (value and gradient), an infinite one inf, an
    empty mean NaN, as torch.sqrt(mse_loss) does; only an exact zero takes the zero gradient."""
    nan, inf = float("nan"), float("inf")
    for reduction in ("mean", "sum"):
        for xs in ([1.0, nan, 2.0], [1.0, inf, 2.0], [1.0, -2.0, 0.5]):
            x = torch.tensor(xs, dtype=torch.float64, device=device, requires_grad=True)
            t = torch.zeros(3, dtype=torch.float64, device=device)
            with pyops.backend(backend):
                y = PF.rmse_loss(x, t, reduction=reduction)
                (gx,) = torch.autograd.grad(y, x)
            xr = x.detach().clone().requires_grad_()
            yr = torch.sqrt(TF.mse_loss(xr, t, reduction=reduction))
            (gr,) = torch.autograd.grad(yr, xr)
            torch.testing.assert_close(y, yr, equal_nan=True)
            torch.testing.assert_close(gx, gr, equal_nan=True)
        e = torch.zeros(0, dtype=torch.float64, device=device)
        with pyops.backend(backend):
            y = PF.rmse_loss(e, e, reduction=reduction)
        torch.testing.assert_close(y, torch.sqrt(TF.mse_loss(e, e, reduction=reduction)), equal_nan=True)


def test_huber_non_positive_delta_is_a_runtime_error_as_torch():
    x = torch.randn(3)
    for delta in (0.0, -1.0):
        with pytest.raises(RuntimeError, match="huber_loss does not support non-positive values for delta"):
            PF.huber_loss(x, x, delta=delta)
        with pytest.raises(RuntimeError, match="huber_loss does not support non-positive values for delta"):
            TF.huber_loss(x, x, delta=delta)


def test_broadcast_warns_as_torch():
    x, t = torch.randn(4, 3), torch.randn(3)
    for fn, _, kw in POINTWISE.values():
        with pytest.warns(UserWarning, match="Using a target size"):
            fn(x, t, **kw)


@pytest.mark.parametrize("device,backend", device_backends())
def test_zero_dim_incoming_gradient(device, backend):
    """mean/sum receive a 0-d gradient: 1 hands the saved gradient on, any other value scales it."""
    x = torch.randn(50, 3, dtype=torch.float64, device=device)
    t = torch.randn(50, 3, dtype=torch.float64, device=device)
    labels = torch.randint(0, 3, (50,), device=device)
    cases = [
        (name, fn, ref, {**kw, "reduction": r}) for name, (fn, ref, kw) in POINTWISE.items() for r in ("mean", "sum")
    ]
    cases += [
        (
            "cross_entropy",
            lambda a, b, **k: PF.cross_entropy(a, labels, **k),
            lambda a, b, **k: TF.cross_entropy(a, labels, **k),
            {"reduction": r},
        )
        for r in ("mean", "sum")
    ]
    if backend == "triton":  # the interpreter is slow
        cases = cases[::3]
    for name, fn, ref, kw in cases:
        for scale in (1.0, 2.5, 0.0):
            g = torch.tensor(scale, dtype=torch.float64, device=device)
            with pyops.backend(backend):
                xp = x.clone().requires_grad_()
                fn(xp, t, **kw).backward(g)
            xr = x.clone().requires_grad_()
            ref(xr, t, **kw).backward(g)
            assert_close(xp.grad, xr.grad, torch.float64, what=f"{name} {kw} {scale}")


@pytest.mark.parametrize("name", ["l1_loss", "mse_loss", "huber_loss"])
def test_saved_gradient_handed_on_without_copy(name):
    """With the default incoming gradient 1, backward is free: x.grad is the forward's gradient."""
    fn, ref, kw = POINTWISE[name]
    x = torch.randn(1 << 16, requires_grad=True)
    t = torch.randn(1 << 16)
    saved = []

    def pack(s):
        saved.append(s)
        return s

    with pyops.backend("native"), torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        y = fn(x, t, **kw)
    assert [s.numel() for s in saved] == [x.numel()]
    ptr = saved[0].data_ptr()
    saved.clear()
    y.backward()
    assert x.grad.data_ptr() == ptr  # the forward's gradient itself: no copy, no multiply
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(ref(x64, t.double(), **kw), x64)
    assert_close(x.grad, expected, torch.float32)


def test_huge_input_summation_order():
    """2^24 + 5 float32 elements: a running float32 sum would lose the small terms; the chunked sum in
    float32 lanes folded in float64 stays within float32's tolerance of the float64 oracle."""
    n = (1 << 24) + 5
    x = torch.full((n,), 1.0) + torch.rand(n) * 1e-3
    t = torch.zeros(n)
    t[:7] = -300.0
    with pyops.backend("native"):
        for name in ("mse_loss", "l1_loss", "huber_loss"):
            fn, ref, kw = POINTWISE[name]
            for reduction in ("mean", "sum"):
                y = fn(x, t, reduction=reduction, **kw)
                y64 = ref(x.double(), t.double(), reduction=reduction, **kw)
                r = compare(y, y64, torch.float32)
                assert r.ok, f"{name} {reduction}: {r.message}"
                assert torch.equal(y, fn(x, t, reduction=reduction, **kw))  # deterministic


@pytest.mark.parametrize("device,backend", device_backends())
def test_pointwise_gradcheck(device, backend):
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    x = torch.where(x.abs() < 0.05, x + 0.2, x).requires_grad_()
    t = torch.zeros(4, 5, dtype=torch.float64, device=device).requires_grad_()
    reductions = ["sum"] if backend == "triton" else REDUCTIONS  # the interpreter is slow
    with pyops.backend(backend):
        for name, (fn, _, kw) in POINTWISE.items():
            for r in reductions:
                assert torch.autograd.gradcheck(lambda a, b, fn=fn, r=r, kw=kw: fn(a, b, reduction=r, **kw), (x, t)), (
                    name,
                    r,
                )


@pytest.mark.parametrize("device,backend", kernel_device_backends())
def test_double_backward(device, backend):
    """create_graph=True makes the saved gradient a differentiable function of the inputs (the first-order
    path hands it on as before): second derivatives are torch's (tests/test_autodiff.py checks every form)."""
    x = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 2], device=device)
    cases = [
        (lambda a, b: PF.mse_loss(a, b), lambda a, b: TF.mse_loss(a, b)),
        (lambda a, b: PF.cross_entropy(a.view(2, 3), labels), lambda a, b: TF.cross_entropy(a.view(2, 3), labels)),
    ]
    for fn, ref in cases:
        with pyops.backend(backend):
            g = torch.autograd.grad(fn(x, t), x, create_graph=True)[0]
            gg = torch.autograd.grad((g * g.detach().cos()).sum(), x)[0]
        gr = torch.autograd.grad(ref(x, t), x, create_graph=True)[0]
        ggr = torch.autograd.grad((gr * gr.detach().cos()).sum(), x)[0]
        assert_close(g, gr, torch.float64)
        assert_close(gg, ggr, torch.float64, reduced=x.numel())


# ---- cross entropy -----------------------------------------------------------------------------------
# (input shape, target kind, weight, ignore_index, label_smoothing)
CE_CONFIGS = {
    "plain": ((6, 5), "index", False, -100, 0.0),
    "weighted": ((6, 5), "index", True, -100, 0.0),
    "ignored": ((9, 4), "index", False, 2, 0.0),
    "smoothing": ((6, 5), "index", False, -100, 0.3),
    "all": ((9, 37), "index", True, 1, 0.25),
    "dims": ((3, 4, 5, 2), "index", True, 0, 0.1),
    "unbatched": ((7,), "index", False, -100, 0.0),
    "c1": ((5, 1), "index", False, -100, 0.2),
    "wide": ((3, 1030), "index", False, -100, 0.0),
    "probs": ((6, 5), "probs", False, -100, 0.0),
    "probs_weighted": ((6, 5), "probs", True, -100, 0.2),
    "probs_dims": ((2, 3, 4), "probs", False, -100, 0.0),
    "probs_unbatched": ((5,), "probs", False, -100, 0.1),
    "empty": ((0, 4), "index", False, -100, 0.0),
}


# What the Triton interpreter runs (every kernel branch: weights, ignored rows, smoothing, dims,
# probabilities, one class, an unbatched row).
TRITON_CE_CONFIGS = ("all", "dims", "unbatched", "c1", "probs_weighted", "empty")


def _ce_inputs(shape, kind, weighted, ignore_index, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 3).to(dtype).to(device)
    classes = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if kind == "index":
        t = torch.randint(0, classes, tshape, generator=gen)
        if ignore_index >= 0 and t.numel():
            t.view(-1)[::3] = ignore_index
        t = t.to(device)
    else:
        t = torch.rand(shape, dtype=torch.float64, generator=gen).softmax(0 if len(shape) == 1 else 1)
        t = t.to(dtype).to(device)
    w = (torch.rand(classes, dtype=torch.float64, generator=gen) + 0.5).to(dtype).to(device) if weighted else None
    return x, t, w


def _ce_run(fn, x, t, w, kw, g=None):
    xr = x.detach().clone().requires_grad_()
    y = fn(xr, t, w, **kw)
    if g is None:
        g = torch.randn(y.shape, dtype=torch.float64).to(y.dtype).to(y.device)
    if y.numel() == 0 or x.numel() == 0:
        return y, torch.zeros_like(xr), g
    (gx,) = torch.autograd.grad(y, xr, g)
    return y, gx, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_against_oracle(reduction, device, backend, dtype):
    skip_unreliable(device, backend, dtype)
    for label, (shape, kind, weighted, ignore_index, smoothing) in CE_CONFIGS.items():
        if backend == "triton" and label not in TRITON_CE_CONFIGS:
            continue  # the interpreter is slow
        x, t, w = _ce_inputs(shape, kind, weighted, ignore_index, dtype, device)
        kw = {"ignore_index": ignore_index, "reduction": reduction, "label_smoothing": smoothing}
        with pyops.backend(backend):
            y, gx, g = _ce_run(PF.cross_entropy, x, t, w, kw)
        t64 = t.double() if kind == "probs" else t
        w64 = w.double() if w is not None else None
        y64, gx64, _ = _ce_run(TF.cross_entropy, x.double(), t64, w64, kw, g.double())
        yt, gxt, _ = _ce_run(TF.cross_entropy, x, t, w, kw, g)
        reduced = shape[1] if len(shape) > 1 else shape[0]
        try:
            assert_close(y, y64, dtype, yt, reduced=max(1, x.numel()))
            assert_close(gx, gx64, dtype, gxt, what="gradient", reduced=reduced)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from None


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_nonfinite_logits(reduction, device, backend):
    """-inf logits (a class of probability 0, the target's or another's), +inf and NaN: losses and
    gradients as torch's, NaN where torch's are NaN."""
    inf, nan = float("inf"), float("nan")
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    t = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
    x[0, 2], x[1, 1], x[2, 0], x[3, 3], x[4, 1] = -inf, -inf, inf, inf, nan
    for kw in ({}, {"label_smoothing": 0.2}, {"ignore_index": 1}):
        kw = {"reduction": reduction, **kw}
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        with pyops.backend(backend):
            y = PF.cross_entropy(xo, t, **kw)
            (gx,) = torch.autograd.grad(y, xo, torch.ones_like(y))
        yr = TF.cross_entropy(xr, t, **kw)
        (gr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
        torch.testing.assert_close(y, yr, equal_nan=True, msg=lambda m, kw=kw: f"{kw}: {m}")
        torch.testing.assert_close(gx, gr, equal_nan=True, msg=lambda m, kw=kw: f"{kw} gradient: {m}")


@pytest.mark.parametrize("device,backend", device_backends())
def test_cross_entropy_layouts(device, backend):
    """Non-contiguous and channels_last logits, large logits (max-shifted), float16 rows of +-60."""
    x = torch.randn(8, 6, dtype=torch.float64, device=device)
    t = torch.randint(0, 6, (8,), device=device)
    img = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    timg = torch.randint(0, 5, (2, 3, 4), device=device)
    for xx, tt in [(x.t().contiguous().t(), t), (x[:, ::2], t % 3), (x * 1000, t), (img, timg)]:
        with pyops.backend(backend):
            y, gx, g = _ce_run(PF.cross_entropy, xx, tt, None, {})
        y64, gx64, _ = _ce_run(TF.cross_entropy, xx, tt, None, {}, g)
        assert_close(y, y64, torch.float64)
        assert_close(gx, gx64, torch.float64, what="gradient")
    h = (torch.randn(4, 9, device=device) * 60).half()
    with pyops.backend(backend):
        y, gx, g = _ce_run(PF.cross_entropy, h, t[:4], None, {})
    y64, gx64, _ = _ce_run(TF.cross_entropy, h.double(), t[:4], None, {}, g.double())
    assert torch.isfinite(y) and torch.isfinite(gx).all()
    assert_close(y, y64, torch.float16, reduced=36)


@pytest.mark.parametrize("device,backend", device_backends())
def test_cross_entropy_all_ignored(device, backend):
    """Every target ignored: mean is NaN (0 / 0, as torch), the gradient 0; sum and none give 0."""
    x = torch.randn(4, 3, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    with pyops.backend(backend):
        for smoothing in (0.0, 0.2):
            for w in (None, torch.rand(3, device=device)):
                y = PF.cross_entropy(x, t, w, label_smoothing=smoothing)
                assert torch.isnan(y)
                (gx,) = torch.autograd.grad(y, x)
                assert torch.equal(gx, torch.zeros_like(gx))
                assert PF.cross_entropy(x, t, w, reduction="sum", label_smoothing=smoothing).item() == 0


@pytest.mark.parametrize("device,backend", device_backends())
def test_cross_entropy_gradcheck(device, backend):
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 2, 1, 2], device=device)
    q = torch.rand(4, 3, dtype=torch.float64, device=device).softmax(1)
    w = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    x4 = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    t4 = torch.randint(0, 3, (2, 2, 2), device=device)
    # the Triton interpreter is slow: one reduction there (the kernels do not depend on it)
    reductions = ["mean"] if backend == "triton" else REDUCTIONS
    with pyops.backend(backend):
        for r in reductions:
            assert torch.autograd.gradcheck(lambda a, r=r: PF.cross_entropy(a, t, w, ignore_index=1, reduction=r), (x,))
            if backend == "triton":
                continue
            assert torch.autograd.gradcheck(
                lambda a, r=r: PF.cross_entropy(a, q, label_smoothing=0.2, reduction=r), (x,)
            )
            assert torch.autograd.gradcheck(
                lambda a, r=r: PF.cross_entropy(a, t4, label_smoothing=0.1, reduction=r), (x4,)
            )


def test_cross_entropy_target_grad_goes_to_torch():
    """Gradients for probability targets (or class weights) are torch's: the call runs torch's op."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = torch.rand(4, 3, dtype=torch.float64).softmax(1).requires_grad_()
    with pyops.backend("native"):
        y = PF.cross_entropy(x, q)
    gx, gq = torch.autograd.grad(y, (x, q))
    gx64, gq64 = torch.autograd.grad(TF.cross_entropy(x, q), (x, q))
    assert_close(gx, gx64, torch.float64)
    assert_close(gq, gq64, torch.float64)


def test_cross_entropy_saves_one_gradient():
    """Backward keeps the softmax gradient at the input's width and nothing else of the input's size
    (torch keeps the float32 log-softmax); beside it the class-index target (one int64 a row), which the
    second derivative reads."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 100, dtype=dtype, requires_grad=True)
        t = torch.randint(0, 100, (64,))
        with pyops.backend("native"):
            got = pyops.saved_bytes(lambda a, t=t: PF.cross_entropy(a, t), x)
        assert got == x.numel() * x.element_size() + t.numel() * t.element_size()


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cross_entropy_bad_targets(backend):
    """Out-of-range class indices raise a clear error on the CPU (never a read out of bounds); bad
    shapes, dtypes and weights too."""
    if backend not in pyops.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    x = torch.randn(3, 4)
    with pyops.backend(backend):
        for bad in (torch.tensor([0, 4, 1]), torch.tensor([0, -1, 1]), torch.tensor([0, -100, 7])):
            with pytest.raises(IndexError, match=r"pyops::cross_entropy_fwd: target -?\d+ is out of bounds"):
                PF.cross_entropy(x, bad)
        with pytest.raises(RuntimeError, match="label_smoothing must be between"):
            PF.cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=1.5)
        # torch's error types and words after the op's name (torch's own tests match them)
        for args, kwargs, error, words in [
            (
                (torch.tensor([0, 1]),),
                {},
                ValueError,
                r"Expected input batch_size \(3\) to match target batch_size \(2\)",
            ),
            (
                (torch.tensor([0, 1, 2], dtype=torch.int32),),
                {},
                RuntimeError,
                "expected target dtype to be Long or Byte",
            ),
            (
                (torch.tensor([0, 1, 2]), torch.ones(5)),
                {},
                RuntimeError,
                "weight tensor should be defined either for all 4",
            ),
            (
                (torch.rand(3, 4),),
                {"ignore_index": 1},
                RuntimeError,
                "ignore_index is not supported for floating point",
            ),
            ((torch.zeros(3, 4, dtype=torch.long),), {}, RuntimeError, "Expected floating point type for target with"),
            ((torch.rand(3),), {}, RuntimeError, "expected target dtype to be Long or Byte, but got Float"),
        ]:
            with pytest.raises(error, match="pyops.cross_entropy: " + words):
                PF.cross_entropy(x, *args, **kwargs)
            with pytest.raises(error):  # (torch's words vary across its versions; the type does not)
                TF.cross_entropy(x, *args, **kwargs)
        with pytest.raises(RuntimeError, match=r"pyops.cross_entropy: Expected target size \[2, 5\], got \[2, 4\]"):
            PF.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    # uint8 class indices are torch's form alone: torch runs them
    t = torch.tensor([0, 3, 1], dtype=torch.uint8)
    torch.testing.assert_close(PF.cross_entropy(x, t), TF.cross_entropy(x, t))


def test_primitives_refuse_bad_input_without_crashing():
    """Every backend's primitives check before they launch, in a subprocess (a crash fails, not kills)."""
    backends = [b for b in pyops.available_backends("cpu") if b != "torch"]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "bad_calls_loss.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, script, *backends], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "all refused" in out.stdout, out.stdout + out.stderr


# ---- opcheck -----------------------------------------------------------------------------------------
def _primitive_samples(name, device):
    def pairs():
        yield (
            torch.randn(3, 5, dtype=torch.float64, device=device),
            torch.randn(3, 5, dtype=torch.float64, device=device),
        )
        cl = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
        yield cl, torch.randn_like(cl)
        yield torch.randn(0, 4, device=device), torch.randn(0, 4, device=device)
        yield (
            torch.randn(3, 17, dtype=torch.float64, device=device, requires_grad=True),
            torch.randn(3, 17, dtype=torch.float64, device=device),
        )
        yield torch.randn(7, 6, device=device).t(), torch.randn(6, 7, device=device)

    if name == "pointwise_loss_fwd":
        for (x, t), kind, reduction in zip(pairs(), (0, 1, 2, 1, 0), (1, 0, 2, 1, 1)):
            yield (x, t, kind, reduction, 0.8, True)
            yield (x, t, 2, 2 - reduction % 2, 1.5, False)
    elif name == "pointwise_loss_bwd":
        for x, t in pairs():
            yield (torch.randn_like(x), x.detach(), t, 2, 0.5)
    elif name == "cross_entropy_fwd":
        x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
        t = torch.tensor([0, 3, 1, -100, 2], device=device)
        w = torch.rand(4, dtype=torch.float64, device=device)
        yield (x, t, w, -100, 1, 0.1, True)
        yield (x, t, None, -100, 0, 0.0, True)
        yield (x.detach(), t, None, -100, 2, 0.0, False)
        yield (x, x.detach().softmax(1), None, -100, 1, 0.2, True)
        x4 = torch.randn(2, 3, 2, 2, device=device, requires_grad=True)
        yield (x4, torch.randint(0, 3, (2, 2, 2), device=device), None, -100, 0, 0.0, True)
        # (mean over no rows is NaN, which opcheck's comparison cannot take)
        yield (
            torch.randn(0, 3, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            None,
            -100,
            2,
            0.0,
            True,
        )


LOSS_PRIMITIVES = [name for name in PRIMITIVES["native"] if name in LOSS_FAKES]


@pytest.mark.parametrize("device,backend", kernel_device_backends())
@pytest.mark.parametrize("name", LOSS_PRIMITIVES)
def test_opcheck(name, device, backend):
    opcheck_primitive(backend, name, _primitive_samples(name, device))


# ---- modules, convert, compile -------------------------------------------------------------------------
def test_modules_subclass_torch_and_match():
    x = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    w = torch.rand(4)
    pairs = [
        (pnn.L1Loss(reduction="sum"), nn.L1Loss(reduction="sum"), t),
        (pnn.MSELoss(), nn.MSELoss(), t),
        (pnn.HuberLoss(delta=0.5), nn.HuberLoss(delta=0.5), t),
        (
            pnn.CrossEntropyLoss(w, ignore_index=2, label_smoothing=0.1),
            nn.CrossEntropyLoss(w, ignore_index=2, label_smoothing=0.1),
            labels,
        ),
    ]
    for ours, theirs, target in pairs:
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        with pyops.backend("native"):
            y = ours(x, target)
        t64 = target.double() if target.is_floating_point() else target
        assert_close(y, copy.deepcopy(theirs).double()(x.double(), t64), torch.float32)
    rmse = pnn.RMSELoss()
    assert_close(rmse(x, t), torch.sqrt(TF.mse_loss(x.double(), t.double())), torch.float32)
    script = torch.jit.script(pnn.MSELoss())
    assert_close(script(x, t), TF.mse_loss(x.double(), t.double()), torch.float32)


# ---- reductions -----------------------------------------------------------------------------------------
def _loss_calls():
    """(name, pyops function, torch's, arguments) of every loss."""
    x, t, labels = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    return [
        ("l1_loss", PF.l1_loss, TF.l1_loss, (x, t)),
        ("mse_loss", PF.mse_loss, TF.mse_loss, (x, t)),
        ("huber_loss", PF.huber_loss, TF.huber_loss, (x, t)),
        ("rmse_loss", PF.rmse_loss, TF.mse_loss, (x, t)),  # torch has none: its reductions are mse_loss's
        ("cross_entropy", PF.cross_entropy, TF.cross_entropy, (x, labels)),
    ]


# the modules of each loss: pyops' and torch's (mse for rmse)
LOSS_MODULES = {
    "l1_loss": (pnn.L1Loss, nn.L1Loss),
    "mse_loss": (pnn.MSELoss, nn.MSELoss),
    "huber_loss": (pnn.HuberLoss, nn.HuberLoss),
    "rmse_loss": (pnn.RMSELoss, nn.MSELoss),
    "cross_entropy": (pnn.CrossEntropyLoss, nn.CrossEntropyLoss),
}


def _error(fn, *args, **kwargs):
    """The exception fn(*args, **kwargs) raises."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


def test_reduction_enum_is_torchs():
    """The one table of reductions numbers them as torch does (csrc/loss.h's Reduction follows it)."""
    from torch.nn import _reduction

    for name in ("none", "mean", "sum"):
        assert PF._reduction_enum("op", name) == _reduction.get_enum(name)


@pytest.mark.parametrize("reduction", ["avg", "None", "", None, "MEAN"])
def test_unknown_reduction_is_torchs_value_error(reduction):
    """An unknown reduction is torch's ValueError, in torch's words after the op's name, for every loss."""
    for name, ours, theirs, args in _loss_calls():
        expected = _error(theirs, *args, reduction=reduction)
        got = _error(ours, *args, reduction=reduction)
        assert type(expected) is ValueError and type(got) is ValueError, (name, expected, got)
        assert str(got) == f"pyops.{name}: {expected}", name


def test_unknown_reduction_in_modules_eager_and_scripted():
    """A module built with an unknown reduction raises when called, as torch's does (both constructors take
    any string), in eager and under TorchScript, where it once ran as "mean"."""
    for name, _, _, args in _loss_calls():
        ours, theirs = (cls(reduction="avg") for cls in LOSS_MODULES[name])
        expected = _error(theirs, *args)
        got = _error(ours, *args)
        assert type(got) is ValueError and str(got) == f"pyops.{name}: {expected}", name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation
            expected = _error(torch.jit.script(theirs), *args)
            got = _error(torch.jit.script(ours), *args)
        assert type(got) is type(expected), name  # TorchScript's own error class, for torch's module too
        assert f"ValueError: pyops.{name}: avg is not a valid value for reduction" in str(got), (name, got)
        assert "ValueError: avg is not a valid value for reduction" in str(expected)


def test_elementwise_mean_is_mean_with_torchs_warning():
    for _, ours, theirs, args in _loss_calls():
        with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated") as record:
            y = ours(*args, reduction="elementwise_mean")
        assert [w.filename for w in record] == [__file__]  # the warning points at the caller
        with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
            expected = theirs(*args, reduction="elementwise_mean")
        assert torch.equal(y, ours(*args, reduction="mean")) and y.shape == expected.shape


@pytest.mark.parametrize(
    "size_average,reduce", [(None, False), (False, None), (False, True), (True, None), (True, False)]
)
def test_legacy_size_average_and_reduce_as_torch(size_average, reduce):
    """The deprecated pair gives torch's reduction and torch's warning, and overrides `reduction` (an unknown
    one too), in the functions that take it and in the modules (through torch's constructor)."""
    kwargs = {"size_average": size_average, "reduce": reduce, "reduction": "avg"}
    for name, ours, theirs, args in _loss_calls():
        if name not in ("l1_loss", "mse_loss", "cross_entropy"):  # torch's huber_loss has no such pair
            continue
        with warnings.catch_warnings(record=True) as mine:
            warnings.simplefilter("always")
            y = ours(*args, **kwargs)
        with warnings.catch_warnings(record=True) as torchs:
            warnings.simplefilter("always")
            expected = theirs(*args, **kwargs)
        assert [str(w.message) for w in mine] == [str(w.message) for w in torchs], name
        assert_close(y, expected.double(), torch.float32)
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            module = LOSS_MODULES[name][0](size_average=size_average, reduce=reduce, reduction="avg")
        assert_close(module(*args), expected.double(), torch.float32)


def test_convert_maps_losses():
    model = nn.ModuleDict(
        {
            "l1": nn.L1Loss(),
            "mse": nn.MSELoss(reduction="sum"),
            "huber": nn.HuberLoss(delta=2.0),
            "ce": nn.CrossEntropyLoss(torch.rand(3), ignore_index=1, label_smoothing=0.1),
        }
    )
    pyops.convert(model, inplace=True)
    assert type(model["l1"]) is pnn.L1Loss and type(model["mse"]) is pnn.MSELoss
    assert model["mse"].reduction == "sum" and model["huber"].delta == 2.0
    ce = model["ce"]
    assert type(ce) is pnn.CrossEntropyLoss and ce.ignore_index == 1 and ce.label_smoothing == 0.1
    assert ce.weight is not None and ce.weight.shape == (3,)


def test_compile_fullgraph_no_graph_break():
    """torch.compile(fullgraph=True) of a head using the losses: no graph break, same values and grads."""
    torch._dynamo.reset()

    def head(x, t, labels):
        return PF.mse_loss(x, t) + PF.l1_loss(x, t, reduction="sum") + PF.cross_entropy(x, labels, label_smoothing=0.1)

    x = torch.randn(32, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(32, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (32,))
    with pyops.backend("native"):
        compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
        y = compiled(x, t, labels)
        (gx,) = torch.autograd.grad(y, x)
        y_eager = head(x, t, labels)
        (ge,) = torch.autograd.grad(y_eager, x)
    assert_close(y, y_eager.detach(), torch.float64)
    assert_close(gx, ge, torch.float64)


def test_autocast_computes_in_float32():
    """Under autocast the losses compute in float32, as torch's do (float16/bfloat16 inputs upcast)."""
    x = torch.randn(6, 4).bfloat16()
    t = torch.randn(6, 4).bfloat16()
    labels = torch.randint(0, 4, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16), pyops.backend("native"):
        got = [fn(x, t, **kw) for fn, _, kw in POINTWISE.values()] + [PF.cross_entropy(x, labels)]
        ref = [r(x, t, **kw) for _, r, kw in POINTWISE.values()] + [TF.cross_entropy(x, labels)]
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.float32
        assert_close(a, b.double(), torch.float32)


@pytest.mark.parametrize("name", ["mse_loss", "cross_entropy"])
def test_saved_gradient_survives_retain_graph(name):
    """Handing the saved gradient on is safe: a kept graph gives the same gradient again (autograd copies
    what it still holds), and changing .grad in place does not change what backward hands on next."""
    x = torch.randn(64, 10, requires_grad=True)
    t = torch.randn(64, 10) if name == "mse_loss" else torch.randint(0, 10, (64,))
    fn = PF.mse_loss if name == "mse_loss" else PF.cross_entropy
    with pyops.backend("native"):
        y = fn(x, t)
    y.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad.mul_(0)
    y.backward(retain_graph=True)
    assert torch.equal(x.grad, first)
    y.backward()
    assert torch.equal(x.grad, 2 * first)

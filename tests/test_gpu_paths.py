"""The GPU paths the other tests' small shapes miss, on the native CUDA and Triton backends, each against
the float64 oracle computed on the CPU (torch's own result in the input's dtype, also on the CPU, as the
rounding allowance): channels_last batch norm with more than 32 channels; a split reduction (more than
16,384 positions a channel) in channels_last; the SyncBatchNorm backward (batch_norm_bwd_reduce, then
batch_norm_bwd_elemt with the combined mean_dz and mean_dz_xhat given); Triton conv with more than 32
channels a group in and out; loss reductions of more than 262,144 elements; out-of-range class targets
(the documented NaN rows, no device-side assert); tensors past 2^31 elements. And one bitwise
run-to-run determinism test per reduction (batch norm statistics and backward sums, conv weight
gradient, the loss reductions, cross_entropy). All marked cuda: skipped without a GPU."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

import pyops
import pyops.functional as PF
from pyops.ops import PRIMITIVES
from pyops.ops.batch_norm import batch_norm_reference
from pyops.ops.loss import rmse_reference
from pyops.testing.oracle import compare, failed

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
BACKENDS = ["native", "triton"]


def _randn(*shape, scale=3.0, generator=None, dtype=torch.float32):
    return (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(dtype)


def _leaves(tensors, device, dtype):
    """Copies of (tensor, requires_grad) pairs on `device`, floating ones in `dtype`, layouts kept."""
    out = []
    for t, grad in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).clone()
        out.append(c.requires_grad_(grad))
    return out


def _fwd_bwd(fn, inputs, g):
    """fn(*inputs), the gradients of the inputs that require them for output gradient g, the inputs."""
    y = fn(*inputs)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = list(torch.autograd.grad(y, wanted, g.to(device=y.device, dtype=y.dtype))) if wanted else []
    return y, grads, inputs


def _versus_oracle(fn, reference, tensors, g, dtype, backend, names, reduced):
    """fn on the GPU under `backend` against reference in float64 on the CPU: the output and each
    gradient (names[1:], reduced: the number of terms each sums, for its atol). Returns the GPU
    inputs (in-place results) and the CPU float64 ones."""
    with pyops.backend(backend):
        y, grads, ins = _fwd_bwd(fn, _leaves(tensors, DEVICE, dtype), g)
    y64, grads64, ins64 = _fwd_bwd(reference, _leaves(tensors, "cpu", torch.float64), g.double())
    yt, gradst, _ = _fwd_bwd(reference, _leaves(tensors, "cpu", dtype), g.to(dtype))
    assert len(grads) == len(grads64) == len(names) - 1
    bad = []
    for name, a, e, t, red in zip(names, [y, *grads], [y64, *grads64], [yt, *gradst], reduced):
        result = compare(a.cpu(), e, a.dtype, t, what=name, reduced=red)
        if result.ok and a.dim() == 4:
            cl = torch.channels_last
            if a.is_contiguous(memory_format=cl) != t.is_contiguous(memory_format=cl) and a.shape[1] > 1:
                result = failed(name, f"layout {a.stride()} differs from torch's {t.stride()}")
        if not result.ok:
            bad.append(result.message)
    assert not bad, f"{backend}: " + "; ".join(bad)
    return ins, ins64


# ---- batch norm: channels_last with > 32 channels, split reductions ---------------------------------
BN_FORMS = {
    "relu_residual": ({"activation": "relu"}, True),
    "leaky": ({"activation": "leaky_relu", "negative_slope": 0.2}, False),
    "plain": ({}, False),
}
BN_SHAPES = {
    "c80": (4, 80, 9, 9),  # more than 32 channels: several channel blocks
    "split": (8, 40, 48, 48),  # 18,432 positions a channel: more than one part
    "split4": (16, 72, 64, 64),  # 65,536 positions, 72 channels
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", BN_FORMS)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_batch_norm_wide_and_split(backend, form, shape, layout):
    """Training forward and backward (output and its layout, running statistics, the gradients of input,
    weight, bias and residual) of batch norms wider than one channel block and longer than one part."""
    kwargs, residual = BN_FORMS[form]
    shape = BN_SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]
    x = (_randn(*shape, generator=gen) + 1.5).contiguous(memory_format=fmt)
    r = _randn(*shape, generator=gen).contiguous(memory_format=fmt) if residual else None
    g = _randn(*shape, scale=1.0, generator=gen).contiguous(memory_format=fmt)
    w = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).float()
    b = _randn(c, scale=1.0, generator=gen)
    rm, rv = _randn(c, scale=1.0, generator=gen), (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).float()

    def make(f):
        return lambda x, w, b, r, rm, rv: f(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r, **kwargs)

    m = x.numel() // c
    names = ["output", "grad input", "grad weight", "grad bias"] + (["grad residual"] if residual else [])
    ins, ins64 = _versus_oracle(
        make(PF.batch_norm),
        make(batch_norm_reference),
        [(x, True), (w, True), (b, True), (r, True), (rm, False), (rv, False)],
        g,
        torch.float32,
        backend,
        names,
        [1, 1, m, m, 1],
    )
    for name, a, e in (("running_mean", ins[4], ins64[4]), ("running_var", ins[5], ins64[5])):
        result = compare(a.cpu(), e, torch.float32, what=name, reduced=m)
        assert result.ok, result.message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_batch_norm_backward_with_given_means(backend, layout):
    """SyncBatchNorm's backward: batch_norm_bwd_reduce gives this rank's sum(dz) and sum(dz xhat), and
    batch_norm_bwd_elemt takes the means the ranks combined (here arbitrary: another rank's share moves
    them), dx = w invstd (dz - mean_dz - xhat mean_dz_xhat), with dz = g act'(y) read from the output."""
    gen = torch.Generator().manual_seed(1)
    shape, slope, eps = (8, 48, 48, 48), 0.1, 1e-5  # 18,432 positions, 48 channels
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]
    dims, bshape = (0, 2, 3), (1, c, 1, 1)
    x = (_randn(*shape, generator=gen) + 2.0).contiguous(memory_format=fmt)
    g = _randn(*shape, scale=1.0, generator=gen).contiguous(memory_format=fmt)
    w = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).float()
    b = _randn(c, scale=1.0, generator=gen)
    x64 = x.double()
    mean = x64.mean(dims).float()
    invstd = (x64.var(dims, unbiased=False) + eps).rsqrt().float()
    xhat64 = (x64 - mean.double().view(bshape)) * invstd.double().view(bshape)
    y = TF.leaky_relu(xhat64 * w.double().view(bshape) + b.double().view(bshape), slope).float()
    y = y.contiguous(memory_format=fmt)
    mean_dz, mean_dz_xhat = _randn(c, scale=0.5, generator=gen), _randn(c, scale=0.5, generator=gen)

    P = PRIMITIVES[backend]
    on = [t.to(DEVICE) for t in (g, x, y, mean, invstd, w, b, mean_dz, mean_dz_xhat)]
    gd, xd, yd, meand, invstdd, wd, bd, mdz, mdzx = on
    sum_dz, sum_dz_xhat, _ = P["batch_norm_bwd_reduce"](
        gd, xd, yd, None, meand, invstdd, wd, bd, "leaky_relu", slope, False
    )
    dx = P["batch_norm_bwd_elemt"](gd, xd, yd, None, meand, invstdd, wd, bd, mdz, mdzx, "leaky_relu", slope)

    def oracle(dtype):
        gg, xh = g.to(dtype), xhat64.to(dtype)
        dz = gg * torch.where(y.to(dtype) > 0, 1.0, slope).to(dtype)
        scale = (w.to(dtype) * invstd.to(dtype)).view(bshape)
        dxo = scale * (dz - mean_dz.to(dtype).view(bshape) - xh * mean_dz_xhat.to(dtype).view(bshape))
        return dz.sum(dims), (dz * xh).sum(dims), dxo

    want64, want32 = oracle(torch.float64), oracle(torch.float32)
    m = x.numel() // c
    for name, a, e, t, red in zip(
        ("sum_dz", "sum_dz_xhat", "dx"), (sum_dz, sum_dz_xhat, dx), want64, want32, (m, m, 1)
    ):
        result = compare(a.cpu(), e, torch.float32, t, what=name, reduced=red)
        assert result.ok, f"{backend}: {result.message}"
    assert dx.stride() == x.stride(), f"dx strides {dx.stride()} are not the input's {x.stride()}"


# ---- conv: more than 32 channels a group ----------------------------------------------------------
CONV_CASES = {
    # (input shape, out channels, groups, stride): channels a group in / out
    "g2_40in_36out": ((2, 80, 12, 12), 72, 2, 1),
    "dense_48in_40out": ((2, 48, 10, 10), 40, 1, 1),
    "dense_64in_96out_stride2": ((3, 64, 11, 9), 96, 1, 2),
    "g4_9in_40out": ((2, 36, 8, 8), 160, 4, 1),  # few in, many out
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_wide_groups(backend, case):
    """3x3 convolution, padding 1, with more than 32 channels a group in or out (several tiles of the
    Triton kernels' channel blocks): output, and the input, weight and bias gradients."""
    shape, k, groups, stride = CONV_CASES[case]
    gen = torch.Generator().manual_seed(2)
    cg = shape[1] // groups
    x = _randn(*shape, scale=1.0, generator=gen)
    w = _randn(k, cg, 3, 3, scale=1.0 / math.sqrt(cg * 9), generator=gen)
    b = _randn(k, scale=1.0, generator=gen)
    oh = (shape[2] + 2 - 3) // stride + 1
    ow = (shape[3] + 2 - 3) // stride + 1
    g = _randn(shape[0], k, oh, ow, scale=1.0, generator=gen)

    def make(f):
        return lambda x, w, b: f(x, w, b, stride=stride, padding=1, groups=groups)

    spatial = shape[0] * oh * ow
    _versus_oracle(
        make(PF.conv2d),
        make(TF.conv2d),
        [(x, True), (w, True), (b, True)],
        g,
        torch.float32,
        backend,
        ["output", "grad input", "grad weight", "grad bias"],
        [cg * 9, k // groups * 9, spatial, spatial],
    )


# ---- losses: reductions past 262,144 elements -----------------------------------------------------
LOSS_SHAPE = (1013, 777)  # 787,101 elements: three times 262,144 and then some, no multiple of a block
REGRESSION = {
    "l1_loss": (PF.l1_loss, TF.l1_loss, {}),
    "mse_loss": (PF.mse_loss, TF.mse_loss, {}),
    "huber_loss": (PF.huber_loss, TF.huber_loss, {"delta": 0.8}),
    "rmse_loss": (PF.rmse_loss, rmse_reference, {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("op", REGRESSION)
def test_loss_reduction_past_262144(backend, reduction, op):
    fn, ref, kwargs = REGRESSION[op]
    gen = torch.Generator().manual_seed(3)
    x, t = _randn(*LOSS_SHAPE, generator=gen), _randn(*LOSS_SHAPE, generator=gen)
    n = x.numel()
    assert n > 262144

    def make(f):
        return lambda x, t: f(x, t, reduction=reduction, **kwargs)

    _versus_oracle(
        make(fn),
        make(ref),
        [(x, True), (t, True)],
        torch.tensor(1.7, dtype=torch.float64),
        torch.float32,
        backend,
        ["loss", "grad input", "grad target"],
        [n, 1, 1],
    )


CE_CASES = {
    # (rows, classes, weighted, ignore_index, label_smoothing)
    "rows_300001_c10": (300001, 10, False, None, 0.0),
    "rows_300001_c10_weighted_ignored": (300001, 10, True, 3, 0.1),
    "rows_300_c1000": (300, 1000, True, None, 0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CE_CASES)
def test_cross_entropy_large(backend, case):
    """cross_entropy's mean over more than 262,144 rows of few classes (several rows a block or program),
    class weights and an ignored class included."""
    rows, classes, weighted, ignore, smoothing = CE_CASES[case]
    gen = torch.Generator().manual_seed(4)
    x = _randn(rows, classes, generator=gen)
    t = torch.randint(0, classes, (rows,), generator=gen)
    w = (torch.rand(classes, dtype=torch.float64, generator=gen) + 0.5).float() if weighted else None
    kwargs = {"label_smoothing": smoothing} | ({"ignore_index": ignore} if ignore is not None else {})

    def make(f):
        return lambda x, t, w: f(x, t, w, reduction="mean", **kwargs)

    _versus_oracle(
        make(PF.cross_entropy),
        make(TF.cross_entropy),
        [(x, True), (t, False), (w, False)],
        torch.tensor(0.9, dtype=torch.float64),
        torch.float32,
        backend,
        ["loss", "grad input"],
        [rows * classes, classes],
    )


# ---- out-of-range class targets: NaN rows, never a device-side assert -----------------------------
_BAD_TARGETS_SCRIPT = r"""
import sys
import torch
import pyops
import pyops.functional as F

backend, path = sys.argv[1], sys.argv[2]
data = torch.load(path)
x, t, w, g = (data[k].cuda() if data[k] is not None else None for k in ("x", "t", "w", "g"))
out = {}
with pyops.backend(backend):
    for reduction in ("none", "mean"):
        xr = x.clone().requires_grad_()
        loss = F.cross_entropy(xr, t, w, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, xr, g if reduction == "none" else torch.ones_like(loss))
        torch.cuda.synchronize()
        out[reduction] = (loss.detach().cpu(), grad.cpu())
# the process is still sound: a device-side assert would fail every later CUDA call
assert torch.ones(3, device="cuda").sum().item() == 3.0
torch.save(out, path + ".out")
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_cross_entropy_out_of_range_targets(backend, weighted, tmp_path):
    """Targets past the class count or negative (not the ignore_index) make their rows' loss and
    gradient NaN on the GPU (raising would need a host synchronisation), and a mean NaN: no device-side
    assert, nothing read out of bounds, the other rows exact. In a subprocess, as an assert poisons
    the process's CUDA context."""
    gen = torch.Generator().manual_seed(5)
    rows, classes = 12, 7
    x = _randn(rows, classes, generator=gen)
    t = torch.randint(0, classes, (rows,), generator=gen)
    bad = torch.tensor([1, 4, 8, 11])
    t[bad] = torch.tensor([classes, -1, 10**9, -(10**9)])
    t[6] = -100  # ignored, not out of range
    w = (torch.rand(classes, dtype=torch.float64, generator=gen) + 0.5).float() if weighted else None
    g = _randn(rows, scale=1.0, generator=gen)
    path = tmp_path / "inputs.pt"
    torch.save({"x": x, "t": t, "w": w, "g": g}, path)
    proc = subprocess.run(
        [sys.executable, "-c", _BAD_TARGETS_SCRIPT, backend, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    out = torch.load(str(path) + ".out")
    good = torch.ones(rows, dtype=torch.bool)
    good[bad] = False

    loss, grad = out["none"]
    assert loss[bad].isnan().all(), f"out-of-range rows' loss: {loss[bad]}"
    assert grad[bad].isnan().all(), "out-of-range rows' gradient is not NaN"
    # the other rows as torch computes them (the bad rows' targets made valid, then left out)
    x64 = x.double().requires_grad_()
    fixed = torch.where(good, t, 0)
    want = TF.cross_entropy(x64, fixed, None if w is None else w.double(), reduction="none")
    (want_grad,) = torch.autograd.grad(want, x64, g.double())
    for name, a, e in (("loss", loss[good], want[good].detach()), ("grad", grad[good], want_grad[good])):
        result = compare(a, e, torch.float32, what=name, reduced=classes)
        assert result.ok, f"{backend}: {result.message}"
    assert loss[6] == 0 and not grad[6].any(), "the ignored row"

    loss, grad = out["mean"]
    assert loss.isnan(), f"mean over out-of-range targets: {loss}"
    assert grad[bad].isnan().all(), "out-of-range rows' gradient under mean"


# ---- past 2^31 elements -----------------------------------------------------------------------------
BIG = 2**31 + 4099


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


def _slices(n):
    """Index ranges at the start, across 2^31 and at the end."""
    return [(0, 4096), (2**31 - 2048, 2**31 + 2048), (n - 4096, n)]


# under pytest-xdist (bench/gpu_check.sh) one worker runs these in turn: each holds ~22 GB of the GPU
ONE_WORKER = [pytest.mark.xdist_group("past_2_31")] if importlib.util.find_spec("xdist") else []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [pytest.param(op, marks=ONE_WORKER) for op in ("relu", "sigmoid")])
def test_past_2_31_elements(backend, op):
    """A float16 tensor of 2^31 + 4099 elements (4 GB) forward and backward: the masked path (relu)
    and the unary/binary path (sigmoid). Exact where the op is exact, within the float16 tolerance
    elsewhere; the regions around 2^31 and at the end against the float64 oracle on the CPU."""
    if _free_bytes() < 5 * BIG * 2 + (1 << 30):
        pytest.skip(f"needs ~{5 * BIG * 2 / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    x = torch.randn(BIG, device=DEVICE, dtype=torch.float16, generator=gen).requires_grad_()
    g = torch.randn(BIG, device=DEVICE, dtype=torch.float16, generator=gen)
    fn, ref = {"relu": (PF.relu, torch.relu), "sigmoid": (PF.sigmoid, torch.sigmoid)}[op]
    with pyops.backend(backend):
        y = fn(x)
        (gi,) = torch.autograd.grad(y, x, g)
    y, x = y.detach(), x.detach()
    for lo, hi in _slices(BIG):
        # the output against the oracle (torch's own float16 result the rounding allowance); the gradient
        # against the oracle from the output it saved (sigmoid's reads the rounded output, as torch's does)
        x64, g64 = x[lo:hi].cpu().double(), g[lo:hi].cpu().double()
        y64, y16, saved = ref(x64), ref(x[lo:hi].cpu()), y[lo:hi].cpu().double()
        grad64 = g64 * (x64 > 0) if op == "relu" else g64 * saved * (1 - saved)
        for name, a, e, t in (("output", y[lo:hi], y64, y16), ("grad", gi[lo:hi], grad64, None)):
            result = compare(a.cpu(), e, torch.float16, t, what=f"{name} [{lo}:{hi}]")
            assert result.ok, f"{backend}: {result.message}"
    chunk = 1 << 28
    for lo in range(0, BIG, chunk):
        xs, ys, gis, gs = (t[lo : lo + chunk] for t in (x, y, gi, g))
        if op == "relu":  # exact: the float64 oracle rounded is the float16 result
            assert torch.equal(ys, xs.clamp_min(0)), f"{backend}: relu output differs in [{lo}:{lo + chunk}]"
            assert torch.equal(gis, torch.where(xs > 0, gs, 0)), f"{backend}: relu gradient differs from {lo}"
        else:
            s = torch.sigmoid(xs.float())
            assert ((ys.float() - s).abs() <= 1e-4 + 1e-3 * s.abs()).all(), f"{backend}: sigmoid output from {lo}"
            yf = ys.float()  # the saved output the gradient reads
            want = gs.float() * yf * (1 - yf)
            assert ((gis.float() - want).abs() <= 1e-4 + 2e-3 * want.abs()).all(), f"{backend}: sigmoid grad from {lo}"
    del x, y, g, gi
    torch.cuda.empty_cache()


# ---- bitwise run-to-run determinism of every reduction ------------------------------------------------
def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same_bits(first, second, what):
    for i, (a, b) in enumerate(zip(first, second)):
        if a is None:
            continue
        assert torch.equal(_bits(a), _bits(b)), f"{what}: result {i} differs between two runs"


def _twice(run, what):
    first = run()
    second = run()
    torch.cuda.synchronize()
    _same_bits(first, second, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (256, 256, 14, 14)], ids=str)
def test_batch_norm_is_deterministic(backend, layout, shape):
    """Statistics, output and the backward sums (weight and bias gradients, and through them dx)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt) + 3
    g = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt)
    w = torch.rand(shape[1], device=DEVICE) + 0.5
    b = torch.randn(shape[1], device=DEVICE)

    def run():
        with pyops.backend(backend):
            mean, var = PRIMITIVES[backend]["batch_norm_stats"](x)
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y = PF.batch_norm(xs, None, None, ws, bs, True, activation="relu")
            return [mean, var, y, *torch.autograd.grad(y, (xs, ws, bs), g)]

    _twice(run, f"batch_norm {shape} {layout} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,k,groups",
    [((16, 64, 56, 56), 64, 64), ((16, 128, 28, 28), 128, 32), ((8, 64, 56, 56), 64, 1)],
    ids=["depthwise", "grouped", "dense"],
)
def test_conv_weight_gradient_is_deterministic(backend, shape, k, groups):
    x = torch.randn(shape, device=DEVICE)
    w = torch.randn(k, shape[1] // groups, 3, 3, device=DEVICE) / 3
    b = torch.randn(k, device=DEVICE)
    g = torch.randn(shape[0], k, shape[2], shape[3], device=DEVICE)

    def run():
        with pyops.backend(backend):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y = PF.conv2d(xs, ws, bs, padding=1, groups=groups)
            return [y, *torch.autograd.grad(y, (xs, ws, bs), g)]

    _twice(run, f"conv2d {shape} groups={groups} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", REGRESSION)
def test_loss_reduction_is_deterministic(backend, op):
    fn, _, kwargs = REGRESSION[op]
    x = torch.randn(4096, 1024, device=DEVICE)
    t = torch.randn(4096, 1024, device=DEVICE)

    def run():
        with pyops.backend(backend):
            out = []
            for reduction in ("mean", "sum"):
                xs = x.clone().requires_grad_()
                loss = fn(xs, t, reduction=reduction, **kwargs)
                out += [loss, *torch.autograd.grad(loss, xs)]
            return out

    _twice(run, f"{op} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4096, 1000), (256, 32000), (300001, 10)], ids=str)
def test_cross_entropy_is_deterministic(backend, shape):
    x = torch.randn(shape, device=DEVICE)
    t = torch.randint(0, shape[1], (shape[0],), device=DEVICE)
    w = torch.rand(shape[1], device=DEVICE) + 0.5

    def run():
        with pyops.backend(backend):
            out = []
            for weight in (None, w):
                xs = x.clone().requires_grad_()
                loss = PF.cross_entropy(xs, t, weight, label_smoothing=0.1)
                out += [loss, *torch.autograd.grad(loss, xs)]
            return out

    _twice(run, f"cross_entropy {shape} on {backend}")

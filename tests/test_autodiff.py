"""Every op in every mode of automatic differentiation its torch counterpart supports, float64, on each
backend that runs on the CPU (Triton under its interpreter, on the smallest shapes): gradcheck with
forward-mode AD, gradgradcheck (reverse over reverse, forward over reverse), and torch.func's grad, vjp,
jvp, jacrev, jacfwd and hessian (also as jacrev of jacrev), and grad of jvp (reverse over forward),
against torch's function."""

import dataclasses
import math
import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as TF
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp

import pyops
import pyops.functional as PF
from oracle import assert_close

F64 = torch.float64
BACKENDS = pyops.available_backends("cpu")


def away_from(x, kinks, margin=0.15):
    """x moved at least `margin` away from each kink (finite differences straddle no kink)."""
    for k in kinks:
        near = (x - k).abs() < margin
        x = torch.where(near, k + margin * torch.where(x >= k, 1.0, -1.0).to(x), x)
    return x


@dataclasses.dataclass
class Case:
    """fn and ref (torch's function) of the differentiable tensors args() draws (small enough for the
    Triton interpreter)."""

    fn: Callable
    ref: Callable
    args: Callable


def randn(*shape):
    return torch.randn(*shape, dtype=F64)


def case_x(fn, ref, shape=(2, 3), kinks=()):
    return Case(fn, ref, lambda: (away_from(randn(*shape), kinks),))


def _cases():
    cases = {
        "relu": case_x(PF.relu, TF.relu, kinks=(0,)),
        "relu_": case_x(lambda x: PF.relu(x.clone(), inplace=True), TF.relu, kinks=(0,)),
        "leaky_relu": case_x(lambda x: PF.leaky_relu(x, 0.2), lambda x: TF.leaky_relu(x, 0.2), kinks=(0,)),
        "leaky_relu_": case_x(
            lambda x: PF.leaky_relu(x.clone(), 0.2, inplace=True), lambda x: TF.leaky_relu(x, 0.2), kinks=(0,)
        ),
        "elu": case_x(lambda x: PF.elu(x, 0.7), lambda x: TF.elu(x, 0.7), kinks=(0,)),
        "elu_": case_x(lambda x: PF.elu(x.clone(), 0.7, inplace=True), lambda x: TF.elu(x, 0.7), kinks=(0,)),
        "sigmoid": case_x(PF.sigmoid, torch.sigmoid),
        "tanh": case_x(PF.tanh, torch.tanh),
        "maxout": case_x(lambda x: PF.maxout(x, 2, 1), lambda x: x.unflatten(1, (2, 2)).max(2).values, shape=(2, 4)),
    }
    # batch_norm: (training, activation, weight and bias, residual)
    for training, act, affine, res in [
        (True, None, True, False),
        (True, "relu", True, True),
        (True, "elu", False, True),
        (False, "leaky_relu", True, True),
        (False, "elu", True, False),
        (True, "leaky_relu", False, False),
    ]:
        cases[f"batch_norm-{'train' if training else 'eval'}-{act}-{'wb' if affine else 'nowb'}-{res}"] = (
            _batch_norm_case(training, act, affine, res)
        )
    for bias, groups, act in [(True, 1, None), (True, 2, "relu"), (False, 2, "leaky_relu"), (True, 1, "elu")]:
        cases[f"conv2d-{bias}-{groups}-{act}"] = _conv_case(bias, groups, act)
    cases["conv2d-tiny"] = _conv_case(True, 2, "elu", size=2)
    for r in ("mean", "sum", "none"):
        for name, fn, ref in [
            ("l1_loss", PF.l1_loss, TF.l1_loss),
            ("mse_loss", PF.mse_loss, TF.mse_loss),
            (
                "huber_loss",
                lambda *a, **k: PF.huber_loss(*a, delta=0.7, **k),
                lambda *a, **k: TF.huber_loss(*a, delta=0.7, **k),
            ),
            ("rmse_loss", PF.rmse_loss, _rmse_reference),
        ]:
            cases[f"{name}-{r}"] = _pointwise_case(fn, ref, r)
        for kw in ({}, {"weight": True, "ignore_index": 1, "label_smoothing": 0.2}):
            cases[f"cross_entropy-index-{r}-{bool(kw)}"] = _cross_entropy_case(r, kw, probs=False)
            kw = {k: v for k, v in kw.items() if k != "ignore_index"}
            cases[f"cross_entropy-probs-{r}-{bool(kw)}"] = _cross_entropy_case(r, kw, probs=True)
    # spatial (N, C, d) and unbatched (C,) logits
    full = {"weight": True, "ignore_index": 0, "label_smoothing": 0.3}
    cases["cross_entropy-spatial-index-mean"] = _cross_entropy_case("mean", full, False, shape=(2, 4, 3))
    cases["cross_entropy-spatial-probs-sum"] = _cross_entropy_case("sum", {"label_smoothing": 0.2}, True, (2, 4, 3))
    cases["cross_entropy-unbatched-index-mean"] = _cross_entropy_case("mean", {**full, "ignore_index": 3}, False, (5,))
    return cases


def _rmse_reference(x, t, reduction="mean"):
    if reduction == "none":
        return (x - t).abs()
    return TF.mse_loss(x, t, reduction=reduction).sqrt()


def _batch_norm_case(training, act, affine, res):
    kw = {"negative_slope": 0.1, "alpha": 0.8}
    c = 2
    rm, rv = torch.randn(c, dtype=F64), torch.rand(c, dtype=F64) + 0.5

    def fn(x, *p):
        w, b = p[:2] if affine else (None, None)
        r = p[-1] if res else None
        return PF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation=act, residual=r, **kw)

    def ref(x, *p):
        # torch's batch norm, as a composite: F.batch_norm's own jacrev(jacrev(f)) is wrong in training
        # (torch 2.14), where finite differences agree with this and with its jacrev(grad(f))
        w, b = p[:2] if affine else (None, None)
        if training:
            var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
        else:
            mean, var = rm.view(1, c, 1), rv.view(1, c, 1)
        y = (x - mean) / (var + 1e-5).sqrt()
        if affine:
            y = y * w.view(1, c, 1) + b.view(1, c, 1)
        if res:
            y = y + p[-1]
        return {None: y, "relu": TF.relu(y), "leaky_relu": TF.leaky_relu(y, 0.1), "elu": TF.elu(y, 0.8)}[act]

    def args():
        x = randn(3, c, 2)
        p = (torch.rand(c, dtype=F64) + 0.5, randn(c)) if affine else ()
        return (x,) + p + ((randn(3, c, 2),) if res else ())

    return Case(fn, ref, args)


def _conv_case(bias, groups, act, size=3):
    kw = {"padding": 1, "groups": groups}
    ref_act = {None: lambda y: y, "relu": TF.relu, "leaky_relu": TF.leaky_relu, "elu": TF.elu}[act]

    def args():
        x = randn(1, 2, size, size)
        w = randn(2, 2 // groups, 2, 2)
        return (x, w) + ((randn(2),) if bias else ())

    return Case(
        lambda x, w, *b: PF.conv2d(x, w, *b, activation=act, **kw),
        lambda x, w, *b: ref_act(TF.conv2d(x, w, *b, **kw)),
        args,
    )


def _pointwise_case(fn, ref, reduction):
    def args():
        x = randn(2, 3)
        # errors away from l1's kink at 0 and huber's at +-0.7
        d = torch.tensor([0.3, -1.2, 0.45, 1.5, -0.25, -0.9], dtype=F64).view(2, 3)
        return x, x - d

    return Case(lambda x, t: fn(x, t, reduction=reduction), lambda x, t: ref(x, t, reduction=reduction), args)


def _cross_entropy_case(reduction, kw, probs, shape=(4, 3)):
    """Logits of `shape` (classes at dim 1, or dim 0 of a 1-d input), class-index or probability targets."""
    classes = shape[1] if len(shape) > 1 else shape[0]
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    labels = torch.arange(math.prod(tshape)).remainder(classes).view(tshape)
    if "ignore_index" in kw and labels.dim():
        labels.view(-1)[-1] = kw["ignore_index"]  # a row ignored at least
    weight = torch.rand(classes, dtype=F64) + 0.5
    target = torch.softmax(torch.randn(shape, dtype=F64), 1 if len(shape) > 1 else 0) if probs else labels
    kw = {**kw, "weight": weight} if kw.get("weight") else kw

    def args():
        return (randn(*shape),)

    return Case(
        lambda x: PF.cross_entropy(x, target, reduction=reduction, **kw),
        lambda x: TF.cross_entropy(x, target, reduction=reduction, **kw),
        args,
    )


CASES = _cases()

# The Triton interpreter runs a kernel launch in milliseconds, not microseconds: it takes a few cases of each
# family, gradcheck's fast mode (one random direction) and the transforms that need no Jacobian.
TRITON_CASES = [
    "relu",
    "leaky_relu_",
    "elu_",
    "sigmoid",
    "tanh",
    "maxout",
    "batch_norm-train-relu-wb-True",
    "batch_norm-eval-leaky_relu-wb-True",
    "conv2d-tiny",
    "l1_loss-mean",
    "mse_loss-sum",
    "huber_loss-none",
    "rmse_loss-mean",
    "cross_entropy-index-mean-True",
    "cross_entropy-probs-none-True",
]
TRANSFORMS = ["jvp", "vjp", "grad", "jacrev", "jacfwd", "hessian", "jacrev_jacrev", "grad_of_jvp"]
CHEAP = ["jvp", "vjp", "grad"]

# What torch itself cannot do (the torch backend is torch's own functions), torch 2.14: forward over reverse
# of huber_loss (huber_loss_backward has no forward derivative in tools/autograd/derivatives.yaml: "Trying to
# use forward AD with huber_loss_backward that does not support it") and of mse_loss with a mean (it raises
# "ZeroTensors are immutable"), so of rmse_loss's mean too.
TORCH_FWD_OVER_REV = {"huber_loss-mean", "huber_loss-sum", "huber_loss-none", "mse_loss-mean", "rmse_loss-mean"}


def _params(cheap_on_torch=False):
    for name in CASES:
        for backend in BACKENDS:
            if backend == "triton" and name not in TRITON_CASES:
                continue
            marks = ()
            if backend == "torch" and name in TORCH_FWD_OVER_REV and not cheap_on_torch:
                marks = pytest.mark.xfail(raises=(RuntimeError, NotImplementedError), strict=True, reason="torch")
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


def _flat(t):
    return torch.cat([u.reshape(-1) for u in t]) if isinstance(t, (tuple, list)) else t


def _close(got, expected, what):
    got, expected = _flat(got), _flat(expected)
    assert_close(got, expected, F64, what=what, reduced=max(expected.numel(), 1))


@pytest.mark.parametrize("name,backend", _params())
def test_gradcheck_forward_and_double_backward(name, backend):
    """Reverse mode, forward mode, reverse over reverse and forward over reverse against finite
    differences."""
    case = CASES[name]
    args = tuple(a.requires_grad_() for a in case.args())
    fast = backend != "native"  # one random direction: Triton is interpreted, torch's own are torch's
    with pyops.backend(backend):
        assert torch.autograd.gradcheck(case.fn, args, check_forward_ad=True, fast_mode=fast)
        assert torch.autograd.gradgradcheck(case.fn, args, check_fwd_over_rev=True, fast_mode=fast)


def _transform(kind, f, args):
    """torch.func's `kind` of f at args: gradients, Jacobians and tangents for every argument, Hessians for
    the first."""
    n = len(args)
    tangents = tuple(torch.linspace(-1, 1, a.numel(), dtype=F64).view(a.shape) for a in args)
    if kind == "jvp":
        return jvp(f, args, tangents)
    if kind == "grad_of_jvp":  # reverse over forward
        return grad(lambda *a: (jvp(f, a, tangents)[1] ** 2).sum(), argnums=tuple(range(n)))(*args)
    out, pullback = vjp(f, *args)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=F64).view(out.shape)
    if kind == "vjp":
        return (out,) + pullback(cotangent)

    def scalar(*a):
        return (f(*a) * cotangent).sum() + (f(*a) ** 2).sum()

    if kind == "grad":
        return grad(scalar, argnums=tuple(range(n)))(*args)
    if kind == "jacrev":
        return jacrev(f, argnums=tuple(range(n)))(*args)
    if kind == "jacfwd":
        return jacfwd(f, argnums=tuple(range(n)))(*args)
    if kind == "hessian":
        return hessian(scalar)(*args)
    return jacrev(jacrev(scalar))(*args)


@pytest.mark.parametrize("name,backend", _params(cheap_on_torch=True))
def test_torch_func_transforms(name, backend):
    """torch.func over the op against torch.func over torch's function (the torch backend, torch's own
    functions, with the transforms that need no Jacobian)."""
    case = CASES[name]
    args = case.args()
    for kind in TRANSFORMS if backend == "native" else CHEAP:
        expected = _transform("hessian" if kind == "jacrev_jacrev" else kind, case.ref, args)
        with pyops.backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's per-sample loop over a primitive warns of its speed
            got = _transform(kind, case.fn, args)
        _close(got, expected, f"{name} {kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_elu_inplace_negative_alpha(backend):
    """In-place elu with a negative alpha: its output does not determine its input, so backward is refused,
    as torch's; forward mode takes the tangent from the input before it is overwritten."""
    x = away_from(randn(2, 3), (0,)).requires_grad_()
    with pyops.backend(backend):
        y = PF.elu(x.clone(), -0.5, inplace=True)
        with pytest.raises(RuntimeError, match="negative"):
            y.sum().backward()
        if backend == "torch":  # torch's elu_ takes its tangent from the output too, and refuses
            with pytest.raises(RuntimeError, match="negative slope"):
                jvp(lambda a: PF.elu(a.clone(), -0.5, inplace=True), (x.detach(),), (x.detach(),))
            return
        assert torch.autograd.gradcheck(
            lambda a: PF.elu(a.clone(), -0.5, inplace=True), (x,), check_forward_ad=True, check_backward_ad=False
        )


def test_forward_ad_dual_tensors_inplace_and_views():
    """torch.autograd.forward_ad: an in-place op writes the new tangent into the input's own (a view of the
    base's), as torch's in-place ops do."""
    import torch.autograd.forward_ad as fwAD

    x, v = randn(4, 3), randn(4, 3)
    for backend in BACKENDS:
        for op, ref in [
            (lambda t: PF.relu(t, inplace=True), torch.relu_),
            (lambda t: PF.elu(t, 0.6, inplace=True), lambda t: TF.elu(t, 0.6, inplace=True)),
        ]:
            with fwAD.dual_level():
                base = fwAD.make_dual(x.clone(), v.clone())
                with pyops.backend(backend):
                    op(base[1:])
                base_r = fwAD.make_dual(x.clone(), v.clone())
                ref(base_r[1:])
                got, expected = fwAD.unpack_dual(base), fwAD.unpack_dual(base_r)
                _close(got.primal, expected.primal, "primal")
                _close(got.tangent, expected.tangent, "tangent of the base")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_running_statistics_under_transforms(backend):
    """Training with running statistics under torch.func: the running averages are updated as torch's
    (below the transforms: functorch refuses a transform's in-place write to a captured tensor)."""
    x = randn(4, 3, 2)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    rm_t, rv_t = rm.clone(), rv.clone()
    with pyops.backend(backend):
        g = grad(lambda a: PF.batch_norm(a, rm, rv, training=True).pow(3).sum())(x)
        t = jvp(lambda a: PF.batch_norm(a, rm, rv, training=True), (x,), (x.cos(),))[1]
    g_t = grad(lambda a: TF.batch_norm(a, rm_t, rv_t, training=True).pow(3).sum())(x)
    t_t = jvp(lambda a: TF.batch_norm(a, rm_t, rv_t, training=True), (x,), (x.cos(),))[1]
    _close(g, g_t, "grad")
    _close(t, t_t, "jvp")
    _close(rm, rm_t, "running_mean")
    _close(rv, rv_t, "running_var")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_batch_norm_memory_efficient(backend):
    """memory_efficient=True (torch has no such mode) supports forward mode; it saves the output, not the
    input, so its gradient cannot be differentiated again: refused clearly."""
    x, w, b = randn(3, 2, 2), torch.rand(2, dtype=F64) + 0.5, randn(2)
    kw = {"activation": "leaky_relu", "negative_slope": 0.1, "memory_efficient": True}
    with pyops.backend(backend):
        got = jvp(lambda a: PF.batch_norm(a, None, None, w, b, True, **kw), (x,), (x.sin(),))[1]
        expected = jvp(lambda a: TF.leaky_relu(TF.batch_norm(a, None, None, w, b, True), 0.1), (x,), (x.sin(),))[1]
        _close(got, expected, "jvp")
        xr = x.clone().requires_grad_()
        y = PF.batch_norm(xr, None, None, w, b, True, **kw)
        with pytest.raises(RuntimeError, match="pyops.batch_norm: memory_efficient=True .* use memory_efficient=False"):
            torch.autograd.grad(y.pow(2).sum(), xr, create_graph=True)


def test_loss_tangent_of_a_mean_over_nothing():
    """A mean over no elements, or over class indices all ignored, is 0 / 0: its tangent is NaN, as
    torch's (whose gradient is 0 there, as pyops')."""
    x, empty = randn(3, 4), randn(0, 4)
    cases = [
        (PF.mse_loss, TF.mse_loss, empty, empty),
        (PF.huber_loss, TF.huber_loss, empty, empty),
        (PF.cross_entropy, TF.cross_entropy, x, torch.full((3,), -100)),
        (PF.cross_entropy, TF.cross_entropy, empty, torch.zeros(0, dtype=torch.long)),
    ]
    for backend in BACKENDS:
        for fn, ref, a, t in cases:
            with pyops.backend(backend):
                got = jvp(lambda u, fn=fn, t=t: fn(u, t), (a,), (a,))[1]
            expected = jvp(lambda u, ref=ref, t=t: ref(u, t), (a,), (a,))[1]
            assert got.isnan() and expected.isnan(), (backend, fn, got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_zero_channels(training):
    """No channels: the tangent and the differentiable backward are empty, as torch's."""
    x, w, b = randn(3, 0, 2), randn(0), randn(0)
    rm, rv = torch.zeros(0, dtype=F64), torch.ones(0, dtype=F64)
    for backend in [b for b in BACKENDS if b != "torch"]:
        with pyops.backend(backend):
            out, tangent = jvp(lambda *a: PF.batch_norm(a[0], rm, rv, a[1], a[2], training), (x, w, b), (x, w, b))
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            gx, gw = torch.autograd.grad(PF.batch_norm(xr, rm, rv, wr, b, training).sum(), (xr, wr), create_graph=True)
        assert out.shape == tangent.shape == gx.shape == x.shape and gw.shape == w.shape


def test_third_order_losses():
    """Third derivatives: the saved gradient's own derivative is differentiable again (cross entropy's
    reads it through another node; the pointwise losses' is constant)."""
    x = randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    t = randn(4, 3)
    for f, ref in [
        (
            lambda a: PF.cross_entropy(a, labels, label_smoothing=0.1),
            lambda a: TF.cross_entropy(a, labels, label_smoothing=0.1),
        ),
        (lambda a: PF.mse_loss(a, t) ** 2, lambda a: TF.mse_loss(a, t) ** 2),
    ]:
        with pyops.backend("native"):
            got = jacrev(jacrev(jacrev(f)))(x)
        _close(got, jacfwd(jacrev(jacrev(ref)))(x), "third derivative")


def test_huber_second_derivative_at_saturation():
    """Huber's second derivative is read from the saved gradient: 1 inside (|d| < delta), 0 outside and at
    |d| = delta, as torch's huber_loss_double_backward, for a mean whose scale is not a power of two and
    float32 rounding. (torch.func over torch's own huber_loss counts |d| = delta as inside.)"""
    d = torch.tensor([0.69999, 0.7, 0.70001, -0.7, 0.3, 2.0], dtype=torch.float32)
    x = torch.zeros(6, dtype=torch.float32, requires_grad=True)
    (g,) = torch.autograd.grad(TF.huber_loss(x, x.detach() - d, delta=0.7), x, create_graph=True)
    (expected,) = torch.autograd.grad(g, x, torch.ones(6))
    assert torch.equal(expected != 0, torch.tensor([True, False, False, False, True, False]))
    for backend in [b for b in BACKENDS if b != "torch"]:
        with pyops.backend(backend):
            (g,) = torch.autograd.grad(PF.huber_loss(x, x.detach() - d, delta=0.7), x, create_graph=True)
            (got,) = torch.autograd.grad(g, x, torch.ones(6))
            hess = hessian(lambda a: PF.huber_loss(a, x.detach() - d, delta=0.7))(x.detach())
        assert torch.equal(got, expected), (backend, got, expected)
        assert torch.equal(hess.diagonal(), expected), (backend, hess.diagonal(), expected)

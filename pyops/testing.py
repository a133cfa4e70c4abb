"""The op spec table and the float64 oracle: per op its pyops function, the torch reference, its keyword
arguments, sample inputs (shapes, layouts, edge values) and the tolerance per dtype; per optimizer its
pyops and torch classes, configurations and tolerance. The tests, `python -m pyops check`, the demo
tour and the bench all read it, so a new op (or optimizer) is one new entry here.

The oracle is the torch reference computed in float64 from the same (dtype-rounded) inputs; a result
passes when every element is within `atol + rtol * |oracle|` (TOL), NaN and inf exactly where the
oracle has them.
"""

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as TF

from . import functional as F
from . import optim as popt
from .backend import current as current_backend
from .ops.activation import maxout_reference
from .ops.conv import conv2d_reference

# ---- tolerances -------------------------------------------------------------------------------------

# dtype -> (rtol, atol) against the float64 oracle: float64 ~1e-10 relative, float32 ~1e-5,
# float16 ~1e-3, bfloat16 ~1.6e-2.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}
DTYPES = tuple(TOL)


def tolerance(dtype, reduced=1, scale=1):
    """(rtol, atol) for `dtype`: atol grows with the number of elements a result reduces over
    (`reduced`: rounding errors add up along a sum), both with `scale` (e.g. optimizer steps)."""
    rtol, atol = TOL[dtype]
    return rtol * scale, atol * reduced * scale


def unreliable(device, backend_name, dtype):
    """Whether a (device, backend, dtype) cannot be checked here: bfloat16 arithmetic is wrong in the
    Triton interpreter, so Triton bfloat16 is checked on GPU only."""
    return torch.device(device).type == "cpu" and backend_name == "triton" and dtype == torch.bfloat16


@dataclasses.dataclass
class Comparison:
    """One result against the oracle. `worst` is the largest error over its bound (at most 1 passes;
    inf where NaN, inf, shape or dtype differ), `error` the largest error relative to max |oracle|,
    `message` None when within tolerance, else what is wrong."""

    what: str
    worst: float
    error: float
    message: Optional[str] = None

    @property
    def ok(self):
        return self.message is None


def _failed(what, message):
    return Comparison(what, math.inf, math.inf, f"{what}: {message}")


def compare(actual, expected64, dtype, torch_result=None, what="output", reduced=1, scale=1):
    """`actual` (of `dtype`) against the float64 oracle within tolerance(dtype, reduced, scale), NaNs
    where the oracle has them. Where torch's own result in `dtype` (torch_result) is further from the
    oracle than the tolerance (rounding the dtype itself forces, e.g. a saved float16 output), pyops
    may be as far as torch is, times 2, and no further."""

    if actual.shape != expected64.shape:
        return _failed(what, f"shape {tuple(actual.shape)} != {tuple(expected64.shape)}")
    if actual.dtype != dtype:
        return _failed(what, f"dtype {actual.dtype} != {dtype}")
    rtol, atol = tolerance(dtype, reduced, scale)
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        return _failed(what, f"NaN at {nan_a.nonzero()[:5].tolist()} vs oracle {nan_e.nonzero()[:5].tolist()}")
    inf_e = e.isinf()
    if not torch.equal(a[inf_e], e[inf_e]):
        return _failed(what, "infinities differ from the oracle")
    fin = ~nan_e & ~inf_e
    err = (a - e).abs()[fin]
    bound = atol + rtol * e.abs()[fin]
    if torch_result is not None:
        t = torch_result.detach().to("cpu", torch.float64)
        bound = torch.maximum(bound, 2 * (t - e).abs()[fin])
    if not err.numel():
        return Comparison(what, 0.0, 0.0)
    worst = float((err / bound).max())
    error = float(err.max() / e.abs()[fin].max().clamp_min(1e-30))
    bad = err > bound
    if bad.any():
        return Comparison(
            what,
            worst,
            error,
            f"{what} ({dtype}): {int(bad.sum())} of {err.numel()} elements off; "
            f"worst error {float((err - bound).max()):.3g} over bound",
        )
    return Comparison(what, worst, error)


def gradcheck(fn, inputs):
    """torch.autograd.gradcheck of fn at inputs (float64) as a Comparison (worst 0 passes, inf fails)."""
    try:
        torch.autograd.gradcheck(fn, inputs)
    except Exception as e:  # GradcheckError, or the op's own error: either is the failure to report
        return _failed("gradcheck", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return Comparison("gradcheck", 0.0, 0.0)


def _labelled(label, comparison):
    message = comparison.message and f"{label}: {comparison.message}"
    return dataclasses.replace(comparison, what=f"{label} {comparison.what}", message=message)


def assert_close(actual, expected64, dtype, torch_result=None, what="output", reduced=1, scale=1):
    """compare(), as an assertion."""
    result = compare(actual, expected64, dtype, torch_result, what, reduced, scale)
    assert result.ok, result.message


# ---- ops --------------------------------------------------------------------------------------------


def _identity(t):
    return t


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _transposed(t):
    return t.t()


@dataclasses.dataclass(frozen=True)
class Sample:
    """An input: `values` as given, or `shape` drawn as randn * 3 in float64; rounded to the dtype,
    moved to the device, then `view` of it is what the op gets (a layout). `kwargs` override the op's
    for this input; `grad_view` lays out the incoming gradient (default: contiguous)."""

    shape: tuple = ()
    view: Callable = _identity
    kwargs: dict = dataclasses.field(default_factory=dict)
    grad_view: Optional[Callable] = None
    values: Optional[tuple] = None

    def draw(self, dtype, device, generator=None):
        """The tensor the view is taken of."""
        if self.values is not None:
            base = torch.tensor(self.values, dtype=torch.float64)
        else:
            base = torch.randn(self.shape, dtype=torch.float64, generator=generator) * 3
        return base.to(dtype).to(device)

    def make(self, dtype, device, generator=None):
        """The input the op gets."""
        return self.view(self.draw(dtype, device, generator))

    def grad(self, shape, dtype, device, generator=None):
        """The gradient flowing into an output of `shape`: randn, or a ramp for given values."""
        if self.values is not None:
            g = torch.linspace(-2, 2, math.prod(shape), dtype=torch.float64).reshape(shape)
        else:
            g = torch.randn(shape, dtype=torch.float64, generator=generator)
        g = g.to(dtype).to(device)
        return self.grad_view(g) if self.grad_view is not None else g


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One differentiable op. `saves` is what backward keeps: "mask" (1 bit an output element),
    "input", "output" or "indices" (uint8, one an output element). `fit(shape, kwargs)` adapts the
    keyword arguments to an input shape they do not fit (None: they fit every shape). `reduced(x, kwargs)`
    is the number of input elements each output element sums over (None: none, an elementwise op or an
    exact max)."""

    family: str
    name: str
    fn: Callable
    reference: Callable
    kwargs: dict
    samples: dict
    edge: Sample
    saves: str
    inplace: bool = False
    fit: Optional[Callable] = None
    reduced: Optional[Callable] = None
    dtypes: tuple = DTYPES

    def sample_kwargs(self, sample):
        """The keyword arguments for one of the samples."""
        return {**self.kwargs, **sample.kwargs}

    def kwargs_for(self, shape):
        """The keyword arguments for an input of `shape` (kwargs, fitted to it where needed)."""
        return self.kwargs if self.fit is None else self.fit(tuple(shape), dict(self.kwargs))

    def reduction(self, x, kwargs):
        return 1 if self.reduced is None else self.reduced(x, kwargs)

    def output_shape(self, shape, kwargs=None):
        """The output's shape for an input of `shape` (the reference run on the meta device)."""
        kwargs = self.kwargs if kwargs is None else kwargs
        return tuple(self.reference(torch.empty(shape, device="meta"), **kwargs).shape)

    def saved_bytes(self, numel_in, numel_out, itemsize):
        """Bytes backward keeps for one input of numel_in elements (of itemsize bytes) giving numel_out."""
        return {
            "mask": (numel_out + 7) // 8,
            "input": numel_in * itemsize,
            "output": numel_out * itemsize,
            "indices": numel_out,
        }[self.saves]

    def check(self, dtype, device, seed=0):
        """Every sample and the edge values on the current backend, against the oracle; each sample drawn
        from a generator seeded with `seed` (the values the tests draw after torch.manual_seed(seed)).
        In float64, also torch.autograd.gradcheck of the op on its first sample of 2 to 256 elements."""
        results = [
            _labelled(label, c)
            for label, sample in {**self.samples, "edge": self.edge}.items()
            for c in check_op_sample(self, sample, dtype, device, torch.Generator().manual_seed(seed))
        ]
        if dtype == torch.float64:
            small = [v for v in self.samples.values() if v.values is None and 1 < math.prod(v.shape) <= 256]
            sample = (small or list(self.samples.values()))[0]
            kwargs = self.sample_kwargs(sample)
            x = sample.make(dtype, device, torch.Generator().manual_seed(seed)).requires_grad_()
            results.append(gradcheck(lambda t: self.fn(t, **kwargs), (x,)))
        return results


# Empty, 0-d, one element, sizes that are not a multiple of 8 (the vector/mask width), several Triton
# programs, and non-contiguous layouts.
ELEMENTWISE_SAMPLES = {
    "0d": Sample(()),
    "one": Sample((1,)),
    "empty": Sample((0, 3)),
    "odd": Sample((13, 9)),
    "blocks": Sample((3, 1001)),
    "transposed": Sample((9, 21), _transposed, grad_view=lambda g: g.t().contiguous().t()),
    "sliced": Sample((6, 34), lambda t: t[1:, ::3]),
    "channels_last": Sample((2, 5, 3, 7), _channels_last),
    "expanded": Sample((1, 37), lambda t: t.expand(4, 37)),
}


def _floats(text):
    return tuple(float(v) for v in text.split())


# Exact zeros at the kinks, tiny and huge values, inf and NaN. NaN comes last, in a sample of odd length:
# torch's elu gradient at NaN is g in its scalar loops and CUDA kernel (pyops' rule) but NaN in its
# vectorized CPU loop, and the last element of an odd-length tensor is always in the scalar tail, whatever
# the vector width of the machine and dtype.
EDGE_VALUES = Sample(
    values=_floats("0 -0 1e-30 -1e-30 1e-5 -1e-5 0.5 -0.5 1 -1 20 -20 80 -80 1e30 -1e30 inf -inf")
    + _floats("3 -3 0.1499 -0.1501 1e-8 -1e-8 nan")
)


def _fit_pieces(shape, kwargs):
    """maxout on `shape`: the most pieces up to kwargs' that divide the size along dim."""
    size = shape[kwargs["dim"]]
    return {**kwargs, "pieces": max(p for p in range(1, kwargs["pieces"] + 1) if size % p == 0)}


def _elementwise(name, fn, reference, kwargs, saves, inplace=False):
    return OpSpec("activation", name, fn, reference, kwargs, ELEMENTWISE_SAMPLES, EDGE_VALUES, saves, inplace)


ACTIVATIONS = {
    spec.name: spec
    for spec in (
        _elementwise("relu", F.relu, TF.relu, {}, "mask", inplace=True),
        _elementwise("leaky_relu", F.leaky_relu, TF.leaky_relu, {"negative_slope": 0.2}, "mask", inplace=True),
        _elementwise("elu", F.elu, TF.elu, {"alpha": 1.3}, "input", inplace=True),
        _elementwise("sigmoid", F.sigmoid, torch.sigmoid, {}, "output"),
        _elementwise("tanh", F.tanh, torch.tanh, {}, "output"),
        OpSpec(
            family="activation",
            name="maxout",
            fn=F.maxout,
            reference=maxout_reference,
            kwargs={"pieces": 4, "dim": 1},
            samples={
                "dim1": Sample((4, 12, 3), kwargs={"pieces": 3, "dim": 1}),
                "last": Sample((5, 20), kwargs={"pieces": 4, "dim": -1}),
                "first": Sample((6, 7), kwargs={"pieces": 2, "dim": 0}),
                "1d": Sample((9,), kwargs={"pieces": 9, "dim": 0}),
                "pieces1": Sample((3, 4), kwargs={"pieces": 1, "dim": 1}),
                "empty": Sample((0, 6), kwargs={"pieces": 3, "dim": 1}),
                "big": Sample((2, 1030, 2), kwargs={"pieces": 2, "dim": 1}),
                "channels_last": Sample((2, 8, 3, 5), _channels_last, kwargs={"pieces": 4, "dim": 1}),
                "transposed": Sample((6, 10), _transposed, kwargs={"pieces": 5, "dim": 0}),
            },
            # Groups of 4: ties (the gradient goes to the first maximal piece), NaN (wins, the first NaN of a
            # group), -inf, signed zeros.
            edge=Sample(
                values=_floats("1 3 3 2  nan 5 nan 1  -inf -inf -inf -inf  0 -0 0 0  4 nan 9 9  2 2 2 2"),
                kwargs={"pieces": 4, "dim": 0},
            ),
            saves="indices",
            fit=_fit_pieces,
        ),
    )
}


def forward_backward(fn, x, kwargs, g):
    """fn(x, **kwargs) and its input gradient for output gradient g (zeros where the output is empty)."""
    xr = x.detach().clone().requires_grad_()
    y = fn(xr, **kwargs)
    (gx,) = torch.autograd.grad(y, xr, g) if y.numel() else (torch.zeros_like(xr),)
    return y, gx


def compare_op(fn, reference, kwargs, x, g, reduced=1):
    """fn(x, **kwargs) and its input gradient for output gradient g, against the float64 oracle (the
    reference on x in float64) with torch's own result in x's dtype as the rounding allowance; the
    output's strides must be torch's. Returns the output's and the gradient's Comparisons."""
    xp = x.detach().clone().requires_grad_()
    y = fn(xp, **kwargs)
    y64, gx64 = forward_backward(reference, x.detach().to(torch.float64), kwargs, g.to(torch.float64))
    yt, gt = forward_backward(reference, x, kwargs, g)
    out = compare(y, y64, x.dtype, yt, reduced=reduced)
    if out.ok and y.numel() > 1 and y.stride() != yt.stride():
        out = Comparison("output", math.inf, out.error, f"layout {y.stride()} differs from torch's {yt.stride()}")
    results = [out]
    if y.numel():
        (gx,) = torch.autograd.grad(y, xp, g)
        results.append(compare(gx, gx64, x.dtype, gt, what="gradient", reduced=reduced))
    return results


def check_op_sample(spec, sample, dtype, device, generator=None):
    """compare_op on one sample of an OpSpec, on the current backend."""
    kwargs = spec.sample_kwargs(sample)
    x = sample.make(dtype, device, generator)
    g = sample.grad(spec.output_shape(x.shape, kwargs), dtype, device, generator)
    return compare_op(spec.fn, spec.reference, kwargs, x, g, spec.reduction(x, kwargs))


# ---- optimizers -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One optimizer: the pyops class against torch's (run as its for-loop, foreach=False), for each
    of `configs` (constructor keyword arguments) over `steps` steps; the tolerance is TOL times
    `scale` (the steps' rounding adds up). `dtypes`: those torch's for-loop is the reference for. For
    float16/bfloat16 parameters pyops computes in float32 while torch's for-loop computes in the half
    dtype, where its state underflows (v = (1 - beta2) g^2 of a gradient below ~1e-3, and eps = 1e-8,
    round to 0 in float16: torch's step turns inf), so it is no reference there."""

    family: str
    name: str
    cls: type
    reference: type
    configs: tuple
    steps: int = 12
    scale: float = 20
    dtypes: tuple = (torch.float64, torch.float32)

    def check(self, dtype, device, seed=0):
        """Every configuration on the current backend, against the oracle (values drawn from `seed`)."""
        return [
            _labelled(f"config {i} {config}", c)
            for i, config in enumerate(self.configs)
            for c in check_optimizer(self, config, dtype, device, torch.Generator().manual_seed(seed))
        ]


def _optimizer(name, configs):
    """pyops.optim.<name> against torch.optim.<name>."""
    return OptimSpec("optim", name, getattr(popt, name), getattr(torch.optim, name), tuple(configs))


OPTIMIZERS = {
    spec.name: spec
    for spec in (
        _optimizer(
            "SGD",
            [
                {},
                {"momentum": 0.9},
                {"momentum": 0.9, "nesterov": True},
                {"momentum": 0.9, "dampening": 0.5},
                {"weight_decay": 0.1, "momentum": 0.5},
                {"maximize": True, "momentum": 0.3},
                {"lr": torch.tensor(0.01)},
            ],
        ),
        _optimizer(
            "Adam",
            [
                {},
                {"amsgrad": True},
                {"weight_decay": 0.1},
                {"weight_decay": 0.1, "decoupled_weight_decay": True},
                {"maximize": True, "betas": (0.8, 0.9)},
                {"lr": torch.tensor(0.01), "eps": 1e-6},
            ],
        ),
        _optimizer("AdamW", [{}, {"amsgrad": True, "weight_decay": 0.3}, {"maximize": True}]),
        _optimizer(
            "Adagrad",
            [{}, {"lr_decay": 0.1}, {"weight_decay": 0.1, "initial_accumulator_value": 0.5}, {"maximize": True}],
        ),
        _optimizer(
            "RMSprop",
            [
                {},
                {"centered": True},
                {"momentum": 0.9},
                {"momentum": 0.5, "centered": True, "weight_decay": 0.1},
                {"maximize": True, "alpha": 0.9},
            ],
        ),
    )
}
# Parameter shapes of an optimizer check: several tensors, a 0-d and an empty one, and one whose gradient
# turns infinite and NaN at one step (OPTIM_NONFINITE).
OPTIM_SHAPES = ((5, 3), (7,), (), (0, 4), (3, 2, 2), (1,), (4,))
OPTIM_NONFINITE = (2, len(OPTIM_SHAPES) - 1, (math.inf, -math.inf, math.nan, 1.0))  # (step, parameter, gradient)


def run_optimizer(cls, params, config, grads):
    """Step `cls` over `params` once per entry of `grads` (a list per step). Two parameter groups (the
    second with lr 0.02) unless the config sets lr; parameter 1 has no gradient every third step."""
    if "lr" in config:
        opt = cls(params, **config)
    else:
        opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.02}], **config)
    for k, step_grads in enumerate(grads):
        for j, p in enumerate(params):
            p.grad = None if (j == 1 and k % 3 == 2) else step_grads[j].clone()
        opt.step()
    return opt


def check_optimizer(spec, config, dtype, device, generator=None):
    """spec.cls (on the current backend) against spec.reference in float64 from the same dtype-rounded
    parameters and gradients, with torch's own for-loop in `dtype` as the rounding allowance: the
    parameters and every state tensor. Returns Comparisons."""
    on_device = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
    start = [(torch.randn(s, dtype=torch.float64, generator=generator)).to(dtype) for s in OPTIM_SHAPES]
    grads = [
        [torch.randn(s, dtype=torch.float64, generator=generator).to(dtype) for s in OPTIM_SHAPES]
        for _ in range(spec.steps)
    ]
    step, index, values = OPTIM_NONFINITE
    grads[step][index] = torch.tensor(values, dtype=dtype)

    def run(cls, run_dtype, config, reference):
        params = [p.to(device, run_dtype, copy=True).requires_grad_() for p in start]
        extra = {"foreach": False} if reference else {}
        gs = [[g.to(device, run_dtype) for g in step] for step in grads]
        return params, run_optimizer(cls, params, {**config, **extra}, gs)

    p64, o64 = run(spec.reference, torch.float64, on_device, True)
    pt, ot = run(spec.reference, dtype, on_device, True)
    ours, opt = run(spec.cls, dtype, on_device, False)
    results = []
    for i, (a, e, t) in enumerate(zip(ours, p64, pt)):
        results.append(compare(a, e, dtype, t, what=f"param {i}", scale=spec.scale))
        state, s64, st = opt.state[a], o64.state[e], ot.state[t]
        if state.keys() != st.keys():
            results.append(_failed(f"state {i}", f"keys {sorted(state)} != torch's {sorted(st)}"))
            continue
        for key in st:
            what = f"state {i} {key}"
            if not isinstance(st[key], torch.Tensor):
                ok = state[key] == st[key]
                results.append(Comparison(what, 0.0, 0.0) if ok else _failed(what, f"{state[key]!r} != {st[key]!r}"))
            elif state[key].dtype != st[key].dtype:
                results.append(_failed(what, f"dtype {state[key].dtype} != torch's {st[key].dtype}"))
            else:
                results.append(compare(state[key], s64[key], st[key].dtype, st[key], what=what, scale=spec.scale))
    return results


# ---- losses -----------------------------------------------------------------------------------------


def _to64(v):
    return v.detach().to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _loss_forward_backward(fn, x, t, kwargs, g, target_grad):
    """fn(x, t, **kwargs), and the gradients of x (and t when target_grad) for output gradient g."""
    xr = x.detach().clone().requires_grad_()
    tr = t.detach().clone().requires_grad_(target_grad)
    y = fn(xr, tr, **kwargs)
    if not y.numel() or not x.numel():
        return y, [torch.zeros_like(xr)] + ([torch.zeros_like(tr)] if target_grad else [])
    return y, list(torch.autograd.grad(y, (xr, tr) if target_grad else (xr,), g))


def compare_loss(spec, x, t, kwargs, generator=None):
    """spec.fn(x, t, **kwargs) and its gradients against the float64 oracle (the reference on float64
    copies of x, t and floating keyword arguments), with torch's own result in x's dtype as the rounding
    allowance. Returns the output's and the gradients' Comparisons."""
    xp = x.detach().clone().requires_grad_()
    tp = t.detach().clone().requires_grad_(spec.target_grad)
    y = spec.fn(xp, tp, **kwargs)
    g = torch.randn(y.shape, dtype=torch.float64, generator=generator).to(y.dtype).to(y.device)
    kw64 = {k: _to64(v) for k, v in kwargs.items()}
    y64, g64 = _loss_forward_backward(spec.reference, _to64(x), _to64(t), kw64, g.double(), spec.target_grad)
    yt, gt = _loss_forward_backward(spec.reference, x, t, kwargs, g, spec.target_grad)
    results = [compare(y, y64, x.dtype, yt, reduced=max(1, x.numel()))]
    if y.numel() and x.numel():
        ours = torch.autograd.grad(y, (xp, tp) if spec.target_grad else (xp,), g)
        for name, a, e, tr in zip(("input gradient", "target gradient"), ours, g64, gt):
            results.append(compare(a, e, x.dtype, tr, what=name, reduced=max(1, x.shape[-1])))
    return results


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss: the pyops function against torch's over `samples` (label -> make(dtype, device,
    generator) -> (input, target, keyword arguments)) and every reduction; outputs, the input's gradient
    and (target_grad) the target's, against the float64 oracle."""

    family: str
    name: str
    fn: Callable
    reference: Callable
    kwargs: dict
    samples: dict
    target_grad: bool = True
    dtypes: tuple = DTYPES

    def check(self, dtype, device, seed=0):
        generator = torch.Generator().manual_seed(seed)
        results = []
        for label, make in self.samples.items():
            x, t, kw = make(dtype, device, generator)
            for reduction in ("none", "mean", "sum"):
                kwargs = {**self.kwargs, **kw, "reduction": reduction}
                results += [_labelled(f"{label} {reduction}", c) for c in compare_loss(self, x, t, kwargs, generator)]
        return results


def _regression_pair(shape, target_shape=None, view=_identity):
    def make(dtype, device, generator):
        x = (torch.randn(shape, dtype=torch.float64, generator=generator) * 3).to(dtype).to(device)
        t = (torch.randn(target_shape or shape, dtype=torch.float64, generator=generator) * 3).to(dtype).to(device)
        return view(x), view(t), {}

    return make


REGRESSION_SAMPLES = {
    "odd": _regression_pair((13, 9)),
    "chunks": _regression_pair((2, 8200)),
    "transposed": _regression_pair((9, 21), view=_transposed),
    "channels_last": _regression_pair((2, 5, 3, 7), view=_channels_last),
    "empty": _regression_pair((0, 3)),
}


def _classes(shape, probs=False, weighted=False, ignore_index=None, smoothing=0.0):
    def make(dtype, device, generator):
        x = (torch.randn(shape, dtype=torch.float64, generator=generator) * 3).to(dtype).to(device)
        classes = shape[0] if len(shape) == 1 else shape[1]
        kw = {"label_smoothing": smoothing}
        if probs:
            t = torch.rand(shape, dtype=torch.float64, generator=generator).softmax(0 if len(shape) == 1 else 1)
            t = t.to(dtype).to(device)
        else:
            t = torch.randint(0, classes, () if len(shape) == 1 else (shape[0], *shape[2:]), generator=generator)
            if ignore_index is not None:
                t.view(-1)[::3] = ignore_index
                kw["ignore_index"] = ignore_index
            t = t.to(device)
        if weighted:
            kw["weight"] = (torch.rand(classes, dtype=torch.float64, generator=generator) + 0.5).to(dtype).to(device)
        return x, t, kw

    return make


CROSS_ENTROPY_SAMPLES = {
    "index": _classes((8, 10)),
    "weighted_ignored": _classes((9, 7), weighted=True, ignore_index=2, smoothing=0.2),
    "dims": _classes((3, 5, 4, 2), ignore_index=1),
    "c1": _classes((5, 1), smoothing=0.1),
    "wide": _classes((2, 3000)),
    "probs": _classes((6, 5), probs=True, weighted=True, smoothing=0.1),
    "unbatched": _classes((7,)),
}


def _rmse_reference(input, target, reduction="mean", eps=0.0):
    from .ops.loss import rmse_reference

    return rmse_reference(input, target, reduction, eps)


LOSSES = {
    spec.name: spec
    for spec in (
        LossSpec("loss", "l1_loss", F.l1_loss, TF.l1_loss, {}, REGRESSION_SAMPLES),
        LossSpec("loss", "mse_loss", F.mse_loss, TF.mse_loss, {}, REGRESSION_SAMPLES),
        LossSpec("loss", "huber_loss", F.huber_loss, TF.huber_loss, {"delta": 0.8}, REGRESSION_SAMPLES),
        LossSpec("loss", "rmse_loss", F.rmse_loss, _rmse_reference, {}, REGRESSION_SAMPLES),
        LossSpec(
            "loss", "cross_entropy", F.cross_entropy, TF.cross_entropy, {}, CROSS_ENTROPY_SAMPLES, target_grad=False
        ),
    )
}


# ---- batch_norm -------------------------------------------------------------------------------------
def _nonfinite_channels(t):
    """Channel 0 starts with +inf, channel 1 holds a NaN and channel 2 a -inf inside; the others are finite
    (a channel's statistics then are inf/NaN as torch's, its neighbours' untouched)."""
    t = t.clone()
    t[0, 0].view(-1)[0] = math.inf
    t[1, 1].view(-1)[-1] = math.nan
    t[-1, 2].view(-1)[1] = -math.inf
    return t


# Inputs of the batch_norm family: (N, C), (N, C, L), (N, C, H, W) contiguous, channels_last, sliced and
# transposed; sizes off the vector width; N*H*W = 2; C = 1; a constant channel (zero variance); a mean
# far from zero; several reduction tasks per channel (more than 32K values); empty batches and zero
# channels; infinite and NaN values, first in a channel and inside it, in both layouts.
BATCH_NORM_SAMPLES = {
    "nchw": Sample((4, 3, 5, 7)),
    "channels_last": Sample((3, 5, 4, 6), _channels_last),
    "channels_last_grad": Sample((2, 19, 3, 3), _channels_last, grad_view=_channels_last),
    "2d": Sample((13, 6)),
    "ncl": Sample((5, 4, 9)),
    "ncl_transposed": Sample((5, 9, 4), lambda t: t.transpose(1, 2)),
    "sliced": Sample((4, 6, 5, 7), lambda t: t[:, ::2, 1:, ::2]),
    "nhw2": Sample((1, 3, 2, 1)),
    "c1": Sample((6, 1, 5, 5)),
    "constant": Sample((4, 3, 5), lambda t: torch.full_like(t, 2.5)),
    "offset": Sample((8, 2, 33), lambda t: t / 3 + 100),
    "split": Sample((2, 2, 130, 130)),
    "empty": Sample((0, 3, 4)),
    "empty_channels_last": Sample((0, 3, 2, 2), _channels_last),
    "nonfinite": Sample((3, 4, 5), _nonfinite_channels),
    "nonfinite_channels_last": Sample((3, 4, 2, 3), lambda t: _channels_last(_nonfinite_channels(t))),
}
# What the Triton interpreter runs (tiny; the kernels are the same for every shape).
BATCH_NORM_TRITON_SAMPLES = ("channels_last_grad", "ncl_transposed", "2d", "empty", "nonfinite")
# Zero channels: for the forms without weight and bias only, where torch's batch_norm takes them (with a
# weight of zero elements it fails indexing it); tests/test_batch_norm.py checks pyops' affine forms.
BATCH_NORM_ZERO_CHANNELS = {"zero_channels": Sample((3, 0, 4))}


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
    """One configuration of pyops.functional.batch_norm against the torch composite (torch's batch_norm,
    + residual, activation): `kwargs` for both, with a residual input when `residual`, weight and bias
    when `affine`, running statistics when `running`. float16/bfloat16 inputs get float32 weight, bias
    and running statistics (as autocast leaves them)."""

    family: str
    name: str
    kwargs: dict
    residual: bool = False
    affine: bool = True
    running: bool = True
    samples: dict = dataclasses.field(default_factory=lambda: BATCH_NORM_SAMPLES)
    dtypes: tuple = DTYPES

    def check(self, dtype, device, seed=0):
        """Every sample on the current backend, against the oracle: the output, the running statistics and
        every gradient."""
        return [
            _labelled(label, c)
            for label, sample in self.samples.items()
            for c in check_batch_norm(self, sample, dtype, device, torch.Generator().manual_seed(seed))
        ]


def batch_norm_inputs(spec, sample, dtype, device, generator=None):
    """(input, running_mean, running_var, weight, bias, residual, grad_out) for one sample, None where the
    spec has no such tensor."""
    x = sample.make(dtype, device, generator)
    c = x.shape[1]
    side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def vec(scale, shift, uniform=False):
        draw = torch.rand if uniform else torch.randn
        return (draw(c, dtype=torch.float64, generator=generator) * scale + shift).to(side).to(device)

    if not spec.affine:
        w = b = None
    elif spec.kwargs.get("memory_efficient"):
        # the saved output is divided by the weight to recover xhat, and elu's inverse loses ~e^-z of the
        # output's precision where it saturates: weights in [0.5, 1], biases in [1, 2]
        w, b = vec(0.5, 0.5, uniform=True), vec(1, 1, uniform=True)
    else:
        w, b = vec(1, 0.5), vec(1, 0)
    rm, rv = (vec(0.5, 0), vec(0.2, 1).abs()) if spec.running else (None, None)
    r = None
    if spec.residual:
        r = (torch.randn(x.shape, dtype=torch.float64, generator=generator) * 2).to(dtype).to(device)
    g = sample.grad(tuple(x.shape), dtype, device, generator)
    return x, rm, rv, w, b, r, g


def check_batch_norm(spec, sample, dtype, device, generator=None):
    """pyops.functional.batch_norm on one sample against the torch composite in float64 (from the same
    rounded inputs), torch's own result in `dtype` as the rounding allowance: output (and its layout),
    running statistics, and the gradients of input, weight, bias and residual (sums over the batch get
    an atol scaled with its size). Returns Comparisons."""
    from .ops.batch_norm import batch_norm_reference

    x, rm, rv, w, b, r, g = batch_norm_inputs(spec, sample, dtype, device, generator)
    reduced = max(1, x.numel() // max(1, x.shape[1]))
    # weight and bias gradients sum the batch's dz, which float16/bfloat16 round: their tolerance is the
    # input dtype's (relative to float32's, times the batch size); the memory-efficient form rebuilds
    # xhat from the saved output rounded to the input's dtype, one more rounding in the input's gradient
    side_scale = TOL[dtype][0] / TOL[torch.float32][0] if dtype in (torch.float16, torch.bfloat16) else 1

    def run(fn, cast):
        leaves = [t if t is None else cast(t).detach().clone().requires_grad_() for t in (x, w, b, r)]
        xs, ws, bs, rs = leaves
        rms, rvs = (None, None) if rm is None else (cast(rm).clone(), cast(rv).clone())
        y = fn(xs, rms, rvs, ws, bs, residual=rs, **spec.kwargs)
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, wanted, cast(g))  # empty batches too: their weight gradient is 0
        it = iter(grads)
        return y, rms, rvs, [next(it) if t is not None else None for t in leaves]

    def to64(t):
        return t.to(torch.float64)

    y, rms, rvs, grads = run(F.batch_norm, lambda t: t)
    y64, rm64, rv64, grads64 = run(batch_norm_reference, to64)
    yt, rmt, rvt, gradst = run(_reference_in_dtype, lambda t: t)
    if spec.kwargs.get("activation") == "elu":  # torch's two elu forms round differently: allow either
        _, _, _, other = run(batch_norm_reference, lambda t: t)
        gradst = [t if t is None else _farther(t, o, e) for t, o, e in zip(gradst, other, grads64)]
    if spec.kwargs.get("memory_efficient") and y.numel():
        gradst = _recovered_grads(spec.kwargs, x, rm, rv, w, b, r, g, yt.detach())
    out = compare(y, y64, dtype, yt)
    if out.ok and y.numel() > 1 and y.stride() != yt.stride():
        out = Comparison("output", math.inf, out.error, f"layout {y.stride()} differs from torch's {yt.stride()}")
    results = [out]
    if rm is not None:
        results.append(compare(rms, rm64, rm.dtype, rmt, what="running_mean"))
        results.append(compare(rvs, rv64, rv.dtype, rvt, what="running_var"))
    names = ("input", "weight", "bias", "residual")
    for name, a, e, t in zip(names, grads, grads64, gradst):
        if a is None:
            continue
        per_channel = name in ("weight", "bias")
        results.append(
            compare(
                a,
                e,
                a.dtype,
                t,
                what=f"grad {name}",
                reduced=reduced if per_channel else 1,
                scale=side_scale if per_channel else 1,
            )
        )
    return results


def _reference_in_dtype(*args, activation=None, alpha=1.0, **kwargs):
    """torch's own result in the input's dtype: the reference, with elu in its output-saving (in-place)
    form, whose backward reads the rounded output as pyops' does."""
    from .ops.batch_norm import batch_norm_reference

    if activation != "elu" or alpha < 0:
        return batch_norm_reference(*args, activation=activation, alpha=alpha, **kwargs)
    return TF.elu(batch_norm_reference(*args, **kwargs) * 1, alpha, inplace=True)


def _farther(a, b, oracle):
    """Elementwise, whichever of a and b is farther from the oracle."""
    return torch.where((a.double() - oracle).abs() >= (b.double() - oracle).abs(), a, b)


def _recovered_grads(kwargs, x, rm, rv, w, b, r, g, y):
    """The memory-efficient form's gradients in torch ops from torch's output y rounded to the input's dtype
    (xhat = (act^-1(y) - r - b) / w, computed in float32/float64): the rounding that form cannot avoid, the
    allowance its gradients are checked with. (input, weight, bias, residual) gradients."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw, yw, gw = x.to(work), y.to(work), g.to(work)
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    act, eps = kwargs.get("activation"), kwargs.get("eps", 1e-5)
    p = kwargs.get("negative_slope", 0.01) if act == "leaky_relu" else kwargs.get("alpha", 1.0)
    if kwargs.get("training", False):
        var = xw.var(dim=dims, unbiased=False)
    else:
        var = rv.to(work)
    invstd = (var + eps).rsqrt().reshape(shape)
    wv = (w.to(work) if w is not None else torch.ones_like(var)).reshape(shape)
    bv = (b.to(work) if b is not None else torch.zeros_like(var)).reshape(shape)
    if act == "leaky_relu":
        z, dz = torch.where(yw > 0, yw, yw / p), torch.where(yw > 0, gw, gw * p)
    elif act == "elu":
        z, dz = torch.where(yw > 0, yw, torch.log1p(yw / p)), torch.where(yw > 0, gw, gw * (yw + p))
    else:
        z, dz = yw, gw
    xhat = (z - (r.to(work) if r is not None else 0) - bv) / wv
    db, dw = dz.sum(dims), (dz * xhat).sum(dims)
    if kwargs.get("training", False):
        n = x.numel() // x.shape[1]
        dx = wv * invstd * (dz - (db / n).reshape(shape) - xhat * (dw / n).reshape(shape))
    else:
        dx = wv * invstd * dz
    side = w.dtype if w is not None else work
    return [
        dx.to(x.dtype),
        dw.to(side) if w is not None else None,
        db.to(side) if b is not None else None,
        dz.to(x.dtype) if r is not None else None,
    ]


# Every sample for the plain, the fused residual+relu and the memory-efficient elu forms; the others take
# these (each layout kind, the smallest batch, a constant channel).
BATCH_NORM_CORE_SAMPLES = ("nchw", "channels_last_grad", "2d", "ncl_transposed", "nhw2", "constant")
BATCH_NORM_FULL = ("batch_norm", "bn_add_relu", "bn_elu_me")


def _bn(name, residual=False, affine=True, running=True, dtypes=DTYPES, **kwargs):
    kwargs = {"training": True, "momentum": 0.3, "eps": 1e-5, **kwargs}
    samples = BATCH_NORM_SAMPLES
    if name not in BATCH_NORM_FULL:
        samples = {k: v for k, v in BATCH_NORM_SAMPLES.items() if k in BATCH_NORM_CORE_SAMPLES}
    if not affine:
        samples = {**samples, **BATCH_NORM_ZERO_CHANNELS}
    if kwargs.get("activation") == "elu":
        # torch's own elu gradient at a NaN input is NaN in its vectorized CPU loop and g in its scalar loop
        # (a strided tensor, a vector's tail) and CUDA kernel: no oracle for the non-finite samples (pyops'
        # is g in every layout, as the activation family's elu; tests/test_batch_norm.py checks it)
        samples = {k: v for k, v in samples.items() if not k.startswith("nonfinite")}
    return BatchNormSpec("batch_norm", name, kwargs, residual, affine, running, samples, dtypes)


BATCH_NORMS = {
    spec.name: spec
    for spec in (
        _bn("batch_norm"),
        _bn("bn_eval", training=False),
        _bn("bn_relu", activation="relu"),
        _bn("bn_add_relu", residual=True, activation="relu"),
        # float16/bfloat16: tests/test_batch_norm.py checks the memory-efficient form there norm-wise (its
        # gradients carry the saved output's rounding, elementwise bounds do not describe them)
        _bn(
            "bn_add_leaky_me",
            residual=True,
            activation="leaky_relu",
            negative_slope=0.1,
            memory_efficient=True,
            dtypes=(torch.float64, torch.float32),
        ),
        _bn("bn_elu_me", activation="elu", alpha=1.3, memory_efficient=True, dtypes=(torch.float64, torch.float32)),
        _bn("bn_add_elu", residual=True, activation="elu", alpha=0.7),
        _bn("bn_eval_leaky", training=False, residual=True, activation="leaky_relu", negative_slope=-0.2),
        _bn("bn_plain", affine=False, running=False),
    )
}


# ---- convolution ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One convolution: input and weight shapes (drawn as randn, rounded to the dtype), `view` of the
    input as the op gets it (a layout), the bias, and the op's other arguments."""

    input: tuple
    weight: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    bias: bool = True
    view: Callable = _identity
    weight_view: Callable = _identity
    grad_view: Callable = _identity  # the layout of the gradient flowing into the output


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A convolution op: its cases against the reference; in float64 also torch.autograd.gradcheck of
    input, weight and bias on `gradcheck_case` (groups, strides, dilation and padding together)."""

    family: str
    name: str
    fn: Callable
    reference: Callable
    cases: dict
    dtypes: tuple = DTYPES
    interpreted: tuple = ()  # the cases checked under the Triton interpreter (slow)
    gradcheck_case: Optional["ConvCase"] = None

    def check(self, dtype, device, seed=0):
        """Every case on the current backend (under the Triton interpreter those of `interpreted`),
        against the oracle: output (values and strides) and the gradients of input, weight and bias."""
        slow = current_backend() == "triton" and torch.device(device).type == "cpu"
        results = [
            _labelled(label, c)
            for label, case in self.cases.items()
            if not slow or label in self.interpreted
            for c in check_conv_case(self, case, dtype, device, torch.Generator().manual_seed(seed))
        ]
        if dtype == torch.float64 and self.gradcheck_case is not None:
            case = self.gradcheck_case
            leaves = [
                t.requires_grad_() for t in _conv_tensors(case, dtype, device, torch.Generator().manual_seed(seed))
            ]
            results.append(gradcheck(lambda *t: self.fn(*t, **case.kwargs), tuple(leaves)))
        return results


def _conv_tensors(case, dtype, device, generator):
    x = torch.randn(case.input, dtype=torch.float64, generator=generator).to(dtype).to(device)
    w = torch.randn(case.weight, dtype=torch.float64, generator=generator).to(dtype).to(device)
    b = (
        torch.randn(case.weight[0], dtype=torch.float64, generator=generator).to(dtype).to(device)
        if case.bias
        else None
    )
    return x, w, b


def check_conv_case(spec, case, dtype, device, generator=None):
    """spec.fn on one case, output and the three gradients, against the reference in float64 from the
    same dtype-rounded values (torch's own result in `dtype` as the rounding allowance)."""
    x, w, b = _conv_tensors(case, dtype, device, generator)
    kwargs = case.kwargs

    def run(fn, run_dtype):
        leaves = [t.to(run_dtype).detach().requires_grad_() if t is not None else None for t in (x, w, b)]
        xv, wv = case.view(leaves[0]), case.weight_view(leaves[1])
        y = fn(xv, wv, leaves[2], **kwargs)
        return leaves, y

    leaves, y = run(spec.fn, dtype)
    g = case.grad_view(torch.randn(y.shape, dtype=torch.float64, generator=generator).to(dtype).to(device))
    leaves64, y64 = run(spec.reference, torch.float64)
    leavest, yt = run(spec.reference, dtype)
    cin = case.weight[1] * case.weight[2] * case.weight[3]
    results = [compare(y, y64, dtype, yt, reduced=cin)]
    if results[0].ok and y.numel() > 1 and y.stride() != yt.stride():
        results[0] = Comparison(
            "output", math.inf, 0.0, f"output: layout {y.stride()} differs from torch's {yt.stride()}"
        )
    wanted = [i for i, t in enumerate(leaves) if t is not None]
    ours = torch.autograd.grad(y, [leaves[i] for i in wanted], g)  # an empty batch too: zero weight gradient
    oracle = torch.autograd.grad(y64, [leaves64[i] for i in wanted], g.to(torch.float64))
    theirs = torch.autograd.grad(yt, [leavest[i] for i in wanted], g)
    spatial = max(1, y.shape[-1] * y.shape[-2] * (y.shape[0] if y.dim() == 4 else 1))
    reduced = {
        0: case.weight[0] // max(1, kwargs.get("groups", 1)) * case.weight[2] * case.weight[3],
        1: spatial,
        2: spatial,
    }
    for i, a, e, t in zip(wanted, ours, oracle, theirs):
        what = ("input", "weight", "bias")[i] + " gradient"
        result = compare(a, e, dtype, t, what=what, reduced=reduced[i])
        cl = torch.channels_last
        if result.ok and a.dim() == 4 and a.is_contiguous(memory_format=cl) != t.is_contiguous(memory_format=cl):
            result = Comparison(what, math.inf, 0.0, f"{what}: layout {a.stride()} differs from torch's {t.stride()}")
        results.append(result)
    return results


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _conv_nonfinite(t):
    """+inf in a corner (reached by the fewest taps), NaN and -inf inside."""
    t = t.clone()
    t[0, 0, 0, 0], t[1, 2, 3, 3], t[1, 1, 2, 4] = math.inf, math.nan, -math.inf
    return t


# Argument forms: dense, grouped, depthwise (with a channel multiplier), dilation, non-square kernels and
# strides, "same"/"valid", unbatched input, channels_last (input or weight), a strided view, rows wider than
# several vectors, the fused activations, no bias, an empty batch, infinite and NaN inputs, and the im2col
# engine (>= 16 channels per group).
CONV_CASES = {
    "dense": ConvCase((2, 3, 7, 9), (4, 3, 3, 3), {"padding": 1}),
    "grouped": ConvCase((2, 8, 6, 7), (8, 2, 3, 3), {"groups": 4, "stride": 2, "padding": 1}),
    "depthwise": ConvCase((2, 6, 9, 8), (6, 1, 3, 3), {"groups": 6, "padding": 1}),
    "multiplier": ConvCase(
        (1, 4, 8, 8), (8, 1, 3, 3), {"groups": 4, "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}
    ),
    "dilated": ConvCase((2, 4, 10, 11), (6, 2, 3, 2), {"groups": 2, "dilation": 2, "padding": (2, 1)}),
    "same": ConvCase((1, 4, 6, 7), (4, 2, 2, 4), {"groups": 2, "padding": "same", "dilation": (1, 2)}),
    "valid": ConvCase((2, 3, 5, 6), (2, 3, 2, 3), {"padding": "valid"}),
    "unbatched": ConvCase((4, 6, 5), (4, 1, 3, 3), {"groups": 4, "padding": 1}, bias=False),
    "channels_last": ConvCase((2, 8, 6, 5), (8, 1, 3, 3), {"groups": 8, "padding": 1}, view=_cl, grad_view=_cl),
    "channels_last_strided": ConvCase(
        (1, 20, 7, 9),
        (20, 1, 3, 2),
        {"groups": 20, "stride": 2, "padding": (1, 0), "dilation": (1, 2), "activation": "relu"},
        view=_cl,
        grad_view=_cl,
    ),
    "weight_cl": ConvCase((2, 4, 5, 6), (6, 2, 3, 3), {"groups": 2, "padding": 1}, weight_view=_cl),
    "sliced": ConvCase((2, 4, 9, 12), (4, 1, 3, 3), {"groups": 4, "padding": 1}, view=lambda t: t[:, :, ::2, 1:]),
    "wide": ConvCase((1, 2, 4, 75), (2, 1, 3, 5), {"groups": 2, "padding": (1, 2)}),
    "relu": ConvCase((2, 4, 6, 6), (4, 1, 3, 3), {"groups": 4, "padding": 1, "activation": "relu"}),
    "leaky_relu": ConvCase((2, 4, 5, 6), (8, 2, 3, 3), {"groups": 2, "activation": "leaky_relu", "padding": 1}),
    "elu": ConvCase((1, 4, 6, 5), (4, 4, 3, 3), {"stride": 2, "activation": "elu"}),
    "empty": ConvCase((0, 4, 5, 5), (4, 1, 3, 3), {"groups": 4}),
    "grouped_channels_last": ConvCase((2, 8, 5, 6), (8, 4, 3, 3), {"groups": 2, "padding": 1}, view=_cl),
    "nonfinite": ConvCase((2, 4, 6, 6), (4, 2, 3, 3), {"groups": 2, "padding": 1}, view=_conv_nonfinite),
    "gemm": ConvCase((2, 32, 6, 5), (8, 16, 3, 3), {"groups": 2, "padding": 1, "stride": (1, 2), "activation": "relu"}),
}

# Those the Triton interpreter runs: grouped, a channel multiplier with strides and dilation, "same",
# channels_last, the fused activations, a reduction over more than one tile, an empty batch, non-finite values.
CONV_INTERPRETED = ("grouped", "multiplier", "same", "channels_last", "relu", "elu", "gemm", "empty", "nonfinite")

# Small enough for the interpreter: groups, strides, dilation and padding together, and the bias.
CONV_GRADCHECK = ConvCase(
    (1, 2, 5, 4), (4, 1, 2, 2), {"groups": 2, "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}
)

CONVS = {
    spec.name: spec
    for spec in (
        ConvSpec(
            "conv",
            "conv2d",
            F.conv2d,
            conv2d_reference,
            CONV_CASES,
            interpreted=CONV_INTERPRETED,
            gradcheck_case=CONV_GRADCHECK,
        ),
    )
}


# ---- families ---------------------------------------------------------------------------------------

# Every op family that exists, with its spec entries: `check` covers each and the bench has a module
# of cases per family (bench/<family>.py).
SPECS = {
    "activation": ACTIVATIONS,
    "optim": OPTIMIZERS,
    "batch_norm": BATCH_NORMS,
    "conv": CONVS,
    "loss": LOSSES,
}
FAMILIES = tuple(SPECS)
# The bench's families: one per op family, `overhead` (the fixed cost of a call of each activation) and
# `models` (a training step of each reference network).
BENCH_FAMILIES = FAMILIES + ("overhead", "models")

"""The float64 oracle and the comparison every family's spec is checked with: the per-dtype tolerances
(TOL), the comparison of a result against the oracle (compare, a Comparison), gradcheck as a Comparison,
the inputs shared by the families (Sample, the layouts) and the oracle of a one-input op (compare_op).

The oracle is the torch reference computed in float64 from the same (dtype-rounded) inputs; a result
passes when every element is within `atol + rtol * |oracle|` (TOL), NaN and inf exactly where the
oracle has them.
"""

import dataclasses
import math
from typing import Callable, Optional

import torch

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


# ---- comparison -------------------------------------------------------------------------------------


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


def failed(what, message):
    """A Comparison that fails with `message` (worst and error inf)."""
    return Comparison(what, math.inf, math.inf, f"{what}: {message}")


def compare(actual, expected64, dtype, torch_result=None, what="output", reduced=1, scale=1):
    """`actual` (of `dtype`) against the float64 oracle within tolerance(dtype, reduced, scale), NaNs
    where the oracle has them. Where torch's own result in `dtype` (torch_result) is further from the
    oracle than the tolerance (rounding the dtype itself forces, e.g. a saved float16 output), pyops
    may be as far as torch is, times 2, and no further."""

    if actual.shape != expected64.shape:
        return failed(what, f"shape {tuple(actual.shape)} != {tuple(expected64.shape)}")
    if actual.dtype != dtype:
        return failed(what, f"dtype {actual.dtype} != {dtype}")
    rtol, atol = tolerance(dtype, reduced, scale)
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        return failed(what, f"NaN at {nan_a.nonzero()[:5].tolist()} vs oracle {nan_e.nonzero()[:5].tolist()}")
    inf_e = e.isinf()
    if not torch.equal(a[inf_e], e[inf_e]):
        return failed(what, "infinities differ from the oracle")
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
        return failed("gradcheck", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return Comparison("gradcheck", 0.0, 0.0)


def labelled(label, comparison):
    """`comparison` with `label` (a sample's, a configuration's) in front of what it names."""
    message = comparison.message and f"{label}: {comparison.message}"
    return dataclasses.replace(comparison, what=f"{label} {comparison.what}", message=message)


def assert_close(actual, expected64, dtype, torch_result=None, what="output", reduced=1, scale=1):
    """compare(), as an assertion."""
    result = compare(actual, expected64, dtype, torch_result, what, reduced, scale)
    assert result.ok, result.message


def layout_differs(y, yt):
    """Whether output y's strides differ from torch's result yt's (where strides mean something: more than
    one element)."""
    return y.numel() > 1 and y.stride() != yt.stride()


# ---- inputs -----------------------------------------------------------------------------------------


def identity(t):
    return t


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def transposed(t):
    return t.t()


@dataclasses.dataclass(frozen=True)
class Sample:
    """An input: `values` as given, or `shape` drawn as randn * 3 in float64; rounded to the dtype,
    moved to the device, then `view` of it is what the op gets (a layout). `kwargs` override the op's
    for this input; `grad_view` lays out the incoming gradient (default: contiguous)."""

    shape: tuple = ()
    view: Callable = identity
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


# ---- the oracle of a one-input op -------------------------------------------------------------------


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
    if out.ok and layout_differs(y, yt):
        out = Comparison("output", math.inf, out.error, f"layout {y.stride()} differs from torch's {yt.stride()}")
    results = [out]
    if y.numel():
        (gx,) = torch.autograd.grad(y, xp, g)
        results.append(compare(gx, gx64, x.dtype, gt, what="gradient", reduced=reduced))
    return results

"""The conv family's spec: conv2d against the reference over its cases (argument forms, layouts, the
fused activations, non-finite values), the cases the Triton interpreter runs, and the case gradcheck
takes (ConvCase, ConvSpec, CONVS)."""

import dataclasses
import math
from typing import Callable, Optional

import torch

from .. import functional as F
from ..backend import current as current_backend
from ..ops.conv import conv2d_reference
from .oracle import DTYPES, Comparison, channels_last, compare, gradcheck, identity, labelled, layout_differs, tolerance
from .spec import spec_table

FAMILY = "conv"


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One convolution: input and weight shapes (drawn as randn, rounded to the dtype), `view` of the
    input as the op gets it (a layout), the bias, and the op's other arguments."""

    input: tuple
    weight: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    bias: bool = True
    view: Callable = identity
    weight_view: Callable = identity
    grad_view: Callable = identity  # the layout of the gradient flowing into the output


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

    @property
    def function(self):
        return self.fn

    @property
    def samples(self):
        return self.cases

    def tolerance(self, dtype, reduced=1):
        return tolerance(dtype, reduced)

    def check(self, dtype, device, seed=0):
        """Every case on the current backend (under the Triton interpreter those of `interpreted`),
        against the oracle: output (values and strides) and the gradients of input, weight and bias."""
        slow = current_backend() == "triton" and torch.device(device).type == "cpu"
        results = [
            labelled(label, c)
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
    if results[0].ok and layout_differs(y, yt):
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
    "channels_last": ConvCase(
        (2, 8, 6, 5), (8, 1, 3, 3), {"groups": 8, "padding": 1}, view=channels_last, grad_view=channels_last
    ),
    "channels_last_strided": ConvCase(
        (1, 20, 7, 9),
        (20, 1, 3, 2),
        {"groups": 20, "stride": 2, "padding": (1, 0), "dilation": (1, 2), "activation": "relu"},
        view=channels_last,
        grad_view=channels_last,
    ),
    # rows of several register blocks of output pixels (and a partial channel vector) in channels_last:
    # stride 1 with dilation and a fused activation, stride 2, and padding beyond the kernel's reach
    "channels_last_wide": ConvCase(
        (2, 12, 5, 11),
        (12, 1, 3, 3),
        {"groups": 12, "padding": 1, "dilation": (1, 2), "activation": "leaky_relu"},
        view=channels_last,
        grad_view=channels_last,
    ),
    "channels_last_stride2": ConvCase(
        (1, 16, 9, 17),
        (16, 1, 3, 3),
        {"groups": 16, "stride": 2, "padding": 1},
        view=channels_last,
        grad_view=channels_last,
    ),
    "channels_last_channels": ConvCase(  # more channels than four vectors: the edge columns' wide path
        (1, 72, 4, 6), (72, 1, 3, 3), {"groups": 72, "padding": 1}, view=channels_last, grad_view=channels_last
    ),
    "channels_last_overpadded": ConvCase(
        (1, 9, 6, 10), (9, 1, 3, 3), {"groups": 9, "padding": 3}, view=channels_last, grad_view=channels_last
    ),
    "weight_cl": ConvCase((2, 4, 5, 6), (6, 2, 3, 3), {"groups": 2, "padding": 1}, weight_view=channels_last),
    "sliced": ConvCase((2, 4, 9, 12), (4, 1, 3, 3), {"groups": 4, "padding": 1}, view=lambda t: t[:, :, ::2, 1:]),
    "wide": ConvCase((1, 2, 4, 75), (2, 1, 3, 5), {"groups": 2, "padding": (1, 2)}),
    "relu": ConvCase((2, 4, 6, 6), (4, 1, 3, 3), {"groups": 4, "padding": 1, "activation": "relu"}),
    "leaky_relu": ConvCase((2, 4, 5, 6), (8, 2, 3, 3), {"groups": 2, "activation": "leaky_relu", "padding": 1}),
    "elu": ConvCase((1, 4, 6, 5), (4, 4, 3, 3), {"stride": 2, "activation": "elu"}),
    "empty": ConvCase((0, 4, 5, 5), (4, 1, 3, 3), {"groups": 4}),
    "grouped_channels_last": ConvCase((2, 8, 5, 6), (8, 4, 3, 3), {"groups": 2, "padding": 1}, view=channels_last),
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

CONVS = spec_table(
    ConvSpec(
        FAMILY,
        "conv2d",
        F.conv2d,
        conv2d_reference,
        CONV_CASES,
        interpreted=CONV_INTERPRETED,
        gradcheck_case=CONV_GRADCHECK,
    ),
)

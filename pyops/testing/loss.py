"""The loss family's spec: per loss (l1, mse, huber, rmse, cross_entropy) the pyops function against
torch's over its samples and every reduction (LossSpec, LOSSES)."""

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as TF

from .. import functional as F
from .oracle import DTYPES, channels_last, compare, identity, labelled, tolerance, transposed
from .spec import spec_table

FAMILY = "loss"


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

    @property
    def function(self):
        return self.fn

    def tolerance(self, dtype, reduced=1):
        return tolerance(dtype, reduced)

    def check(self, dtype, device, seed=0):
        generator = torch.Generator().manual_seed(seed)
        results = []
        for label, make in self.samples.items():
            x, t, kw = make(dtype, device, generator)
            for reduction in ("none", "mean", "sum"):
                kwargs = {**self.kwargs, **kw, "reduction": reduction}
                results += [labelled(f"{label} {reduction}", c) for c in compare_loss(self, x, t, kwargs, generator)]
        return results


def _regression_pair(shape, target_shape=None, view=identity):
    def make(dtype, device, generator):
        x = (torch.randn(shape, dtype=torch.float64, generator=generator) * 3).to(dtype).to(device)
        t = (torch.randn(target_shape or shape, dtype=torch.float64, generator=generator) * 3).to(dtype).to(device)
        return view(x), view(t), {}

    return make


REGRESSION_SAMPLES = {
    "odd": _regression_pair((13, 9)),
    "chunks": _regression_pair((2, 8200)),
    "transposed": _regression_pair((9, 21), view=transposed),
    "channels_last": _regression_pair((2, 5, 3, 7), view=channels_last),
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
    from ..ops.loss import rmse_reference

    return rmse_reference(input, target, reduction, eps)


LOSSES = spec_table(
    LossSpec(FAMILY, "l1_loss", F.l1_loss, TF.l1_loss, {}, REGRESSION_SAMPLES),
    LossSpec(FAMILY, "mse_loss", F.mse_loss, TF.mse_loss, {}, REGRESSION_SAMPLES),
    LossSpec(FAMILY, "huber_loss", F.huber_loss, TF.huber_loss, {"delta": 0.8}, REGRESSION_SAMPLES),
    LossSpec(FAMILY, "rmse_loss", F.rmse_loss, _rmse_reference, {}, REGRESSION_SAMPLES),
    LossSpec(FAMILY, "cross_entropy", F.cross_entropy, TF.cross_entropy, {}, CROSS_ENTROPY_SAMPLES, target_grad=False),
)

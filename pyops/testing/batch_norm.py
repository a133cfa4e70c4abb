"""The batch_norm family's spec: each configuration of pyops.functional.batch_norm (training or eval, the
fused residual and activation, the memory-efficient form, without weight and bias) against the torch
composite, over its samples (BatchNormSpec, BATCH_NORMS)."""

import dataclasses
import math

import torch
import torch.nn.functional as TF

from .. import functional as F
from .oracle import DTYPES, TOL, Comparison, Sample, channels_last, compare, labelled, layout_differs, tolerance
from .spec import spec_table

FAMILY = "batch_norm"


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
    "channels_last": Sample((3, 5, 4, 6), channels_last),
    "channels_last_grad": Sample((2, 19, 3, 3), channels_last, grad_view=channels_last),
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
    "empty_channels_last": Sample((0, 3, 2, 2), channels_last),
    "nonfinite": Sample((3, 4, 5), _nonfinite_channels),
    "nonfinite_channels_last": Sample((3, 4, 2, 3), lambda t: channels_last(_nonfinite_channels(t))),
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

    @property
    def function(self):
        return F.batch_norm

    @property
    def reference(self):
        """The torch composite: torch's batch_norm, + residual, activation."""
        from ..ops.batch_norm import batch_norm_reference

        return batch_norm_reference

    def tolerance(self, dtype, reduced=1):
        return tolerance(dtype, reduced)

    def check(self, dtype, device, seed=0):
        """Every sample on the current backend, against the oracle: the output, the running statistics and
        every gradient."""
        return [
            labelled(label, c)
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
    from ..ops.batch_norm import batch_norm_reference

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
    if out.ok and layout_differs(y, yt):
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
    from ..ops.batch_norm import batch_norm_reference

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
    return BatchNormSpec(FAMILY, name, kwargs, residual, affine, running, samples, dtypes)


BATCH_NORMS = spec_table(
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

"""The batch_norm family's primitives: fake kernels, the Triton launch ops, and the torch reference.

Math, per channel c over the batch and spatial positions (M values each):
  training: mean = sum(x) / M, var = sum((x - mean)^2) / M (biased, normalizes);
            running_mean <- (1 - m) running_mean + m mean, running_var <- (1 - m) running_var + m var M / (M - 1)
  eval:     mean, var = running_mean, running_var
  xhat = (x - mean) / sqrt(var + eps),  z = w xhat + b + r,  y = act(z)   (act: none, relu, leaky_relu, elu)
  backward: dz = g act'(z), read from y (relu: y > 0; leaky_relu: y > 0 ? 1 : slope; elu: y > 0 ? 1 : y + alpha)
            db = sum(dz), dw = sum(dz xhat), dr = dz,
            dx = w invstd (dz - mean(dz) - xhat mean(dz xhat)) in training, w invstd dz in eval.
  memory-efficient form: y (and r) saved instead of x; xhat = (act^-1(y) - r - b) / w
            (leaky_relu: y > 0 ? y : y / slope; elu: y > 0 ? y : log1p(y / alpha)).

The primitives (pyops::batch_norm_* and their Triton twins, csrc/primitives.h) share the host side
csrc/batch_norm.h; the derivative is csrc/autograd/batch_norm.cpp. Statistics are float32 (float64
for float64 input); outputs and gradients keep the input's layout when it is channels_last, else
are contiguous, as torch's.
"""

import torch
import torch.nn.functional as TF

from . import define_launch, register_fake

# ---- fake (meta) kernels: the layouts csrc/batch_norm.h gives --------------------------------------


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _working(t):
    """An empty tensor laid out as the kernels' working copy of t (channels_last kept, else contiguous)."""
    try:
        from torch._prims_common import suggest_memory_format

        fmt = suggest_memory_format(t)
    except ImportError:  # pragma: no cover
        fmt = torch.contiguous_format
    if fmt == torch.preserve_format or t.dim() < 2 or t.shape[1] == 1:
        fmt = torch.contiguous_format
    return torch.empty_like(t, memory_format=fmt)


def _channels(t):
    torch._check(t.dim() >= 2, lambda: f"pyops::batch_norm: input must have at least 2 dimensions, got {t.dim()}")
    return t.shape[1]


def _fake_stats(input):
    c = _channels(input)
    return input.new_empty((c,), dtype=_opmath(input.dtype)), input.new_empty((c,), dtype=_opmath(input.dtype))


def _fake_elemt(input, mean, invstd, weight, bias, residual, activation, param):
    _channels(input)
    return _working(input)


def _reference_of(input, output):
    return input if input is not None else output


def _fake_bwd_reduce(grad_out, input, output, residual, mean, invstd, weight, bias, activation, param, grad_residual):
    ref = _reference_of(input, output)
    c = _channels(ref)
    opmath = _opmath(ref.dtype)
    gr = _working(ref) if grad_residual else ref.new_empty((0,))
    return ref.new_empty((c,), dtype=opmath), ref.new_empty((c,), dtype=opmath), gr


def _fake_bwd_elemt(
    grad_out, input, output, residual, mean, invstd, weight, bias, mean_dz, mean_dz_xhat, activation, param
):
    ref = _reference_of(input, output)
    _channels(ref)
    return _working(ref)


def _fake_bwd(grad_out, input, output, residual, mean, invstd, weight, bias, activation, param, grad_residual):
    ref = _reference_of(input, output)
    c = _channels(ref)
    opmath = _opmath(ref.dtype)
    gr = _working(ref) if grad_residual else ref.new_empty((0,))
    return _working(ref), ref.new_empty((c,), dtype=opmath), ref.new_empty((c,), dtype=opmath), gr


FAKES = {
    "batch_norm_stats": _fake_stats,
    "batch_norm_elemt": _fake_elemt,
    "batch_norm_bwd_reduce": _fake_bwd_reduce,
    "batch_norm_bwd_elemt": _fake_bwd_elemt,
    "batch_norm_bwd": _fake_bwd,
}
for _name, _fake in FAKES.items():
    register_fake(_name, _fake)


@torch.library.register_fake("pyops::batch_norm_running_update")
def _fake_running_update(running_mean, running_var, mean, var, momentum, var_factor):
    """The running-average step writes its two buffers in place and returns nothing."""


# ---- the Triton launch ops (csrc/triton/batch_norm.cpp calls them) --------------------------------


def _kernels():
    from ..kernels import batch_norm

    return batch_norm


define_launch(
    "_triton_bn_stats(Tensor x, Tensor(a!) mean, Tensor(b!) var, int outer, int channels, int inner) -> ()",
    lambda: _kernels().stats,
)
define_launch(
    "_triton_bn_elemt(Tensor x, Tensor? residual, Tensor(a!) out, Tensor center, Tensor scale, Tensor shift, "
    "int outer, int channels, int inner, str activation, float param) -> ()",
    lambda: _kernels().elemt,
)
define_launch(
    "_triton_bn_bwd_reduce(Tensor grad, Tensor? input, Tensor? output, Tensor? residual, Tensor center, "
    "Tensor(a!) sum_dz, Tensor(b!) sum_dzv, Tensor(c!)? grad_residual, int outer, int channels, int inner, "
    "str activation, float param, bool from_output) -> ()",
    lambda: _kernels().bwd_reduce,
)
define_launch(
    "_triton_bn_bwd_elemt(Tensor grad, Tensor? input, Tensor? output, Tensor? residual, Tensor center, Tensor a, "
    "Tensor? b, Tensor? c, Tensor(a!) grad_input, int outer, int channels, int inner, str activation, float param, "
    "bool from_output) -> ()",
    lambda: _kernels().bwd_elemt,
)


# ---- the torch reference ---------------------------------------------------------------------------


def batch_norm_reference(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-05,
    *,
    activation=None,
    negative_slope=0.01,
    alpha=1.0,
    residual=None,
    memory_efficient=False,
):
    """act(torch.nn.functional.batch_norm(...) + residual) in plain torch ops."""
    y = TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        return TF.relu(y)
    if activation == "leaky_relu":
        return TF.leaky_relu(y, negative_slope)
    if activation == "elu":
        return TF.elu(y, alpha)
    return y

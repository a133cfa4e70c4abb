"""Drop-in replacements for torch.nn.functional / torch ops, run on the selected backend.

Same signatures, results, gradients, in-place semantics and inf/NaN behaviour as torch for
float64, float32, float16 and bfloat16. Where torch accepts another dtype (relu on integers,
sigmoid/tanh on integers or complex) the call goes to torch itself; where torch has no such op
a TypeError names the op and the dtype.

Each function is one call of a public pyops op (csrc/autograd/<family>.cpp), which picks the
backend (pyops.backend) and differentiates in C++: a pyops call costs what a torch call does.
"""

import numbers
import operator
import warnings

import torch
import torch.nn.functional as _TF

from . import _C
from . import ops as _ops  # noqa: F401  (registers fake kernels and the Triton launch ops)

__all__ = ["relu", "leaky_relu", "elu", "sigmoid", "tanh", "maxout", "batch_norm", "conv2d"]
__all__ += ["conv2d_stats", "batch_norm_given_stats"]
__all__ += ["l1_loss", "mse_loss", "huber_loss", "rmse_loss", "cross_entropy"]

_P = torch.ops.pyops
_compiling = torch.compiler.is_compiling
# Under `auto` (unless autotuning, which measures instead), small CPU inputs go to torch eager
# (csrc/common/backend.h has the rule and the sizes); eager calls decide that here too, so that they
# cost what torch's own call does. (relu, sigmoid and tanh send every dtype no kernel takes to torch
# anyway; leaky_relu and elu check that it is a floating dtype, so that torch never sees what pyops
# refuses.)
_static_auto = _C._auto_static
_MIN = _C.AUTO_MIN_NUMEL
_RELU_MIN, _LEAKY_RELU_MIN, _ELU_MIN = _MIN["relu"], _MIN["leaky_relu"], _MIN["elu"]
_SIGMOID_MIN, _TANH_MIN = _MIN["sigmoid"], _MIN["tanh"]


def _op(name):
    """The public op `name` as eager code calls it: the dispatcher's own callable, ~0.4 us cheaper than
    the OpOverload around it, which torch.compile needs to see (so compiled code takes that)."""
    overload = getattr(_P, name).default
    return overload, overload._op


_relu, _relu_eager = _op("relu")
_relu_, _relu_eager_ = _op("relu_")
_leaky_relu, _leaky_relu_eager = _op("leaky_relu")
_leaky_relu_, _leaky_relu_eager_ = _op("leaky_relu_")
_elu, _elu_eager = _op("elu")
_elu_, _elu_eager_ = _op("elu_")
_sigmoid, _sigmoid_eager = _op("sigmoid")
_tanh, _tanh_eager = _op("tanh")
_maxout, _maxout_eager = _op("maxout")


def _tensor_expected(op, input):
    return TypeError(f"pyops.{op}: input must be a Tensor, got {type(input).__name__}")


def _number(op, name, value):
    """A scalar argument in any form torch's modules accept: Python and numpy numbers, bools and
    one-element tensors."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Real):  # numpy scalars
        return float(value)
    raise TypeError(f"pyops.{op}: {name} must be a number, got {type(value).__name__}")


def _py_relu(input, inplace=False):
    """The Python twin of relu."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("relu", input)
    if _compiling():
        return _relu_(input) if inplace else _relu(input)
    if _static_auto() and input.is_cpu and input.numel() < _RELU_MIN:
        return torch.relu_(input) if inplace else torch.relu(input)
    return _relu_eager_(input) if inplace else _relu_eager(input)


def _py_leaky_relu(input, negative_slope=0.01, inplace=False):
    """The Python twin of leaky_relu."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("leaky_relu", input)
    slope = negative_slope if type(negative_slope) is float else _number("leaky_relu", "negative_slope", negative_slope)
    if _compiling():
        return _leaky_relu_(input, slope) if inplace else _leaky_relu(input, slope)
    if _static_auto() and input.is_cpu and input.numel() < _LEAKY_RELU_MIN and input.is_floating_point():
        return _TF.leaky_relu(input, slope, inplace)
    return _leaky_relu_eager_(input, slope) if inplace else _leaky_relu_eager(input, slope)


def _py_elu(input, alpha=1.0, inplace=False):
    """The Python twin of elu."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("elu", input)
    alpha = alpha if type(alpha) is float else _number("elu", "alpha", alpha)
    if _compiling():
        return _elu_(input, alpha) if inplace else _elu(input, alpha)
    if _static_auto() and input.is_cpu and input.numel() < _ELU_MIN and input.is_floating_point():
        return _TF.elu(input, alpha, inplace)
    return _elu_eager_(input, alpha) if inplace else _elu_eager(input, alpha)


def _py_sigmoid(input):
    """The Python twin of sigmoid."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("sigmoid", input)
    if _compiling():
        return _sigmoid(input)
    if _static_auto() and input.is_cpu and input.numel() < _SIGMOID_MIN:
        return torch.sigmoid(input)
    return _sigmoid_eager(input)


def _py_tanh(input):
    """The Python twin of tanh."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("tanh", input)
    if _compiling():
        return _tanh(input)
    if _static_auto() and input.is_cpu and input.numel() < _TANH_MIN:
        return torch.tanh(input)
    return _tanh_eager(input)


def _py_maxout(input, pieces, dim=1):
    """The Python twin of maxout."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("maxout", input)
    if isinstance(pieces, bool) or not isinstance(pieces, int) or not 1 <= pieces <= 256:
        raise ValueError(
            f"pyops.maxout: pieces must be an int in [1, 256] (indices are saved as uint8), got {pieces!r}"
        )
    return _maxout(input, pieces, dim) if _compiling() else _maxout_eager(input, pieces, dim)


# ---- batch_norm ------------------------------------------------------------------------------------
_batch_norm, _batch_norm_eager = _op("batch_norm")
# The activations batch_norm and conv2d fuse into their epilogue (csrc/common/act.h).
FUSED_ACTIVATIONS = (None, "relu", "leaky_relu", "elu")


def _py_batch_norm(
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
    """The Python twin of batch_norm."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("batch_norm", input)
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"pyops.batch_norm: activation must be one of {FUSED_ACTIVATIONS}, got {activation!r}")
    if training:
        _TF._verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    op = _batch_norm if _compiling() else _batch_norm_eager
    return op(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        activation=activation,
        negative_slope=negative_slope,
        alpha=alpha,
        residual=residual,
        memory_efficient=memory_efficient,
    )


# ---- loss -------------------------------------------------------------------------------------------

_l1_loss, _l1_loss_eager = _op("l1_loss")
_mse_loss, _mse_loss_eager = _op("mse_loss")
_huber_loss, _huber_loss_eager = _op("huber_loss")
_rmse_loss, _rmse_loss_eager = _op("rmse_loss")
_cross_entropy, _cross_entropy_eager = _op("cross_entropy")


def _reduction_enum(op: str, reduction: str) -> int:
    """torch's enum of a reduction string (torch.nn._reduction.get_enum; csrc/loss.h's Reduction is
    numbered the same), and torch's ValueError, naming the op, for any other value. "elementwise_mean"
    is "mean" with torch's deprecation warning. The loss modules' TorchScript forward calls it too,
    which is why the table is a local: TorchScript reads no global list or dict."""
    reductions = ["none", "mean", "sum"]  # the enum is the position
    if reduction == "elementwise_mean":  # stacklevel: the caller of the pyops function (through _reduction)
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel=4)
        reduction = "mean"
    if reduction not in reductions:
        raise ValueError(f"pyops.{op}: {reduction} is not a valid value for reduction")
    return reductions.index(reduction)


def _reduction(op, reduction, size_average=None, reduce=None):
    """torch's reduction enum for a reduction string, or for the deprecated size_average/reduce pair,
    which, as in torch, overrides `reduction` when either is given (with torch's warning)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as legacy

        reduction = legacy.legacy_get_string(size_average, reduce)
    return _reduction_enum(op, reduction)


def _pair(op, input, target):
    """Both tensors; torch's warning where the target's size differs (the two then broadcast)."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected(op, input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"pyops.{op}: target must be a Tensor, got {type(target).__name__}")
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """mean/sum/none of |input - target|; gradient sign(input - target) (0 at zero error), scaled as the
    reduction is. A per-element `weight` goes to torch."""
    if weight is not None:
        return _TF.l1_loss(input, target, size_average, reduce, reduction, weight=weight)
    _pair("l1_loss", input, target)
    r = _reduction("l1_loss", reduction, size_average, reduce)
    return _l1_loss(input, target, r) if _compiling() else _l1_loss_eager(input, target, r)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """mean/sum/none of (input - target)^2; gradient 2 (input - target), scaled as the reduction is. A
    per-element `weight` goes to torch."""
    if weight is not None:
        return _TF.mse_loss(input, target, size_average, reduce, reduction, weight=weight)
    _pair("mse_loss", input, target)
    r = _reduction("mse_loss", reduction, size_average, reduce)
    return _mse_loss(input, target, r) if _compiling() else _mse_loss_eager(input, target, r)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """mean/sum/none of |d| < delta ? d^2 / 2 : delta (|d| - delta / 2), d = input - target; gradient
    clamp(d, -delta, delta). A per-element `weight` goes to torch."""
    if weight is not None:
        return _TF.huber_loss(input, target, reduction, delta, weight=weight)
    _pair("huber_loss", input, target)
    r = _reduction("huber_loss", reduction)
    delta = delta if type(delta) is float else _number("huber_loss", "delta", delta)
    return _huber_loss(input, target, r, delta) if _compiling() else _huber_loss_eager(input, target, r, delta)


def rmse_loss(input, target, reduction="mean", eps=0.0):
    """sqrt(mse_loss(input, target, reduction) + eps) for mean and sum, |input - target| (sqrt(d^2 + eps))
    for none; gradient d mse / d input / (2 rmse), and 0 (never NaN or inf) where the loss is 0."""
    _pair("rmse_loss", input, target)
    r = _reduction("rmse_loss", reduction)
    eps = eps if type(eps) is float else _number("rmse_loss", "eps", eps)
    return _rmse_loss(input, target, r, eps) if _compiling() else _rmse_loss_eager(input, target, r, eps)


def _py_cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    """The Python twin of cross_entropy."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("cross_entropy", input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"pyops.cross_entropy: target must be a Tensor, got {type(target).__name__}")
    r = _reduction("cross_entropy", reduction, size_average, reduce)
    smoothing = (
        label_smoothing
        if type(label_smoothing) is float
        else _number("cross_entropy", "label_smoothing", label_smoothing)
    )
    if _compiling():
        return _cross_entropy(input, target, weight, r, ignore_index, smoothing)
    return _cross_entropy_eager(input, target, weight, r, ignore_index, smoothing)


# The public functions above are C functions (csrc/functional.cpp, where their docstrings state the
# math): a plain call goes straight to the public op, as cheap as torch's own binding. Every other call
# (tensor subclasses, __torch_function__ modes, other argument types, bad input) goes to the Python
# twin, which torch.compile also traces in the C function's place.
_TWINS = {"relu": _py_relu, "leaky_relu": _py_leaky_relu, "elu": _py_elu, "sigmoid": _py_sigmoid, "tanh": _py_tanh}
_TWINS.update(maxout=_py_maxout, batch_norm=_py_batch_norm, cross_entropy=_py_cross_entropy)
_C._set_twins(_TWINS)
relu, leaky_relu, elu, sigmoid, tanh, maxout, batch_norm, cross_entropy = (getattr(_C, name) for name in _TWINS)
for _name, _twin in _TWINS.items():
    torch.compiler.substitute_in_graph(getattr(_C, _name))(_twin)


# ---- conv ---------------------------------------------------------------------------------------------
_conv2d, _conv2d_eager = _op("conv2d")
_conv2d_padding = _P.conv2d.padding
_conv2d_padding_eager = _conv2d_padding._op


def _ints(value):
    """An int argument, or a sequence of them, with every integer form torch's own conv2d takes (numpy
    integers, 0-d integer tensors) as a Python int; anything else as it is (the op then names it)."""
    if type(value) is int or isinstance(value, str):
        return value
    try:
        if isinstance(value, (tuple, list)):
            return [v if type(v) is int else operator.index(v) for v in value]
        return operator.index(value)
    except TypeError:
        return value


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """torch.nn.functional.conv2d, optionally followed by an activation fused into its epilogue:
    out[n, k] = act(bias[k] + sum_{c in k's group} w[k, c] (*) input[n, c]), with `stride`, `padding`
    (ints, pairs, "same" or "valid"), `dilation` and `groups` as in torch; input [N, C, H, W] or
    unbatched [C, H, W]; weight [K, C / groups, kH, kW]. activation: None, "relu", "leaky_relu"
    (negative_slope 0.01) or "elu" (alpha 1.0); relu and leaky_relu save a 1-bit mask for backward."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("conv2d", input)
    stride, padding, dilation, groups = _ints(stride), _ints(padding), _ints(dilation), _ints(groups)
    if isinstance(padding, str):
        op = _conv2d_padding if _compiling() else _conv2d_padding_eager
    else:
        op = _conv2d if _compiling() else _conv2d_eager
    return op(input, weight, bias, stride, padding, dilation, groups, activation=activation)


def conv2d_stats(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d without activation, returning (out, batch_mean, batch_var): out's per-channel mean and
    biased variance over (N, H, W), gathered by the convolution's epilogue on a pyops backend (float32;
    float64 for float64 input), for a batch norm in training to use (batch_norm_given_stats) instead of
    its own pass over out. Where the convolution runs on torch (the `torch` backend, or `auto`'s rule),
    and for an unbatched input, both are empty tensors: the batch norm then computes its own. stride,
    padding (ints or pairs), dilation and groups as in conv2d."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("conv2d_stats", input)
    stride, padding, dilation, groups = _ints(stride), _ints(padding), _ints(dilation), _ints(groups)
    pair = lambda v: [v, v] if isinstance(v, int) else v  # noqa: E731
    return _P.conv2d_stats(input, weight, bias, pair(stride), pair(padding), pair(dilation), groups)


def batch_norm_given_stats(
    input,
    batch_mean,
    batch_var,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    momentum=0.1,
    eps=1e-5,
    *,
    activation=None,
    negative_slope=0.01,
    alpha=1.0,
    residual=None,
    memory_efficient=False,
):
    """batch_norm in training (see batch_norm) with the input's batch statistics given: batch_mean and the
    biased batch_var per channel, as conv2d_stats returns them; they must be the statistics of `input`
    (the result is batch_norm's, derivative included, only then). Empty statistics, or the torch backend,
    compute them as batch_norm does."""
    return _P.batch_norm.given_stats(
        input,
        batch_mean,
        batch_var,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        activation=activation,
        negative_slope=negative_slope,
        alpha=alpha,
        residual=residual,
        memory_efficient=memory_efficient,
    )

"""Drop-in replacements for torch.nn.functional / torch ops, run on the selected backend.

Same signatures, results, gradients, in-place semantics and inf/NaN behaviour as torch for
float64, float32, float16 and bfloat16. Where torch accepts another dtype (relu on integers,
sigmoid/tanh on integers or complex) the call goes to torch itself; where torch has no such op
a TypeError names the op and the dtype.

Each function is one call of a public pyops op (csrc/autograd/<family>.cpp), which picks the
backend (pyops.backend) and differentiates in C++: a pyops call costs what a torch call does.
"""

import numbers

import torch
import torch.nn.functional as _TF

from . import _C
from . import ops as _ops  # noqa: F401  (registers fake kernels and the Triton launch ops)

__all__ = ["relu", "leaky_relu", "elu", "sigmoid", "tanh", "maxout", "conv2d"]

_P = torch.ops.pyops
_compiling = torch.compiler.is_compiling
# Under `auto` (backend id 0), small CPU inputs go to torch eager (csrc/common/backend.h has the rule
# and the sizes); eager calls decide that here too, so that they cost what torch's own call does.
# (relu, sigmoid and tanh send every dtype no kernel takes to torch anyway; leaky_relu and elu check
# that it is a floating dtype, so that torch never sees what pyops refuses.)
_selected = _C._get_backend
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


def relu(input, inplace=False):
    """max(input, 0); gradient g * [input > 0]. Saves a 1-bit mask."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("relu", input)
    if _compiling():
        return _relu_(input) if inplace else _relu(input)
    if not _selected() and input.is_cpu and input.numel() < _RELU_MIN:
        return torch.relu_(input) if inplace else torch.relu(input)
    return _relu_eager_(input) if inplace else _relu_eager(input)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """input > 0 ? input : negative_slope * input; gradient g * (input > 0 ? 1 : negative_slope)."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("leaky_relu", input)
    slope = negative_slope if type(negative_slope) is float else _number("leaky_relu", "negative_slope", negative_slope)
    if _compiling():
        return _leaky_relu_(input, slope) if inplace else _leaky_relu(input, slope)
    if not _selected() and input.is_cpu and input.numel() < _LEAKY_RELU_MIN and input.is_floating_point():
        return _TF.leaky_relu(input, slope, inplace)
    return _leaky_relu_eager_(input, slope) if inplace else _leaky_relu_eager(input, slope)


def elu(input, alpha=1.0, inplace=False):
    """input > 0 ? input : alpha * (exp(input) - 1); gradient g * (input <= 0 ? alpha * exp(input) : 1)."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("elu", input)
    alpha = alpha if type(alpha) is float else _number("elu", "alpha", alpha)
    if _compiling():
        return _elu_(input, alpha) if inplace else _elu(input, alpha)
    if not _selected() and input.is_cpu and input.numel() < _ELU_MIN and input.is_floating_point():
        return _TF.elu(input, alpha, inplace)
    return _elu_eager_(input, alpha) if inplace else _elu_eager(input, alpha)


def sigmoid(input):
    """1 / (1 + exp(-input)); gradient g * y * (1 - y)."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("sigmoid", input)
    if _compiling():
        return _sigmoid(input)
    if not _selected() and input.is_cpu and input.numel() < _SIGMOID_MIN:
        return torch.sigmoid(input)
    return _sigmoid_eager(input)


def tanh(input):
    """tanh(input); gradient g * (1 - y^2)."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("tanh", input)
    if _compiling():
        return _tanh(input)
    if not _selected() and input.is_cpu and input.numel() < _TANH_MIN:
        return torch.tanh(input)
    return _tanh_eager(input)


def maxout(input, pieces, dim=1):
    """output[..., j, ...] = max_k input[..., j * pieces + k, ...]; the gradient goes to the first
    maximal piece. `pieces` (1 to 256) must divide input.size(dim)."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("maxout", input)
    if isinstance(pieces, bool) or not isinstance(pieces, int):
        raise ValueError(
            f"pyops.maxout: pieces must be an int in [1, 256] (indices are saved as uint8), got {pieces!r}"
        )
    return _maxout(input, pieces, dim) if _compiling() else _maxout_eager(input, pieces, dim)


# ---- conv ---------------------------------------------------------------------------------------------
_conv2d, _conv2d_eager = _op("conv2d")
_conv2d_padding = _P.conv2d.padding
_conv2d_padding_eager = _conv2d_padding._op


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """torch.nn.functional.conv2d, optionally followed by an activation fused into its epilogue:
    out[n, k] = act(bias[k] + sum_{c in k's group} w[k, c] (*) input[n, c]), with `stride`, `padding`
    (ints, pairs, "same" or "valid"), `dilation` and `groups` as in torch; input [N, C, H, W] or
    unbatched [C, H, W]; weight [K, C / groups, kH, kW]. activation: None, "relu", "leaky_relu"
    (negative_slope 0.01) or "elu" (alpha 1.0); relu and leaky_relu save a 1-bit mask for backward."""
    if not isinstance(input, torch.Tensor):
        raise _tensor_expected("conv2d", input)
    if isinstance(padding, str):
        op = _conv2d_padding if _compiling() else _conv2d_padding_eager
    else:
        op = _conv2d if _compiling() else _conv2d_eager
    return op(input, weight, bias, stride, padding, dilation, groups, activation=activation)

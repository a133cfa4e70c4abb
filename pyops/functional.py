"""Drop-in replacements for torch.nn.functional / torch ops, run on the selected backend.

Same signatures, results, gradients, in-place semantics and inf/NaN behaviour as torch for
float64, float32, float16 and bfloat16. Where torch accepts another dtype (relu on integers,
sigmoid/tanh on integers or complex) the call goes to torch itself; where torch has no such op
a TypeError names the op and the dtype.
"""
import torch
import torch.nn.functional as F

from .backend import KERNEL_DTYPES, resolve as _resolve
from .ops import activation as _act

__all__ = ["relu", "leaky_relu", "elu", "sigmoid", "tanh", "maxout"]


def _check_tensor(op, input):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"pyops.{op}: input must be a Tensor, got {type(input).__name__}")


def _pick(op, input, torch_takes_other_dtypes):
    """The backend that runs op on input, or "torch" for dtypes only torch handles."""
    _check_tensor(op, input)
    if input.dtype not in KERNEL_DTYPES:
        if torch_takes_other_dtypes:
            return "torch"
        raise TypeError(f"pyops.{op}: input dtype {input.dtype} is not supported; expected float64, "
                        "float32, float16 or bfloat16")
    return _resolve(op, input.device, input.numel())


def _number(op, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"pyops.{op}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def relu(input, inplace=False):
    """max(input, 0); gradient g * [input > 0]. Saves a 1-bit mask."""
    b = _pick("relu", input, True)
    if b == "torch":
        return F.relu(input, inplace=inplace)
    return _act.MaskedActivation.apply(input, None, bool(inplace), b)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """input > 0 ? input : negative_slope * input; gradient g * (input > 0 ? 1 : negative_slope)."""
    b = _pick("leaky_relu", input, False)
    slope = _number("leaky_relu", "negative_slope", negative_slope)
    if b == "torch":
        return F.leaky_relu(input, slope, inplace=inplace)
    return _act.MaskedActivation.apply(input, slope, bool(inplace), b)


def elu(input, alpha=1.0, inplace=False):
    """input > 0 ? input : alpha * (exp(input) - 1); gradient g * (y <= 0 ? y + alpha : 1)."""
    b = _pick("elu", input, False)
    alpha = _number("elu", "alpha", alpha)
    if b == "torch":
        return F.elu(input, alpha, inplace=inplace)
    return _act.ELU.apply(input, alpha, bool(inplace), b)


def sigmoid(input):
    """1 / (1 + exp(-input)); gradient g * y * (1 - y)."""
    b = _pick("sigmoid", input, True)
    if b == "torch":
        return torch.sigmoid(input)
    return _act.Sigmoid.apply(input, b)


def tanh(input):
    """tanh(input); gradient g * (1 - y^2)."""
    b = _pick("tanh", input, True)
    if b == "torch":
        return torch.tanh(input)
    return _act.Tanh.apply(input, b)


def maxout(input, pieces, dim=1):
    """output[..., j, ...] = max_k input[..., j * pieces + k, ...]; the gradient goes to the first
    maximal piece. `pieces` (1 to 256) must divide input.size(dim)."""
    b = _pick("maxout", input, False)
    dim = _act.check_maxout("maxout", input.shape, pieces, dim)
    if b == "torch":
        return _act.maxout_reference(input, pieces, dim)
    return _act.Maxout.apply(input, pieces, dim, b)

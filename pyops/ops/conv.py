"""The conv family's primitives: fake kernels and the Triton launch ops.

Math (groups G; Cg = C / G input and Kg = K / G output channels per group; k in group g = k // Kg):
  out[n, k, oh, ow] = act(bias[k] + sum_{c < Cg, kh, kw} w[k, c, kh, kw]
                          * x[n, g * Cg + c, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw])
  with x zero outside the input; act is none, relu, leaky_relu (negative_slope s) or elu (alpha a).
Gradients (z the pre-activation, gz = g * act'(z): the activation family's backward, from the 1-bit mask
for relu/leaky_relu or from the output for elu):
  dx[n, g * Cg + c, ih, iw] = sum_{k in g, kh, kw: ih = oh * sh - ph + kh * dh, iw = ...} gz[n, k, oh, ow]
                              * w[k, c, kh, kw]
  dw[k, c, kh, kw] = sum_{n, oh, ow} gz[n, k, oh, ow] * x[n, g * Cg + c, oh * sh - ph + kh * dh, ...]
  db[k] = sum_{n, oh, ow} gz[n, k, oh, ow]
conv2d_fwd_stats: out (no activation) with its per-channel mean and biased variance over (n, oh, ow),
  float32 (float64 for float64 input), for the batch norm that follows in training.
The primitives (pyops::conv2d_fwd, conv2d_fwd_stats, conv2d_bwd_input, conv2d_bwd_weight and their Triton twins) are
defined in C++ (csrc/primitives.h), their host side is csrc/conv.h for every backend, their
derivatives csrc/autograd/conv.cpp. The output is channels_last when the input or the weight is (as
torch lays it out); the input gradient takes grad_out's layout; the weight gradient is contiguous.
"""

import torch
from torch._prims_common import suggest_memory_format

from . import define_launch, register_fake

# ---- fake (meta) kernels: the layouts csrc/conv.h gives --------------------------------------------


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check(cond, message):
    torch._check(cond, lambda: f"pyops::{message}")


def _fake_conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, activation, scalar):
    _check(input.dim() == 4 and weight.dim() == 4, "conv2d_fwd: input and weight must be 4-d")
    _check(input.device == weight.device, "conv2d_fwd: input and weight on different devices")
    n, _, h, w = input.shape
    k, _, kh, kw = weight.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    cl = torch.channels_last
    fmt = cl if cl in (suggest_memory_format(input), suggest_memory_format(weight)) else torch.contiguous_format
    out = torch.empty((n, k, oh, ow), dtype=input.dtype, device=input.device, memory_format=fmt)
    masked = activation in (1, 2)
    mask = input.new_empty(((n * k * oh * ow + 7) // 8 if masked else 0,), dtype=torch.uint8)
    return out, mask


def _fake_conv2d_fwd_stats(input, weight, bias, stride, padding, dilation, groups):
    out, _ = _fake_conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, 0, 0.0)
    stat_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    k = weight.shape[0]
    return out, input.new_empty((k,), dtype=stat_dtype), input.new_empty((k,), dtype=stat_dtype)


def _fake_conv2d_bwd_input(grad_out, weight, input_size, stride, padding, dilation, groups):
    _check(grad_out.device == weight.device, "conv2d_bwd_input: grad_out and weight on different devices")
    fmt = suggest_memory_format(grad_out)
    return torch.empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)


def _fake_conv2d_bwd_weight(grad_out, input, weight_size, stride, padding, dilation, groups, bias):
    _check(grad_out.device == input.device, "conv2d_bwd_weight: grad_out and input on different devices")
    gw = grad_out.new_empty(tuple(weight_size))
    return gw, grad_out.new_empty((weight_size[0] if bias else 0,))


FAKES = {
    "conv2d_fwd": _fake_conv2d_fwd,
    "conv2d_fwd_stats": _fake_conv2d_fwd_stats,
    "conv2d_bwd_input": _fake_conv2d_bwd_input,
    "conv2d_bwd_weight": _fake_conv2d_bwd_weight,
}
for _name, _fake in FAKES.items():
    register_fake(_name, _fake)


# ---- the Triton launch ops (csrc/triton/conv.cpp calls them) ---------------------------------------
# shape: N, C, H, W, K, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, groups (csrc/conv.h's ConvShape)


def _kernels():
    from ..kernels import conv

    return conv


define_launch(
    "_triton_conv2d_fwd(Tensor x, Tensor w, Tensor? bias, Tensor(a!) out, int[] shape, int act, float scalar) -> ()",
    lambda: _kernels().conv2d_fwd,
)
define_launch(
    "_triton_conv2d_bwd_input(Tensor grad_out, Tensor w, Tensor(a!) grad_in, int[] shape) -> ()",
    lambda: _kernels().conv2d_bwd_input,
)
define_launch(
    "_triton_conv2d_bwd_weight(Tensor grad_out, Tensor x, Tensor(a!) grad_weight, Tensor(b!) grad_bias, "
    "bool bias, int[] shape) -> ()",
    lambda: _kernels().conv2d_bwd_weight,
)
define_launch("_triton_conv2d_mask(Tensor out, Tensor(a!) mask, int act) -> ()", lambda: _kernels().conv2d_mask)


def conv2d_reference(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """torch's conv2d followed by the activation pyops fuses (torch's default negative_slope / alpha)."""
    y = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, 0.01)
    if activation == "elu":
        return torch.nn.functional.elu(y)
    return y

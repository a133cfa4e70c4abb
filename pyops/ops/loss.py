"""The loss family's primitives: fake kernels and the Triton launch ops.

Math (d = input - target; reductions none / mean (divide by the number of elements) / sum):
  l1_loss     = |d|;                                   d/dinput = sign(d) (0 at zero error)
  mse_loss    = d^2;                                   d/dinput = 2 d
  huber_loss  = |d| < delta ? d^2 / 2 : delta (|d| - delta / 2);   d/dinput = clamp(d, -delta, delta)
  rmse_loss   = sqrt(mse_loss(mean or sum) + eps);     d/dinput = d mse / d input / (2 rmse), 0 where
                rmse = 0; with reduction none |d| (sqrt(d^2 + eps)). d/dtarget = -d/dinput for all four.
  cross_entropy over classes c of each row (dim 1; p = softmax, lse = logsumexp, class weights w,
                smoothing e, C classes): class index t: (1 - e) w_t (lse - x_t) + e / C sum_c w_c (lse - x_c),
                d/dx_c = (1 - e) w_t (p_c - [c = t]) + e / C (p_c sum_k w_k - w_c); probabilities q
                (q' = (1 - e) q + e / C): sum_c w_c q'_c (lse - x_c), d/dx_c = p_c sum_k w_k q'_k - w_c q'_c.
                mean divides by the summed weight of the rows not ignored (class indices) or the rows.

The reduced forms compute the gradient with the loss, in one pass over the data (pointwise_loss_fwd,
cross_entropy_fwd with grad=True): backward then only scales it by the incoming gradient. The
primitives are defined in C++ (csrc/primitives.h), their host side is csrc/loss.h for every backend,
their derivatives csrc/autograd/loss.cpp.
"""

import torch

from . import define_launch, register_fake

NONE, MEAN, SUM = 0, 1, 2


def _same_device(op, a, b):
    torch._check(a.device == b.device, lambda: f"pyops::{op}: tensors on {a.device} and {b.device}")


# ---- fake (meta) kernels: the layouts csrc/loss.h gives --------------------------------------------
def _fake_pointwise_fwd(input, target, kind, reduction, delta, grad):
    _same_device("pointwise_loss_fwd", input, target)
    torch._check(input.shape == target.shape, lambda: "pyops::pointwise_loss_fwd: target has another shape")
    none = input.new_empty((0,))
    if reduction == NONE:
        return torch.empty_like(input), none
    return input.new_empty(()), torch.empty_like(input) if grad else none


def _fake_pointwise_bwd(grad_out, input, target, kind, delta):
    _same_device("pointwise_loss_bwd", input, grad_out)
    return torch.empty_like(input)


def _class_target_shape(shape):
    return () if len(shape) == 1 else (shape[0], *shape[2:])


def _fake_cross_entropy_fwd(input, target, weight, ignore_index, reduction, label_smoothing, grad):
    _same_device("cross_entropy_fwd", input, target)
    torch._check(input.dim() >= 1, lambda: "pyops::cross_entropy_fwd: input must have at least one dimension")
    if reduction == NONE:
        loss = input.new_empty(_class_target_shape(input.shape))
    else:
        loss = input.new_empty(())
    if not grad:
        return loss, input.new_empty((0,))
    if input.dim() <= 2:
        return loss, input.new_empty(input.shape)
    # the rows' layout: classes last, viewed back with classes at dim 1
    moved = (input.shape[0], *input.shape[2:], input.shape[1])
    return loss, input.new_empty(moved).movedim(-1, 1)


FAKES = {
    "pointwise_loss_fwd": _fake_pointwise_fwd,
    "pointwise_loss_bwd": _fake_pointwise_bwd,
    "cross_entropy_fwd": _fake_cross_entropy_fwd,
}
for _name, _fake in FAKES.items():
    register_fake(_name, _fake)


# ---- the Triton launch ops (csrc/triton/loss.cpp calls them) -------------------------------------


def _kernels():
    from ..kernels import loss

    return loss


define_launch(
    "_triton_pointwise_loss(Tensor x, Tensor target, Tensor(a!) out, int kind, float delta) -> ()",
    lambda: _kernels().pointwise,
)
define_launch(
    "_triton_pointwise_loss_bwd(Tensor grad, Tensor x, Tensor target, Tensor(a!) grad_in, int kind, float delta) -> ()",
    lambda: _kernels().pointwise_bwd,
)
define_launch(
    "_triton_pointwise_loss_reduce(Tensor x, Tensor target, Tensor(a!) out, Tensor(b!)? grad, Tensor(c!) partials, "
    "int kind, float delta, float scale) -> ()",
    lambda: _kernels().pointwise_reduce,
)
define_launch(
    "_triton_cross_entropy(Tensor x, Tensor target, Tensor weight, Tensor scale, Tensor(a!) loss_rows, "
    "Tensor(b!)? grad, int ignore_index, float label_smoothing) -> ()",
    lambda: _kernels().cross_entropy,
)


def rmse_reference(input, target, reduction="mean", eps=0.0):
    """The torch composite of rmse_loss: sqrt(mse_loss + eps), |input - target| per element; its
    gradient is 0 where the loss is exactly 0 (the square root sees 1 there), and NaN stays NaN."""
    if reduction == "none":
        if eps == 0:
            return torch.nn.functional.l1_loss(input, target, reduction="none")
        return torch.sqrt(torch.nn.functional.mse_loss(input, target, reduction="none") + eps)
    v = torch.nn.functional.mse_loss(input, target, reduction=reduction) + eps
    zero = v == 0
    return torch.where(zero, torch.zeros_like(v), torch.sqrt(torch.where(zero, torch.ones_like(v), v)))

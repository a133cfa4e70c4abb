"""The activation family's primitives: fake kernels, the Triton launch ops, and the torch reference.

Math (forward; gradient used):
  relu(x)        = x < 0 ? 0 : x (NaN and -0.0 kept);   dx = g * [!(x <= 0)]       (saves a 1-bit mask)
  leaky_relu(x)  = x > 0 ? x : s * x;                   dx = g * ([x > 0] ? 1 : s)  (saves a 1-bit mask)
  elu(x)         = x > 0 ? x : a * (exp(x) - 1);        dx = g * (x <= 0 ? a * exp(x) : 1) (saves x, as
                   torch; in place it saves y: dx = g * (y <= 0 ? y + a : 1), which needs a >= 0)
  sigmoid(x)     = 1 / (1 + exp(-x));                   dx = g * (1 - y) * y      (saves y)
  tanh(x)        = tanh(x);                             dx = g * (1 - y * y)      (saves y)
  maxout(x, k, d)[.., j, ..] = max_i x[.., j*k + i, ..]; dx goes to the first maximal piece
                   (saves uint8 indices); NaN propagates as in torch.max.

The primitives (pyops::<op>_fwd/_bwd and their Triton twins) are defined in C++ (csrc/primitives.h),
their host side is csrc/activation.h for every backend, their derivatives csrc/autograd/activation.cpp.
Masks follow the output's memory order; backward brings grad_out to the output's layout first.
"""

import torch

from . import define_launch, register_fake

# ---- fake (meta) kernels: the layouts csrc/activation.h gives ------------------------------------


def _mask_like(t):
    return t.new_empty(((t.numel() + 7) // 8,), dtype=torch.uint8)


def _same_device(op, a, b):
    torch._check(a.device == b.device, lambda: f"pyops::{op}: tensors on {a.device} and {b.device}")


def _fake_masked_fwd(self, *args):
    return torch.empty_like(self), _mask_like(self)


def _fake_masked_fwd_(self, *args):
    return _mask_like(self)


def _fake_like_first(t, *args):
    return torch.empty_like(t)


def _fake_like_saved(grad_out, saved, *args):
    _same_device("bwd", grad_out, saved)
    return torch.empty_like(saved)


def _fake_masked_bwd(grad_out, mask, *args):
    _same_device("bwd", grad_out, mask)
    return torch.empty_like(grad_out)


def _fake_none(*args):
    return None


def _maxout_shape(shape, pieces, dim, grow):
    torch._check(len(shape) > 0, lambda: "pyops.maxout: input must have at least one dimension")
    dim = dim % len(shape)
    shape = list(shape)
    shape[dim] = shape[dim] * pieces if grow else shape[dim] // pieces
    return shape


def _fake_maxout_fwd(self, pieces, dim):
    shape = _maxout_shape(self.shape, pieces, dim, grow=False)
    return self.new_empty(shape), self.new_empty(shape, dtype=torch.uint8)


def _fake_maxout_bwd(grad_out, indices, pieces, dim):
    _same_device("maxout_bwd", grad_out, indices)
    return grad_out.new_empty(_maxout_shape(grad_out.shape, pieces, dim, grow=True))


FAKES = {
    "relu_fwd": _fake_masked_fwd,
    "relu_fwd_": _fake_masked_fwd_,
    "relu_bwd": _fake_masked_bwd,
    "leaky_relu_fwd": _fake_masked_fwd,
    "leaky_relu_fwd_": _fake_masked_fwd_,
    "leaky_relu_bwd": _fake_masked_bwd,
    "elu_fwd": _fake_like_first,
    "elu_fwd_": _fake_none,
    "elu_bwd": _fake_like_saved,
    "sigmoid_fwd": _fake_like_first,
    "sigmoid_bwd": _fake_like_saved,
    "tanh_fwd": _fake_like_first,
    "tanh_bwd": _fake_like_saved,
    "maxout_fwd": _fake_maxout_fwd,
    "maxout_bwd": _fake_maxout_bwd,
}
for _name, _fake in FAKES.items():
    register_fake(_name, _fake)


# ---- the Triton launch ops (csrc/triton/activation.cpp calls them) -------------------------------


def _kernels():
    from ..kernels import activation

    return activation


define_launch(
    "_triton_masked_fwd(Tensor x, Tensor(a!) out, Tensor(b!) mask, str op, float scalar) -> ()",
    lambda: _kernels().masked_fwd,
)
define_launch(
    "_triton_masked_bwd(Tensor grad, Tensor mask, Tensor(a!) grad_in, str op, float scalar) -> ()",
    lambda: _kernels().masked_bwd,
)
define_launch("_triton_unary(Tensor x, Tensor(a!) out, str op, float scalar) -> ()", lambda: _kernels().unary)
define_launch(
    "_triton_binary_bwd(Tensor grad, Tensor saved, Tensor(a!) grad_in, str op, float scalar) -> ()",
    lambda: _kernels().binary_bwd,
)
define_launch(
    "_triton_maxout_fwd(Tensor x, Tensor(a!) out, Tensor(b!) indices, int inner, int pieces) -> ()",
    lambda: _kernels().maxout_fwd,
)
define_launch(
    "_triton_maxout_bwd(Tensor grad, Tensor indices, Tensor(a!) grad_in, int inner, int pieces) -> ()",
    lambda: _kernels().maxout_bwd,
)


def maxout_reference(x, pieces, dim):
    """The torch composite: torch.max sends the gradient to the first maximal piece."""
    dim = dim % x.dim()
    return x.unflatten(dim, (x.shape[dim] // pieces, pieces)).max(dim + 1).values


# ---- torch.vmap: the elementwise public ops apply to the batched tensor as it is; maxout moves the
# batch dimension first and shifts its own dim past it ---------------------------------------------
def _register_vmap():
    if not hasattr(torch.library, "register_vmap"):  # torch < 2.4: vmap falls back to a loop
        return
    P = torch.ops.pyops

    def elementwise(op):
        def rule(info, in_dims, x, *args):
            return op(x, *args), in_dims[0]

        return rule

    for name in ("relu", "leaky_relu", "elu", "sigmoid", "tanh"):
        op = getattr(P, name).default
        torch.library.register_vmap(op._name, elementwise(op))

    def maxout_rule(info, in_dims, x, pieces, dim=1):
        bdim = in_dims[0]
        if bdim is None:
            return P.maxout.default(x, pieces, dim), None
        x = x.movedim(bdim, 0)
        logical = x.dim() - 1
        if not -logical <= dim < logical:
            raise ValueError(f"pyops.maxout: dim={dim} is out of range for a {logical}-d input")
        return P.maxout.default(x, pieces, dim % logical + 1), 0

    torch.library.register_vmap("pyops::maxout", maxout_rule)


_register_vmap()

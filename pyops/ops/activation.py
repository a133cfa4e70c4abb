"""The activation family's primitive ops per backend, their fake kernels, and autograd functions.

Math (forward; gradient used):
  relu(x)        = max(x, 0), NaN kept;            dx = g * [x > 0]          (saves a 1-bit mask)
  leaky_relu(x)  = x > 0 ? x : s * x;              dx = g * ([x > 0] ? 1 : s) (saves a 1-bit mask)
  elu(x)         = x > 0 ? x : a * (exp(x) - 1);   dx = g * (y <= 0 ? y + a : 1) (saves y; the input x
                   when a < 0, where y no longer tells the branch: dx = g * (x <= 0 ? a * exp(x) : 1))
  sigmoid(x)     = 1 / (1 + exp(-x));              dx = g * (1 - y) * y      (saves y)
  tanh(x)        = tanh(x);                        dx = g * (1 - y * y)      (saves y)
  maxout(x, k, d)[.., j, ..] = max_i x[.., j*k + i, ..]; dx goes to the first maximal piece
                   (saves uint8 indices); NaN propagates as in torch.max.

Native primitives are `pyops::<op>_fwd/_bwd` (schemas in csrc/ops.cpp); the Triton ones are the
same schemas under `pyops::<op>_fwd_triton/_bwd_triton` (in-place forwards end in `_`).
Masks follow the output's memory order; backward brings grad_out to the output's layout first.
"""
import torch

from .. import _C  # noqa: F401  (registers the native pyops:: ops)

KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# ---- fake (meta) kernels, shared by the native and Triton primitives ---------------------------


def _mask_like(t):
    return t.new_empty(((t.numel() + 7) // 8,), dtype=torch.uint8)


def _fake_masked_fwd(self, *args):
    return torch.empty_like(self), _mask_like(self)


def _fake_masked_fwd_(self, *args):
    return _mask_like(self)


def _fake_like_first(t, *args):
    return torch.empty_like(t)


def _fake_like_second(grad_out, saved, *args):
    return torch.empty_like(saved)


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
    return grad_out.new_empty(_maxout_shape(grad_out.shape, pieces, dim, grow=True))


# name -> (schema, fake, names of mutated arguments)
_PRIMITIVES = {
    "relu_fwd": ("(Tensor self) -> (Tensor, Tensor)", _fake_masked_fwd, ()),
    "relu_fwd_": ("(Tensor(a!) self) -> Tensor", _fake_masked_fwd_, ("self",)),
    "relu_bwd": ("(Tensor grad_out, Tensor mask) -> Tensor", _fake_like_first, ()),
    "leaky_relu_fwd": ("(Tensor self, float negative_slope) -> (Tensor, Tensor)", _fake_masked_fwd, ()),
    "leaky_relu_fwd_": ("(Tensor(a!) self, float negative_slope) -> Tensor", _fake_masked_fwd_, ("self",)),
    "leaky_relu_bwd": ("(Tensor grad_out, Tensor mask, float negative_slope) -> Tensor", _fake_like_first, ()),
    "elu_fwd": ("(Tensor self, float alpha) -> Tensor", _fake_like_first, ()),
    "elu_fwd_": ("(Tensor(a!) self, float alpha) -> ()", _fake_none, ("self",)),
    "elu_bwd": ("(Tensor grad_out, Tensor saved, float alpha, bool is_result) -> Tensor", _fake_like_second, ()),
    "sigmoid_fwd": ("(Tensor self) -> Tensor", _fake_like_first, ()),
    "sigmoid_bwd": ("(Tensor grad_out, Tensor out) -> Tensor", _fake_like_second, ()),
    "tanh_fwd": ("(Tensor self) -> Tensor", _fake_like_first, ()),
    "tanh_bwd": ("(Tensor grad_out, Tensor out) -> Tensor", _fake_like_second, ()),
    "maxout_fwd": ("(Tensor self, int pieces, int dim) -> (Tensor, Tensor)", _fake_maxout_fwd, ()),
    "maxout_bwd": ("(Tensor grad_out, Tensor indices, int pieces, int dim) -> Tensor", _fake_maxout_bwd, ()),
}


def check_maxout(op, shape, pieces, dim, divides=True):
    """Validate maxout's arguments for an input of `shape` (a gradient's when not `divides`);
    return dim wrapped to [0, ndim)."""
    if len(shape) == 0:
        raise ValueError(f"pyops.{op}: input must have at least one dimension, got a 0-d tensor")
    if isinstance(pieces, bool) or not isinstance(pieces, int) or not 1 <= pieces <= 256:
        raise ValueError(f"pyops.{op}: pieces must be an int in [1, 256] (indices are saved as uint8), "
                         f"got {pieces!r}")
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"pyops.{op}: dim={dim} is out of range for a {len(shape)}-d input")
    dim %= len(shape)
    if divides and shape[dim] % pieces:
        raise ValueError(f"pyops.{op}: pieces={pieces} does not divide the size of dim {dim} ({shape[dim]})")
    return dim


def _triton_launcher(name):
    """The pyops.kernels.activation launcher behind Triton primitive `name` (imported on first use,
    so that TRITON_INTERPRET is read when the kernels are first needed, and torch without triton works)."""
    base, inplace = (name[:-1], True) if name.endswith("_") else (name, False)

    def launch(*args):
        from ..kernels import activation as K

        fn = getattr(K, base)
        if base == "maxout_fwd":
            x, pieces, dim = args
            return fn(x, pieces, check_maxout(base, x.shape, pieces, dim))
        if base == "maxout_bwd":
            g, idx, pieces, dim = args
            dim = check_maxout(base, g.shape, pieces, dim, divides=False)
            return fn(g, idx, pieces, dim)
        if inplace:
            out = fn(*args, inplace=True)
            return None if base == "elu_fwd" else out[1]
        return fn(*args)

    return launch


def _register():
    native, triton = {}, {}
    for name, (schema, fake, mutates) in _PRIMITIVES.items():
        torch.library.register_fake(f"pyops::{name}")(fake)
        native[name] = getattr(torch.ops.pyops, name).default
        tname = f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton"
        op = torch.library.custom_op(f"pyops::{tname}", _triton_launcher(name), mutates_args=mutates, schema=schema)
        op.register_fake(fake)
        triton[name] = getattr(torch.ops.pyops, tname).default
    return {"native": native, "triton": triton}


PRIMITIVES = _register()  # backend -> primitive name -> op


# ---- autograd ---------------------------------------------------------------------------------


def _dense_stride(t):
    """Strides of the dense layout a kernel uses for t (t's own when t is dense)."""
    return torch.empty_like(t, device="meta").stride()


def _to_layout(g, stride):
    if g.stride() == stride:
        return g
    return torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device).copy_(g)


class MaskedActivation(torch.autograd.Function):
    """relu (negative_slope None) and leaky_relu: saves only the 1-bit mask [x > 0]."""

    @staticmethod
    def forward(ctx, x, negative_slope, inplace, backend):
        ops = PRIMITIVES[backend]
        relu = negative_slope is None
        extra = () if relu else (negative_slope,)
        if inplace:
            ctx.stride = _dense_stride(x)
            mask = ops["relu_fwd_" if relu else "leaky_relu_fwd_"](x, *extra)
            ctx.mark_dirty(x)
            out = x
        else:
            out, mask = ops["relu_fwd" if relu else "leaky_relu_fwd"](x, *extra)
            ctx.stride = out.stride()
        ctx.save_for_backward(mask)
        ctx.extra, ctx.relu, ctx.backend = extra, relu, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        ops = PRIMITIVES[ctx.backend]
        g = _to_layout(grad, ctx.stride)
        gi = ops["relu_bwd" if ctx.relu else "leaky_relu_bwd"](g, mask, *ctx.extra)
        return gi, None, None, None


class ELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, inplace, backend):
        ops = PRIMITIVES[backend]
        if inplace:
            ops["elu_fwd_"](x, alpha)
            ctx.mark_dirty(x)
            out, saved, is_result = x, x, True
        else:
            out = ops["elu_fwd"](x, alpha)
            # y tells the branch (y <= 0) only when alpha >= 0; else keep the input, as torch does.
            saved, is_result = (out, True) if alpha >= 0 else (x, False)
        ctx.save_for_backward(saved)
        ctx.alpha, ctx.is_result, ctx.backend, ctx.inplace = alpha, is_result, backend, inplace
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        if ctx.inplace and ctx.alpha < 0:
            raise RuntimeError(
                "pyops.elu: in-place elu backward calculation is triggered with a negative alpha "
                f"({ctx.alpha}), which is not supported (the input cannot be recovered from the "
                "output); call the out-of-place version instead.")
        gi = PRIMITIVES[ctx.backend]["elu_bwd"](grad, saved, ctx.alpha, ctx.is_result)
        return gi, None, None, None


class _SavesOutput(torch.autograd.Function):
    """sigmoid and tanh: saves the output y, dx = bwd(g, y)."""

    fwd = bwd = None

    @classmethod
    def forward(cls, ctx, x, backend):
        out = PRIMITIVES[backend][cls.fwd](x)
        ctx.save_for_backward(out)
        ctx.backend = backend
        return out

    @classmethod
    @torch.autograd.function.once_differentiable
    def backward(cls, ctx, grad):
        (out,) = ctx.saved_tensors
        return PRIMITIVES[ctx.backend][cls.bwd](grad, out), None


class Sigmoid(_SavesOutput):
    fwd, bwd = "sigmoid_fwd", "sigmoid_bwd"


class Tanh(_SavesOutput):
    fwd, bwd = "tanh_fwd", "tanh_bwd"


class Maxout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pieces, dim, backend):
        out, idx = PRIMITIVES[backend]["maxout_fwd"](x, pieces, dim)
        ctx.save_for_backward(idx)
        ctx.pieces, ctx.dim, ctx.backend = pieces, dim, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return PRIMITIVES[ctx.backend]["maxout_bwd"](grad, idx, ctx.pieces, ctx.dim), None, None, None


def maxout_reference(x, pieces, dim):
    """The torch composite: torch.max sends the gradient to the first maximal piece."""
    return x.unflatten(dim, (x.shape[dim] // pieces, pieces)).max(dim + 1).values

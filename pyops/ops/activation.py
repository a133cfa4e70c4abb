"""The activation family's primitive ops per backend, their fake kernels, and autograd functions.

Math (forward; gradient used):
  relu(x)        = max(x, 0), NaN kept;            dx = g * [!(x <= 0)]      (saves a 1-bit mask)
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

# ---- fake (meta) kernels, shared by the native and Triton primitives ---------------------------


def _mask_like(t):
    return t.new_empty(((t.numel() + 7) // 8,), dtype=torch.uint8)


def _fake_masked_fwd(self, *args):
    return torch.empty_like(self), _mask_like(self)


def _fake_masked_fwd_(self, *args):
    return _mask_like(self)


def _same_device(op, a, b):
    torch._check(a.device == b.device, lambda: f"pyops::{op}: tensors on {a.device} and {b.device}")


def _fake_like_first(t, *args):
    if args and isinstance(args[0], torch.Tensor):
        _same_device("bwd", t, args[0])
    return torch.empty_like(t)


def _fake_like_second(grad_out, saved, *args):
    _same_device("bwd", grad_out, saved)
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
    _same_device("maxout_bwd", grad_out, indices)
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


def _call(op, *args):
    """op(*args) from inside our autograd functions. Without grad recording (forward, and backward
    unless create_graph) it skips the primitives' own Python autograd kernel, ~5 us a call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---- autograd ---------------------------------------------------------------------------------


def _dense_stride(t):
    """Strides of the dense layout a kernel uses for t (t's own when t is dense)."""
    return torch.empty_like(t, device="meta").stride()


def _to_layout(g, stride):
    if g.stride() == stride:
        return g
    return torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device).copy_(g)


def _maxout_gather(gg, idx, pieces, dim):
    """The derivative of maxout_bwd in its gradient: pick each group's chosen piece."""
    groups = gg.unflatten(dim, (gg.shape[dim] // pieces, pieces))
    return groups.gather(dim + 1, idx.long().unsqueeze(dim + 1)).squeeze(dim + 1)


def _register_autograd(ops):
    """Derivatives of one backend's functional primitives, so that each is differentiable on its
    own (opcheck, double backward): forward primitives differentiate through their *_bwd partner,
    *_bwd primitives are linear in grad_out and differentiate in the saved tensor with torch ops."""
    def register(name, setup, backward):
        torch.library.register_autograd(ops[name]._name, backward, setup_context=setup)

    def save_mask(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.stride, ctx.extra = output[0].stride(), tuple(inputs[1:])

    for act in ("relu", "leaky_relu"):
        def fwd_bwd(ctx, g, _g_mask, act=act):
            (mask,) = ctx.saved_tensors
            return (ops[f"{act}_bwd"](_to_layout(g, ctx.stride), mask, *ctx.extra),) + (None,) * len(ctx.extra)

        def save_bwd(ctx, inputs, output):
            ctx.save_for_backward(inputs[1])
            ctx.stride, ctx.extra = output.stride(), tuple(inputs[2:])

        def bwd_bwd(ctx, gg, act=act):
            (mask,) = ctx.saved_tensors
            return (ops[f"{act}_bwd"](_to_layout(gg, ctx.stride), mask, *ctx.extra), None) + (None,) * len(ctx.extra)

        register(f"{act}_fwd", save_mask, fwd_bwd)
        register(f"{act}_bwd", save_bwd, bwd_bwd)

    def save_elu(ctx, inputs, output):
        x, alpha = inputs
        ctx.save_for_backward(output if alpha >= 0 else x)
        ctx.alpha = alpha

    register("elu_fwd", save_elu,
             lambda ctx, g: (ops["elu_bwd"](g, ctx.saved_tensors[0], ctx.alpha, ctx.alpha >= 0), None))

    def save_elu_bwd(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.alpha, ctx.is_result = inputs[2], inputs[3]

    def elu_bwd_bwd(ctx, gg):
        g, s = ctx.saved_tensors
        d_s = gg * g if ctx.is_result else gg * g * ctx.alpha * s.exp()
        return (ops["elu_bwd"](gg, s, ctx.alpha, ctx.is_result), torch.where(s <= 0, d_s, 0), None, None)

    register("elu_bwd", save_elu_bwd, elu_bwd_bwd)

    def save_out(ctx, inputs, output):
        ctx.save_for_backward(output)

    def save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    register("sigmoid_fwd", save_out, lambda ctx, g: ops["sigmoid_bwd"](g, ctx.saved_tensors[0]))
    register("tanh_fwd", save_out, lambda ctx, g: ops["tanh_bwd"](g, ctx.saved_tensors[0]))
    register("sigmoid_bwd", save_inputs, lambda ctx, gg: (
        ops["sigmoid_bwd"](gg, ctx.saved_tensors[1]), gg * ctx.saved_tensors[0] * (1 - 2 * ctx.saved_tensors[1])))
    register("tanh_bwd", save_inputs, lambda ctx, gg: (
        ops["tanh_bwd"](gg, ctx.saved_tensors[1]), -2 * gg * ctx.saved_tensors[0] * ctx.saved_tensors[1]))

    def save_maxout(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.pieces, ctx.dim = inputs[1], inputs[2] % inputs[0].dim()

    def save_maxout_bwd(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.pieces, ctx.dim = inputs[2], inputs[3] % inputs[0].dim()

    register("maxout_fwd", save_maxout, lambda ctx, g, _gi: (
        ops["maxout_bwd"](g, ctx.saved_tensors[0], ctx.pieces, ctx.dim), None, None))
    register("maxout_bwd", save_maxout_bwd, lambda ctx, gg: (
        _maxout_gather(gg, ctx.saved_tensors[0], ctx.pieces, ctx.dim), None, None, None))


for _ops in PRIMITIVES.values():
    _register_autograd(_ops)


class MaskedActivation(torch.autograd.Function):
    """relu (negative_slope None) and leaky_relu: saves only the 1-bit mask [x > 0]."""

    @staticmethod
    def forward(ctx, x, negative_slope, inplace, backend):
        ops = PRIMITIVES[backend]
        relu = negative_slope is None
        extra = () if relu else (negative_slope,)
        if inplace:
            ctx.stride = _dense_stride(x)
            mask = _call(ops["relu_fwd_" if relu else "leaky_relu_fwd_"], x, *extra)
            ctx.mark_dirty(x)
            out = x
        else:
            out, mask = _call(ops["relu_fwd" if relu else "leaky_relu_fwd"], x, *extra)
            ctx.stride = out.stride()
        ctx.save_for_backward(mask)
        ctx.extra, ctx.relu, ctx.backend = extra, relu, backend
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        ops = PRIMITIVES[ctx.backend]
        g = _to_layout(grad, ctx.stride)
        gi = _call(ops["relu_bwd" if ctx.relu else "leaky_relu_bwd"], g, mask, *ctx.extra)
        return gi, None, None, None


class ELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, inplace, backend):
        ops = PRIMITIVES[backend]
        if inplace:
            _call(ops["elu_fwd_"], x, alpha)
            ctx.mark_dirty(x)
            out, saved, is_result = x, x, True
        else:
            out = _call(ops["elu_fwd"], x, alpha)
            # y tells the branch (y <= 0) only when alpha >= 0; else keep the input, as torch does.
            saved, is_result = (out, True) if alpha >= 0 else (x, False)
        ctx.save_for_backward(saved)
        ctx.alpha, ctx.is_result, ctx.backend, ctx.inplace = alpha, is_result, backend, inplace
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        if ctx.inplace and ctx.alpha < 0:
            raise RuntimeError(
                "pyops.elu: in-place elu backward calculation is triggered with a negative alpha "
                f"({ctx.alpha}), which is not supported (the input cannot be recovered from the "
                "output); call the out-of-place version instead.")
        gi = _call(PRIMITIVES[ctx.backend]["elu_bwd"], grad, saved, ctx.alpha, ctx.is_result)
        return gi, None, None, None


def _saves_output(name, fwd, bwd):
    """The autograd function of an op that saves its output y: dx = bwd(g, y) (sigmoid, tanh)."""

    def forward(ctx, x, backend):
        out = _call(PRIMITIVES[backend][fwd], x)
        ctx.save_for_backward(out)
        ctx.backend = backend
        return out

    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return _call(PRIMITIVES[ctx.backend][bwd], grad, out), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


Sigmoid = _saves_output("Sigmoid", "sigmoid_fwd", "sigmoid_bwd")
Tanh = _saves_output("Tanh", "tanh_fwd", "tanh_bwd")


class Maxout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pieces, dim, backend):
        out, idx = _call(PRIMITIVES[backend]["maxout_fwd"], x, pieces, dim)
        ctx.save_for_backward(idx)
        ctx.pieces, ctx.dim, ctx.backend = pieces, dim, backend
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return _call(PRIMITIVES[ctx.backend]["maxout_bwd"], grad, idx, ctx.pieces, ctx.dim), None, None, None


def maxout_reference(x, pieces, dim):
    """The torch composite: torch.max sends the gradient to the first maximal piece."""
    dim = dim % x.dim()
    return x.unflatten(dim, (x.shape[dim] // pieces, pieces)).max(dim + 1).values

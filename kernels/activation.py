"""Triton kernels of the activation family and their launchers (tensors in, tensors out).

Elementwise kernels walk memory order: the launchers lay the output out as torch's elementwise ops
do (`dense_like`) and bring inputs to that layout. Half types compute in float32, float64 stays
float64. Everything here runs under TRITON_INTERPRET=1 too: no libdevice, so tanh and expm1 are
built from `tl.exp` with a short Taylor series near zero, where `exp(x) - 1` would cancel.
"""
import numpy as np
import torch
import triton
import triton.language as tl

# Elementwise programs cover BYTES mask bytes = 8 * BYTES elements.
BYTES: tl.constexpr = tl.constexpr(128)
# Below this |x|, tanh and expm1 use their Taylor series: the truncation error there is under
# 1e-12 relative, and above it exp-based formulas lose at most ~3 bits to cancellation.
SERIES_BELOW: tl.constexpr = tl.constexpr(0.15)


def dense_like(x):
    """(input in the output's layout, output): torch's empty_like keeps a dense input's strides."""
    out = torch.empty_like(x)
    return (x if x.stride() == out.stride() else out.copy_(x)), out


def inplace_target(x, inplace):
    """(kernel input, kernel output, finish): in place, the kernel writes over a dense x (a dense
    copy of it otherwise, which finish() copies back); finish() returns what the op returns."""
    src, out = dense_like(x)
    if not inplace:
        return src, out, lambda: out
    return src, src, lambda: x if src is x else x.copy_(src)


def _compute_dtype(t):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def split_scalar(v):
    """v as hi + lo, both exact in float32: compiled Triton passes Python floats as float32, and
    hi + lo, summed in float64 inside the kernel, keeps ~48 bits of v for float64 tensors."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def _grid(n):
    return (triton.cdiv(triton.cdiv(n, 8), BYTES.value),)


# Compiled Triton materialises Python float literals as float32, so the series below use only
# integers exact in float32 and divide in the compute dtype (float64 keeps its precision).
@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    x2 = x * x
    # x (1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925), Horner from the inside
    p = x2 * -1382.0 / 155925.0
    p = x2 * (62.0 + 2835.0 * p) / 2835.0
    p = x2 * (-17.0 + 315.0 * p) / 315.0
    p = x2 * (2.0 + 15.0 * p) / 15.0
    p = x2 * (-1.0 + 3.0 * p) / 3.0
    series = x * (1.0 + p)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(ax < SERIES_BELOW, series, tl.where(x < 0, -t, t))


@triton.jit
def _expm1(x):
    # x (1 + x/2 + x^2/6 + ... + x^7/40320), Horner from the inside
    p = x / 40320.0
    p = x * (1.0 + 5040.0 * p) / 5040.0
    p = x * (1.0 + 720.0 * p) / 720.0
    p = x * (1.0 + 120.0 * p) / 120.0
    p = x * (1.0 + 24.0 * p) / 24.0
    p = x * (1.0 + 6.0 * p) / 6.0
    p = x * (1.0 + 2.0 * p) / 2.0
    series = x * (1.0 + p)
    return tl.where(tl.abs(x) < SERIES_BELOW, series, tl.exp(x) - 1.0)


@triton.jit
def _offsets_2d(n):
    """Element offsets of this program as [BYTES, 8] (row b = mask byte b), int64, and their mask."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BYTES + tl.arange(0, BYTES)
    offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    return rows, offs, offs < n


# ---- ReLU / LeakyReLU with a 1-bit mask ---------------------------------------------------------
@triton.jit
def _masked_fwd_kernel(x_ptr, out_ptr, mask_ptr, n, slope_hi, slope_lo, IS_RELU: tl.constexpr,
                       COMPUTE: tl.constexpr):
    rows, offs, inb = _offsets_2d(n)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    # pos: where the gradient flows unchanged, as torch decides it: relu's backward tests the
    # output (NaN passes, and stays NaN), leaky_relu's the input (NaN takes the slope).
    if IS_RELU:
        pos = (x <= 0) == 0
        neg = tl.zeros_like(x)
    else:
        pos = x > 0
        neg = x * (tl.cast(slope_hi, COMPUTE) + tl.cast(slope_lo, COMPUTE))
    tl.store(out_ptr + offs, tl.where(pos, x, neg).to(out_ptr.dtype.element_ty), mask=inb)
    bits = tl.sum(pos.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
    tl.store(mask_ptr + rows, bits.to(tl.uint8), mask=rows < tl.cdiv(n, 8))


@triton.jit
def _masked_bwd_kernel(g_ptr, mask_ptr, gi_ptr, n, slope_hi, slope_lo, IS_RELU: tl.constexpr,
                       COMPUTE: tl.constexpr):
    rows, offs, inb = _offsets_2d(n)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    bits = tl.load(mask_ptr + rows, mask=rows < tl.cdiv(n, 8), other=0).to(tl.int32)
    pos = ((bits[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
    if IS_RELU:
        neg = tl.zeros_like(g)
    else:
        neg = g * (tl.cast(slope_hi, COMPUTE) + tl.cast(slope_lo, COMPUTE))
    tl.store(gi_ptr + offs, tl.where(pos, g, neg).to(gi_ptr.dtype.element_ty), mask=inb)


def _masked_fwd(x, slope, is_relu, inplace):
    src, out, finish = inplace_target(x, inplace)
    n = x.numel()
    mask = torch.empty(triton.cdiv(n, 8), dtype=torch.uint8, device=x.device)
    if n:
        _masked_fwd_kernel[_grid(n)](src, out, mask, n, *split_scalar(slope), IS_RELU=is_relu,
                                     COMPUTE=_compute_dtype(x))
    return finish(), mask


def _masked_bwd(grad_out, mask, slope, is_relu):
    g, gi = dense_like(grad_out)
    n = g.numel()
    if n:
        _masked_bwd_kernel[_grid(n)](g, mask, gi, n, *split_scalar(slope), IS_RELU=is_relu,
                                     COMPUTE=_compute_dtype(g))
    return gi


def relu_fwd(x, inplace=False):
    return _masked_fwd(x, 0.0, True, inplace)


def relu_bwd(grad_out, mask):
    return _masked_bwd(grad_out, mask, 0.0, True)


def leaky_relu_fwd(x, negative_slope, inplace=False):
    return _masked_fwd(x, negative_slope, False, inplace)


def leaky_relu_bwd(grad_out, mask, negative_slope):
    return _masked_bwd(grad_out, mask, negative_slope, False)


# ---- ELU, sigmoid, tanh ------------------------------------------------------------------------
ELU, SIGMOID, TANH = 0, 1, 2
ELU_RESULT, ELU_INPUT, SIGMOID_BWD, TANH_BWD = 0, 1, 2, 3


@triton.jit
def _unary_kernel(x_ptr, out_ptr, n, alpha_hi, alpha_lo, OP: tl.constexpr, COMPUTE: tl.constexpr):
    _, offs, inb = _offsets_2d(n)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    alpha = tl.cast(alpha_hi, COMPUTE) + tl.cast(alpha_lo, COMPUTE)
    if OP == 0:  # ELU
        y = tl.where(x > 0, x, alpha * _expm1(x))
    elif OP == 1:  # SIGMOID
        y = 1.0 / (1.0 + tl.exp(-x))
    else:  # TANH
        y = _tanh(x)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _binary_bwd_kernel(g_ptr, s_ptr, gi_ptr, n, alpha_hi, alpha_lo, OP: tl.constexpr, COMPUTE: tl.constexpr):
    _, offs, inb = _offsets_2d(n)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    alpha = tl.cast(alpha_hi, COMPUTE) + tl.cast(alpha_lo, COMPUTE)
    s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    if OP == 0:  # ELU from its output: out + alpha where out <= 0
        gi = tl.where(s <= 0, g * (s + alpha), g)
    elif OP == 1:  # ELU from its input
        gi = tl.where(s <= 0, g * alpha * tl.exp(s), g)
    elif OP == 2:  # SIGMOID
        gi = g * (1.0 - s) * s
    else:  # TANH
        gi = g * (1.0 - s * s)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=inb)


def _unary(x, op, alpha=0.0, inplace=False):
    src, out, finish = inplace_target(x, inplace)
    n = x.numel()
    if n:
        _unary_kernel[_grid(n)](src, out, n, *split_scalar(alpha), OP=op, COMPUTE=_compute_dtype(x))
    return finish()


def _binary_bwd(grad_out, saved, op, alpha=0.0):
    s, gi = dense_like(saved)
    g = grad_out if grad_out.stride() == gi.stride() else torch.empty_like(gi).copy_(grad_out)  # gi's layout
    n = g.numel()
    if n:
        _binary_bwd_kernel[_grid(n)](g, s, gi, n, *split_scalar(alpha), OP=op, COMPUTE=_compute_dtype(g))
    return gi


def elu_fwd(x, alpha, inplace=False):
    return _unary(x, ELU, alpha, inplace)


def elu_bwd(grad_out, saved, alpha, is_result):
    return _binary_bwd(grad_out, saved, ELU_RESULT if is_result else ELU_INPUT, alpha)


def sigmoid_fwd(x):
    return _unary(x, SIGMOID)


def sigmoid_bwd(grad_out, out):
    return _binary_bwd(grad_out, out, SIGMOID_BWD)


def tanh_fwd(x):
    return _unary(x, TANH)


def tanh_bwd(grad_out, out):
    return _binary_bwd(grad_out, out, TANH_BWD)


# ---- Maxout ------------------------------------------------------------------------------------
MAXOUT_BLOCK = 512  # output elements per program


@triton.jit
def _maxout_fwd_kernel(x_ptr, out_ptr, idx_ptr, count, inner, pieces, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = e < count
    grp = e // inner
    src = grp * pieces * inner + (e - grp * inner)
    best = tl.load(x_ptr + src, mask=inb, other=0.0)
    bi = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(1, pieces):
        v = tl.load(x_ptr + src + k * inner, mask=inb, other=0.0)
        take = (v > best) | ((v != v) & (best == best))  # first maximum; NaN propagates
        best = tl.where(take, v, best)
        bi = tl.where(take, k, bi)
    tl.store(out_ptr + e, best, mask=inb)
    tl.store(idx_ptr + e, bi.to(tl.uint8), mask=inb)


@triton.jit
def _maxout_bwd_kernel(g_ptr, idx_ptr, gi_ptr, count, inner, pieces, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = e < count
    grp = e // inner
    dst = grp * pieces * inner + (e - grp * inner)
    g = tl.load(g_ptr + e, mask=inb, other=0.0)
    bi = tl.load(idx_ptr + e, mask=inb, other=0).to(tl.int32)
    for k in range(0, pieces):
        tl.store(gi_ptr + dst + k * inner, tl.where(bi == k, g, tl.zeros_like(g)), mask=inb)


def _maxout_inner(shape, dim):
    inner = 1
    for s in shape[dim + 1:]:
        inner *= s
    return inner


def maxout_fwd(x, pieces, dim):
    """Assumes checked arguments (dim wrapped, pieces divides x.shape[dim])."""
    shape = list(x.shape)
    shape[dim] //= pieces
    x = x.contiguous()
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    idx = torch.empty(shape, dtype=torch.uint8, device=x.device)
    count = out.numel()
    if count:
        grid = (triton.cdiv(count, MAXOUT_BLOCK),)
        _maxout_fwd_kernel[grid](x, out, idx, count, _maxout_inner(shape, dim), pieces, BLOCK=MAXOUT_BLOCK)
    return out, idx


def maxout_bwd(grad_out, indices, pieces, dim):
    shape = list(grad_out.shape)
    shape[dim] *= pieces
    g = grad_out.contiguous()
    gi = torch.empty(shape, dtype=g.dtype, device=g.device)
    count = g.numel()
    if count:
        grid = (triton.cdiv(count, MAXOUT_BLOCK),)
        _maxout_bwd_kernel[grid](g, indices.contiguous(), gi, count, _maxout_inner(shape, dim), pieces,
                                 BLOCK=MAXOUT_BLOCK)
    return gi

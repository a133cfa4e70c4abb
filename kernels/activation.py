"""Triton kernels of the activation family and their launchers.

The launchers are pure kernels: the host side (argument checks, output allocation, layout, in-place
rules) lives in C++ (csrc/activation.h) for every backend. A launcher receives checked, allocated
tensors on one device and only launches; it returns None. Elementwise launchers walk `numel`
elements in memory order from each data pointer: their tensors are non-overlapping and dense with
identical strides (channels_last and transposed layouts included), and `out` may be `x` itself
(in place). Masks are contiguous uint8, bit i % 8 of byte i // 8 for element i.

Half types compute in float32, float64 stays float64. Everything here also runs under
TRITON_INTERPRET=1: no libdevice, so tanh and expm1 are built from `tl.exp` with a short Taylor
series near zero, where `exp(x) - 1` would cancel. relu, leaky_relu and elu are the fused
activation's math (kernels/_common.py), which batch_norm and conv apply in their epilogues. Every
global a kernel reads is a `tl.constexpr` (compiled Triton refuses plain module globals), and every
offset is int64.
"""

import triton
import triton.language as tl

from ._common import (
    DTYPES,
    INT_FORMS,
    SERIES_BELOW,
    compute_dtype,
    elu,
    elu_grad,
    f64,
    f64_halves,
    int_args,
    leaky_relu,
    leaky_relu_passes,
    relu,
    relu_passes,
)

# Elementwise programs cover BYTES mask bytes = BITS * BYTES elements.
BYTES: tl.constexpr = tl.constexpr(128)
BITS: tl.constexpr = tl.constexpr(8)
# Maxout output elements per program: one a thread at 4 warps, each reading its `pieces` inputs, so that
# 1M outputs (a 4M-element input) make 8,192 programs, ~4 waves on an H100 (512 made 0.97).
MAXOUT_BLOCK: tl.constexpr = tl.constexpr(128)
# What tools/launch_plan.py lets stay under 2 waves on an H100, and why.
_STREAMING = (
    "streaming, 8 elements a thread with their loads in flight: under 4.3M elements the launch is under 2 "
    "waves (4M: 1.94, its last wave 94% full), and every SM already holds more loads in flight than its share "
    "of memory bandwidth needs; smaller programs would add scheduling, not bandwidth (unmeasured on a GPU)"
)
LAUNCH_EXEMPTIONS = dict.fromkeys(
    ("_masked_fwd_kernel", "_masked_bwd_kernel", "_unary_kernel", "_binary_bwd_kernel"), _STREAMING
)

# Op selectors, one value each across the family, so that a selector handed to the wrong kernel
# matches no branch and fails to compile instead of running another op.
OP_RELU: tl.constexpr = tl.constexpr(0)
OP_LEAKY_RELU: tl.constexpr = tl.constexpr(1)
OP_ELU: tl.constexpr = tl.constexpr(2)
OP_SIGMOID: tl.constexpr = tl.constexpr(3)
OP_TANH: tl.constexpr = tl.constexpr(4)
OP_ELU_RESULT_BWD: tl.constexpr = tl.constexpr(5)
OP_ELU_INPUT_BWD: tl.constexpr = tl.constexpr(6)
OP_SIGMOID_BWD: tl.constexpr = tl.constexpr(7)
OP_TANH_BWD: tl.constexpr = tl.constexpr(8)

MASKED_OPS = {"relu": OP_RELU.value, "leaky_relu": OP_LEAKY_RELU.value}
UNARY_OPS = {"elu": OP_ELU.value, "sigmoid": OP_SIGMOID.value, "tanh": OP_TANH.value}
BINARY_BWD_OPS = {
    "elu_result": OP_ELU_RESULT_BWD.value,
    "elu_input": OP_ELU_INPUT_BWD.value,
    "sigmoid": OP_SIGMOID_BWD.value,
    "tanh": OP_TANH_BWD.value,
}


def _op(table, kind, op):
    try:
        return table[op]
    except KeyError:
        raise ValueError(
            f"pyops.kernels.activation.{kind}: unknown op {op!r}, expected one of {sorted(table)}"
        ) from None


def _grid(n):
    return (triton.cdiv(triton.cdiv(n, BITS.value), BYTES.value),)


# Compiled Triton materialises Python float literals as float32, so the series below uses only
# integers exact in float32 and divides in the compute dtype (float64 keeps its precision).
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
def _offsets_2d(n):
    """Element offsets of this program as [BYTES, BITS] (row b = mask byte b), int64, and their mask."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    offs = rows[:, None] * BITS + tl.arange(0, BITS).to(tl.int64)[None, :]
    return rows, offs, offs < n


# ---- ReLU / LeakyReLU with a 1-bit mask ---------------------------------------------------------
@triton.jit(do_not_specialize=["slope_hi", "slope_lo"])
def _masked_fwd_kernel(x_ptr, out_ptr, mask_ptr, n, slope_hi, slope_lo, OP: tl.constexpr, COMPUTE: tl.constexpr):
    rows, offs, inb = _offsets_2d(n)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    # pos: where the gradient flows unchanged, as torch decides it (kernels/_common.py)
    if OP == OP_RELU:
        pos = relu_passes(x)
        y = relu(x)
    else:
        tl.static_assert(OP == OP_LEAKY_RELU)
        pos = leaky_relu_passes(x)
        y = leaky_relu(x, f64(slope_hi, slope_lo).to(COMPUTE))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)
    bits = tl.sum(pos.to(tl.int32) << tl.arange(0, BITS)[None, :], axis=1)
    tl.store(mask_ptr + rows, bits.to(tl.uint8), mask=rows < tl.cdiv(n, BITS))


@triton.jit(do_not_specialize=["slope_hi", "slope_lo"])
def _masked_bwd_kernel(g_ptr, mask_ptr, gi_ptr, n, slope_hi, slope_lo, OP: tl.constexpr, COMPUTE: tl.constexpr):
    rows, offs, inb = _offsets_2d(n)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    bits = tl.load(mask_ptr + rows, mask=rows < tl.cdiv(n, BITS), other=0).to(tl.int32)
    pos = ((bits[:, None] >> tl.arange(0, BITS)[None, :]) & 1) != 0
    if OP == OP_RELU:
        neg = tl.zeros_like(g)
    else:
        tl.static_assert(OP == OP_LEAKY_RELU)
        neg = g * f64(slope_hi, slope_lo).to(COMPUTE)
    tl.store(gi_ptr + offs, tl.where(pos, g, neg).to(gi_ptr.dtype.element_ty), mask=inb)


def masked_fwd(x, out, mask, op, negative_slope):
    """out = x where pos else (relu: 0, leaky_relu: x * negative_slope); bit i of mask = pos_i, with
    pos = not (x <= 0) for relu (NaN passes; -0.0 stays -0.0, as torch.relu) and x > 0 for leaky_relu."""
    sel = _op(MASKED_OPS, "masked_fwd", op)
    n = x.numel()
    if n:
        _masked_fwd_kernel[_grid(n)](
            x, out, mask, n, *f64_halves(negative_slope), OP=sel, COMPUTE=compute_dtype(x.dtype)
        )


def masked_bwd(grad, mask, grad_in, op, negative_slope):
    """grad_in = grad where the mask bit is set, else (relu: 0, leaky_relu: grad * negative_slope)."""
    sel = _op(MASKED_OPS, "masked_bwd", op)
    n = grad.numel()
    if n:
        _masked_bwd_kernel[_grid(n)](
            grad, mask, grad_in, n, *f64_halves(negative_slope), OP=sel, COMPUTE=compute_dtype(grad.dtype)
        )


# ---- ELU, sigmoid, tanh ------------------------------------------------------------------------
@triton.jit(do_not_specialize=["alpha_hi", "alpha_lo"])
def _unary_kernel(x_ptr, out_ptr, n, alpha_hi, alpha_lo, OP: tl.constexpr, COMPUTE: tl.constexpr):
    _, offs, inb = _offsets_2d(n)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    if OP == OP_ELU:
        y = elu(x, f64(alpha_hi, alpha_lo).to(COMPUTE))
    elif OP == OP_SIGMOID:
        y = 1.0 / (1.0 + tl.exp(-x))
    else:
        tl.static_assert(OP == OP_TANH)
        y = _tanh(x)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["alpha_hi", "alpha_lo"])
def _binary_bwd_kernel(g_ptr, s_ptr, gi_ptr, n, alpha_hi, alpha_lo, OP: tl.constexpr, COMPUTE: tl.constexpr):
    _, offs, inb = _offsets_2d(n)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    if OP == OP_ELU_RESULT_BWD:  # s = elu's output: out + alpha = alpha exp(x) where out <= 0
        gi = elu_grad(g, s, f64(alpha_hi, alpha_lo).to(COMPUTE))
    elif OP == OP_ELU_INPUT_BWD:  # s = elu's input
        gi = tl.where(s <= 0, g * f64(alpha_hi, alpha_lo).to(COMPUTE) * tl.exp(s), g)
    elif OP == OP_SIGMOID_BWD:
        gi = g * (1.0 - s) * s
    else:
        tl.static_assert(OP == OP_TANH_BWD)
        gi = g * (1.0 - s * s)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=inb)


def unary(x, out, op, alpha):
    """out = elu: x < 0 ? alpha * expm1(x) : x; sigmoid: 1 / (1 + exp(-x)); tanh: tanh(x).
    alpha is read by elu only."""
    sel = _op(UNARY_OPS, "unary", op)
    n = x.numel()
    if n:
        _unary_kernel[_grid(n)](x, out, n, *f64_halves(alpha), OP=sel, COMPUTE=compute_dtype(x.dtype))


def binary_bwd(grad, saved, grad_in, op, alpha):
    """grad_in from grad g and the saved tensor s: elu_result (s = output): s <= 0 ? g (s + alpha) : g;
    elu_input (s = input): s <= 0 ? g alpha exp(s) : g; sigmoid: g (1 - s) s; tanh: g (1 - s^2)."""
    sel = _op(BINARY_BWD_OPS, "binary_bwd", op)
    n = grad.numel()
    if n:
        _binary_bwd_kernel[_grid(n)](
            grad, saved, grad_in, n, *f64_halves(alpha), OP=sel, COMPUTE=compute_dtype(grad.dtype)
        )


# ---- Maxout ------------------------------------------------------------------------------------
# pieces (1 to 256) only bounds a loop: not specialised, so it is always an i32 and pieces == 1
# compiles nothing new.
@triton.jit(do_not_specialize=["pieces"])
def _maxout_fwd_kernel(x_ptr, out_ptr, idx_ptr, count, inner, pieces, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = e < count
    inner64 = tl.cast(inner, tl.int64)
    row = e // inner64  # (outer, group) of output element e
    src = row * tl.cast(pieces, tl.int64) * inner64 + (e - row * inner64)
    best = tl.load(x_ptr + src, mask=inb, other=0.0)
    bi = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(1, pieces):
        v = tl.load(x_ptr + src + tl.cast(k, tl.int64) * inner64, mask=inb, other=0.0)
        take = (v > best) | ((v != v) & (best == best))  # first maximum; NaN propagates
        best = tl.where(take, v, best)
        bi = tl.where(take, k, bi)
    tl.store(out_ptr + e, best, mask=inb)
    tl.store(idx_ptr + e, bi.to(tl.uint8), mask=inb)


@triton.jit(do_not_specialize=["pieces"])
def _maxout_bwd_kernel(g_ptr, idx_ptr, gi_ptr, count, inner, pieces, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = e < count
    inner64 = tl.cast(inner, tl.int64)
    row = e // inner64
    dst = row * tl.cast(pieces, tl.int64) * inner64 + (e - row * inner64)
    g = tl.load(g_ptr + e, mask=inb, other=0.0)
    bi = tl.load(idx_ptr + e, mask=inb, other=0).to(tl.int32)
    for k in range(0, pieces):
        tl.store(gi_ptr + dst + tl.cast(k, tl.int64) * inner64, tl.where(bi == k, g, tl.zeros_like(g)), mask=inb)


def maxout_fwd(x, out, indices, inner, pieces):
    """x contiguous as [outer, groups * pieces, inner]; out and indices (uint8) contiguous as
    [outer, groups, inner]: out = max over the pieces of each group, indices = the first maximal
    piece; NaN propagates (as torch.max)."""
    count = out.numel()
    if count:
        grid = (triton.cdiv(count, MAXOUT_BLOCK.value),)
        _maxout_fwd_kernel[grid](x, out, indices, count, inner, pieces, BLOCK=MAXOUT_BLOCK.value)


def maxout_bwd(grad, indices, grad_in, inner, pieces):
    """grad_in (contiguous [outer, groups * pieces, inner]) = grad at the piece indices names, 0 elsewhere."""
    count = grad.numel()
    if count:
        grid = (triton.cdiv(count, MAXOUT_BLOCK.value),)
        _maxout_bwd_kernel[grid](grad, indices, grad_in, count, inner, pieces, BLOCK=MAXOUT_BLOCK.value)


# ---- ahead-of-time compilation -----------------------------------------------------------------
# maxout's (count, inner): inner divides count, so it is never wider than count, and 1 where count
# is 1 (pieces is never specialised)
MAXOUT_SIZE_FORMS = (
    ("i32:16", "i32:16"),
    ("i32:16", 1),
    ("i64:16", "i32:16"),
    ("i64:16", "i64:16"),
    ("i64:16", 1),
    (1, 1),
)


def aot_variants():
    """Every specialisation the launchers above can launch, for ahead-of-time compilation (tools/triton_aot.py):
    (label, jit function, signature {runtime argument: Triton type}, constexprs {name: value}), from
    the tables the launchers use: each dtype, op and form of the size arguments."""
    variants = []
    elementwise = [
        ("masked_fwd", _masked_fwd_kernel, MASKED_OPS, ("x_ptr", "out_ptr"), ("mask_ptr",), "slope"),
        ("masked_bwd", _masked_bwd_kernel, MASKED_OPS, ("g_ptr", "gi_ptr"), ("mask_ptr",), "slope"),
        ("unary", _unary_kernel, UNARY_OPS, ("x_ptr", "out_ptr"), (), "alpha"),
        ("binary_bwd", _binary_bwd_kernel, BINARY_BWD_OPS, ("g_ptr", "s_ptr", "gi_ptr"), (), "alpha"),
    ]
    maxout = [
        ("maxout_fwd", _maxout_fwd_kernel, ("x_ptr", "out_ptr"), "idx_ptr"),
        ("maxout_bwd", _maxout_bwd_kernel, ("g_ptr", "gi_ptr"), "idx_ptr"),
    ]
    for ty, compute in DTYPES.values():
        for launcher, kernel, ops, data, masks, scalar in elementwise:
            for op, sel in ops.items():
                for n in INT_FORMS:
                    sig = {a: f"*{ty}" for a in data} | {m: "*u8" for m in masks}
                    sig |= {f"{scalar}_hi": "i32", f"{scalar}_lo": "i32"}  # f64_halves, never specialised
                    consts = {"OP": sel, "COMPUTE": compute}
                    label = f"{launcher}[{op},{ty}{int_args(sig, consts, n=n)}]"
                    variants.append((label, kernel, sig, consts))
        for launcher, kernel, data, idx in maxout:
            for count, inner in MAXOUT_SIZE_FORMS:
                sig = {a: f"*{ty}" for a in data} | {idx: "*u8", "pieces": "i32"}
                consts = {"BLOCK": MAXOUT_BLOCK.value}
                label = f"{launcher}[{ty}{int_args(sig, consts, count=count, inner=inner)}]"
                variants.append((label, kernel, sig, consts))
    return variants

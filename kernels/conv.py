"""Triton kernels of the conv family and their launchers (math: pyops/ops/conv.py).

The launchers are pure kernels: the host side (checks, allocation, layout) is C++ (csrc/conv.h) for
every backend; a launcher receives checked, allocated tensors and only launches. Sizes, strides and the
epilogue's parameters travel in one int64 table (T_* slots; the activation's scalar as its float64
bit pattern), uploaded once per distinct value set without a host synchronisation (kernels/_common.py's
device_table), so one compiled kernel per dtype serves every shape. The epilogue's activation is
kernels/_common.py's (codes and math).

- _conv_fwd_kernel: implicit GEMM, the group a grid dimension: a program computes BLOCK_M output
  positions (n, oh, ow) x BLOCK_N output channels of its group, reducing over Cg * KH * KW in BLOCK_K
  steps with tl.dot (float32 in IEEE precision; float64 as an explicit product-sum), then bias and
  activation.
- _dw_fwd_kernel: the direct kernel for one input channel per group (depthwise, with a channel
  multiplier): a program computes BLOCK positions of one output plane, tap by tap.
- _conv_bwd_input_kernel: implicit GEMM over (n, ih, iw) x input channels of the group, reducing over
  Kg * KH * KW; taps that no output position reaches (strides) load zero. No atomics.
- _conv_bwd_weight_kernel: implicit GEMM over output channels x (c, kh, kw), each program reducing over
  all N * OH * OW in a fixed order (deterministic), the bias gradient beside it.
- _conv_mask_kernel: the activation family's 1-bit mask, read from the output.
The table's first slots are csrc/conv.h's ConvShape in order (T_N ... T_G), as the launchers get it.
Offsets are int64 (the image count and the strides are); index math within an image is int32; every
global is a tl.constexpr.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    ACT_RELU,
    DTYPES,
    act_fwd,
    compute_dtype,
    device_table,
    f64_bits,
    leaky_relu_passes,
    relu_passes,
)

# table slots
T_N: tl.constexpr = tl.constexpr(0)
T_C: tl.constexpr = tl.constexpr(1)
T_H: tl.constexpr = tl.constexpr(2)
T_W: tl.constexpr = tl.constexpr(3)
T_K: tl.constexpr = tl.constexpr(4)
T_KH: tl.constexpr = tl.constexpr(5)
T_KW: tl.constexpr = tl.constexpr(6)
T_OH: tl.constexpr = tl.constexpr(7)
T_OW: tl.constexpr = tl.constexpr(8)
T_SH: tl.constexpr = tl.constexpr(9)
T_SW: tl.constexpr = tl.constexpr(10)
T_PH: tl.constexpr = tl.constexpr(11)
T_PW: tl.constexpr = tl.constexpr(12)
T_DH: tl.constexpr = tl.constexpr(13)
T_DW: tl.constexpr = tl.constexpr(14)
T_G: tl.constexpr = tl.constexpr(15)
T_A: tl.constexpr = tl.constexpr(16)  # strides of the first tensor (x, or grad_out), 4 slots
T_B: tl.constexpr = tl.constexpr(20)  # strides of the second tensor (out, grad_in, or x), 4 slots
T_ACT: tl.constexpr = tl.constexpr(24)
T_SCALAR: tl.constexpr = tl.constexpr(25)
T_HAS_BIAS: tl.constexpr = tl.constexpr(26)

# Tile sizes: (BLOCK_M, BLOCK_N, BLOCK_K) for tl.dot (float32, float16, bfloat16) and for the float64
# product-sum; the direct kernel's positions per program; mask bytes per program.
DOT_BLOCKS = (32, 32, 32)
F64_BLOCKS = (32, 16, 16)
DW_BLOCK: tl.constexpr = tl.constexpr(256)
MASK_BYTES: tl.constexpr = tl.constexpr(128)


def _blocks(dtype):
    return F64_BLOCKS if dtype == torch.float64 else DOT_BLOCKS


def _consts(dtype, blocks=True):
    c = {"COMPUTE": compute_dtype(dtype), "MODE": _MODES[dtype]}
    if blocks:
        c |= dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), _blocks(dtype)))
    return c


# How a tile product is formed: 0 float64 product-sum, 1 tl.dot in IEEE float32, 2 tl.dot of half types
_MODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 2}


@triton.jit
def _mma(acc, a, b, COMPUTE: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:
        return acc + tl.sum(a.to(COMPUTE)[:, :, None] * b.to(COMPUTE)[None, :, :], axis=1)
    elif MODE == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _epilogue(v, t, COMPUTE: tl.constexpr):
    """The activation the table names, with its scalar (a float64 bit pattern)."""
    scalar = tl.load(t + T_SCALAR).to(tl.float64, bitcast=True).to(COMPUTE)
    return act_fwd(v, tl.load(t + T_ACT), scalar)


@triton.jit
def _shape(t):
    """N (int64: products with it are offsets) and the sizes within an image (int32: index math stays
    narrow, which keeps register pressure down)."""
    return (
        tl.load(t + T_N),
        tl.load(t + T_C).to(tl.int32),
        tl.load(t + T_H).to(tl.int32),
        tl.load(t + T_W).to(tl.int32),
        tl.load(t + T_K).to(tl.int32),
        tl.load(t + T_KH).to(tl.int32),
        tl.load(t + T_KW).to(tl.int32),
        tl.load(t + T_OH).to(tl.int32),
        tl.load(t + T_OW).to(tl.int32),
    )


@triton.jit
def _geometry(t):
    return (
        tl.load(t + T_SH).to(tl.int32),
        tl.load(t + T_SW).to(tl.int32),
        tl.load(t + T_PH).to(tl.int32),
        tl.load(t + T_PW).to(tl.int32),
        tl.load(t + T_DH).to(tl.int32),
        tl.load(t + T_DW).to(tl.int32),
        tl.load(t + T_G).to(tl.int32),
    )


@triton.jit
def _strides(t, BASE: tl.constexpr):
    return tl.load(t + BASE), tl.load(t + BASE + 1), tl.load(t + BASE + 2), tl.load(t + BASE + 3)


# ---- forward ------------------------------------------------------------------------------------
@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    t,
    COMPUTE: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    N, C, H, W, K, KH, KW, OH, OW = _shape(t)
    sh, sw, ph, pw, dh, dw, G = _geometry(t)
    xs0, xs1, xs2, xs3 = _strides(t, T_A)
    os0, os1, os2, os3 = _strides(t, T_B)
    grp = tl.program_id(2)
    Cg = C // G
    Kg = K // G
    R = Cg * KH * KW
    M = N * OH * OW
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_m // (OH * OW)
    oh = (offs_m // OW % OH).to(tl.int32)
    ow = (offs_m % OW).to(tl.int32)
    k = grp * Kg + offs_n
    in_m = offs_m < M
    in_n = offs_n < Kg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for r0 in range(0, R, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        c = r // (KH * KW)
        kh = r // KW % KH
        kw = r % KW
        ih = oh[:, None] * sh - ph + kh[None, :] * dh
        iw = ow[:, None] * sw - pw + kw[None, :] * dw
        a_mask = in_m[:, None] & (r < R)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(
            x_ptr + n[:, None] * xs0 + (grp * Cg + c)[None, :] * xs1 + ih * xs2 + iw * xs3, mask=a_mask, other=0.0
        )
        b = tl.load(w_ptr + k.to(tl.int64)[None, :] * R + r[:, None], mask=(r < R)[:, None] & in_n[None, :], other=0.0)
        acc = _mma(acc, a, b, COMPUTE, MODE)
    has_bias = tl.load(t + T_HAS_BIAS)
    bias = tl.load(b_ptr + k, mask=in_n & (has_bias != 0), other=0.0).to(COMPUTE)
    v = _epilogue(acc + bias[None, :], t, COMPUTE)
    dst = out_ptr + n[:, None] * os0 + k[None, :] * os1 + (oh * os2 + ow * os3)[:, None]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, t, COMPUTE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    N, C, H, W, K, KH, KW, OH, OW = _shape(t)
    sh, sw, ph, pw, dh, dw, G = _geometry(t)
    xs0, xs1, xs2, xs3 = _strides(t, T_A)
    os0, os1, os2, os3 = _strides(t, T_B)
    plane = tl.program_id(0).to(tl.int64)
    n = plane // K
    k = (plane % K).to(tl.int32)
    ci = k // (K // G)  # one input channel per group
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    oh = offs // OW
    ow = offs % OW
    inside = offs < OH * OW
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for kh in range(0, KH):
        ih = oh * sh - ph + kh * dh
        for kw in range(0, KW):
            iw = ow * sw - pw + kw * dw
            m = inside & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + n * xs0 + ci * xs1 + ih * xs2 + iw * xs3, mask=m, other=0.0).to(COMPUTE)
            acc += v * tl.load(w_ptr + (k.to(tl.int64) * KH + kh) * KW + kw).to(COMPUTE)
    has_bias = tl.load(t + T_HAS_BIAS)
    acc += tl.load(b_ptr + k, mask=has_bias != 0, other=0.0).to(COMPUTE)
    v = _epilogue(acc, t, COMPUTE)
    tl.store(out_ptr + n * os0 + k * os1 + oh * os2 + ow * os3, v.to(out_ptr.dtype.element_ty), mask=inside)


# ---- input gradient -------------------------------------------------------------------------------
@triton.jit
def _conv_bwd_input_kernel(
    g_ptr,
    w_ptr,
    gi_ptr,
    t,
    COMPUTE: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    N, C, H, W, K, KH, KW, OH, OW = _shape(t)
    sh, sw, ph, pw, dh, dw, G = _geometry(t)
    gs0, gs1, gs2, gs3 = _strides(t, T_A)
    is0, is1, is2, is3 = _strides(t, T_B)
    grp = tl.program_id(2)
    Cg = C // G
    Kg = K // G
    R = Kg * KH * KW
    M = N * H * W
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_m // (H * W)
    ih = (offs_m // W % H).to(tl.int32)
    iw = (offs_m % W).to(tl.int32)
    in_m = offs_m < M
    in_c = c < Cg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for r0 in range(0, R, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        kl = r // (KH * KW)
        kh = r // KW % KH
        kw = r % KW
        th = ih[:, None] + ph - kh[None, :] * dh
        tw = iw[:, None] + pw - kw[None, :] * dw
        thc = tl.maximum(th, 0)
        twc = tl.maximum(tw, 0)
        oh = thc // sh
        ow = twc // sw
        a_mask = in_m[:, None] & (r < R)[None, :] & (th >= 0) & (tw >= 0)
        a_mask = a_mask & (thc % sh == 0) & (twc % sw == 0) & (oh < OH) & (ow < OW)
        a = tl.load(
            g_ptr + n[:, None] * gs0 + (grp * Kg + kl)[None, :] * gs1 + oh * gs2 + ow * gs3, mask=a_mask, other=0.0
        )
        b = tl.load(
            w_ptr + (((grp * Kg + kl).to(tl.int64)[:, None] * Cg + c[None, :]) * KH + kh[:, None]) * KW + kw[:, None],
            mask=(r < R)[:, None] & in_c[None, :],
            other=0.0,
        )
        acc = _mma(acc, a, b, COMPUTE, MODE)
    dst = gi_ptr + n[:, None] * is0 + (grp * Cg + c)[None, :] * is1 + (ih * is2 + iw * is3)[:, None]
    tl.store(dst, acc.to(gi_ptr.dtype.element_ty), mask=in_m[:, None] & in_c[None, :])


# ---- weight and bias gradients ----------------------------------------------------------------------
@triton.jit
def _conv_bwd_weight_kernel(
    g_ptr,
    x_ptr,
    gw_ptr,
    gb_ptr,
    t,
    COMPUTE: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    N, C, H, W, K, KH, KW, OH, OW = _shape(t)
    sh, sw, ph, pw, dh, dw, G = _geometry(t)
    gs0, gs1, gs2, gs3 = _strides(t, T_A)
    xs0, xs1, xs2, xs3 = _strides(t, T_B)
    grp = tl.program_id(2)
    pid_n = tl.program_id(1)
    Cg = C // G
    Kg = K // G
    R = Cg * KH * KW
    M = N * OH * OW
    kl = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = r // (KH * KW)
    kh = r // KW % KH
    kw = r % KW
    in_k = kl < Kg
    in_r = r < R
    k = grp * Kg + kl
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    bias = tl.zeros((BLOCK_M,), dtype=COMPUTE)
    for m0 in range(0, M, BLOCK_K):
        m = m0 + tl.arange(0, BLOCK_K)
        n = m // (OH * OW)
        oh = (m // OW % OH).to(tl.int32)
        ow = (m % OW).to(tl.int32)
        in_m = m < M
        a = tl.load(
            g_ptr + k[:, None] * gs1 + (n * gs0 + oh * gs2 + ow * gs3)[None, :],
            mask=in_k[:, None] & in_m[None, :],
            other=0.0,
        )
        bias += tl.sum(a.to(COMPUTE), axis=1)
        ih = oh[:, None] * sh - ph + kh[None, :] * dh
        iw = ow[:, None] * sw - pw + kw[None, :] * dw
        b_mask = in_m[:, None] & in_r[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(
            x_ptr + n[:, None] * xs0 + (grp * Cg + c)[None, :] * xs1 + ih * xs2 + iw * xs3, mask=b_mask, other=0.0
        )
        acc = _mma(acc, a, b, COMPUTE, MODE)
    tl.store(
        gw_ptr + k.to(tl.int64)[:, None] * R + r[None, :],
        acc.to(gw_ptr.dtype.element_ty),
        mask=in_k[:, None] & in_r[None, :],
    )
    has_bias = tl.load(t + T_HAS_BIAS)
    tl.store(gb_ptr + k, bias.to(gb_ptr.dtype.element_ty), mask=in_k & (pid_n == 0) & (has_bias != 0))


# ---- the activation's mask -------------------------------------------------------------------------
@triton.jit
def _conv_mask_kernel(y_ptr, mask_ptr, t, COMPUTE: tl.constexpr, RELU: tl.constexpr, BYTES: tl.constexpr):
    total = tl.load(t)
    b = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    j = tl.arange(0, 8)
    e = b[:, None] * 8 + j[None, :]
    y = tl.load(y_ptr + e, mask=e < total, other=0.0).to(COMPUTE)
    if RELU:
        passed = relu_passes(y)
    else:
        passed = leaky_relu_passes(y)
    passed = passed & (e < total)
    bits = tl.sum(passed.to(tl.int32) << j[None, :], axis=1)
    tl.store(mask_ptr + b, bits.to(tl.uint8), mask=b < (total + 7) // 8)


# ---- launchers ------------------------------------------------------------------------------------
def _table(shape, a, b, act=0, scalar=0.0, has_bias=0):
    values = list(shape) + list(a.stride()) + list(b.stride()) + [act, f64_bits(scalar), int(has_bias)]
    return device_table(values, torch.int64, a.device)


def conv2d_fwd(x, w, bias, out, shape, act, scalar):
    """out = act(conv(x, w) + bias) (shape: csrc/conv.h's ConvShape as a list)."""
    G, C, K = shape[T_G], shape[T_C], shape[T_K]
    t = _table(shape, x, out, act, scalar, bias is not None)
    b = bias if bias is not None else w
    n, oh, ow = shape[T_N], shape[T_OH], shape[T_OW]
    if C // G == 1:
        grid = (n * K, triton.cdiv(oh * ow, DW_BLOCK.value))
        _dw_fwd_kernel[grid](x, w, b, out, t, BLOCK=DW_BLOCK, **_consts(x.dtype, blocks=False))
        return
    bm, bn, _ = _blocks(x.dtype)
    grid = (triton.cdiv(n * oh * ow, bm), triton.cdiv(K // G, bn), G)
    _conv_fwd_kernel[grid](x, w, b, out, t, **_consts(x.dtype))


def conv2d_bwd_input(grad_out, w, grad_in, shape):
    """grad_in = the transpose of the convolution applied to grad_out."""
    G, C, H, W = shape[T_G], shape[T_C], shape[T_H], shape[T_W]
    t = _table(shape, grad_out, grad_in)
    bm, bn, _ = _blocks(w.dtype)
    grid = (triton.cdiv(shape[T_N] * H * W, bm), triton.cdiv(C // G, bn), G)
    _conv_bwd_input_kernel[grid](grad_out, w, grad_in, t, **_consts(w.dtype))


def conv2d_bwd_weight(grad_out, x, grad_weight, grad_bias, bias, shape):
    """grad_weight (and grad_bias when bias) = sums over images and output positions, in a fixed order."""
    G, C, K, KH, KW = shape[T_G], shape[T_C], shape[T_K], shape[T_KH], shape[T_KW]
    t = _table(shape, grad_out, x, has_bias=bias)
    bm, bn, _ = _blocks(x.dtype)
    grid = (triton.cdiv(K // G, bm), triton.cdiv(C // G * KH * KW, bn), G)
    gb = grad_bias if bias else grad_weight
    _conv_bwd_weight_kernel[grid](grad_out, x, grad_weight, gb, t, **_consts(x.dtype))


def conv2d_mask(out, mask, act):
    """Bit i of the mask: element i of out (memory order) passes relu (!(y <= 0)) or leaky_relu (y > 0)."""
    n = out.numel()
    t = device_table([n], torch.int64, out.device)
    grid = (triton.cdiv(triton.cdiv(n, 8), MASK_BYTES.value),)
    _conv_mask_kernel[grid](
        out, mask, t, COMPUTE=compute_dtype(out.dtype), RELU=act == ACT_RELU.value, BYTES=MASK_BYTES
    )


def aot_variants():
    """Every specialisation the launchers above can launch: (label, jit function, signature, constexprs).
    Every size travels in the table, so a kernel has one variant per dtype (and the mask's op)."""
    variants = []
    for dtype, (ty, compute) in DTYPES.items():
        p = f"*{ty}"
        gemm = _consts(dtype)
        direct = _consts(dtype, blocks=False) | {"BLOCK": DW_BLOCK.value}
        variants += [
            (
                f"conv_fwd[{ty}]",
                _conv_fwd_kernel,
                {"x_ptr": p, "w_ptr": p, "b_ptr": p, "out_ptr": p, "t": "*i64"},
                gemm,
            ),
            (f"dw_fwd[{ty}]", _dw_fwd_kernel, {"x_ptr": p, "w_ptr": p, "b_ptr": p, "out_ptr": p, "t": "*i64"}, direct),
            (f"conv_bwd_input[{ty}]", _conv_bwd_input_kernel, {"g_ptr": p, "w_ptr": p, "gi_ptr": p, "t": "*i64"}, gemm),
            (
                f"conv_bwd_weight[{ty}]",
                _conv_bwd_weight_kernel,
                {"g_ptr": p, "x_ptr": p, "gw_ptr": p, "gb_ptr": p, "t": "*i64"},
                gemm,
            ),
        ]
        for relu in (True, False):
            consts = {"COMPUTE": compute, "RELU": relu, "BYTES": MASK_BYTES.value}
            variants.append(
                (
                    f"conv_mask[{ty},relu={relu}]",
                    _conv_mask_kernel,
                    {"y_ptr": p, "mask_ptr": "*u8", "t": "*i64"},
                    consts,
                )
            )
    return variants

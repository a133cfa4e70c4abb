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
- _dw_bwd_input_kernel: its direct twin for one input channel per group (depthwise), as _dw_fwd_kernel.
- _conv_bwd_weight_kernel: implicit GEMM over output channels x (c, kh, kw), split over N * OH * OW
  (split-K): program (split, tile) reduces its split's chunk of positions into partials[split], the
  bias gradient beside it; _wgrad_combine_kernel adds the splits in split order (deterministic, no
  atomics).
- _dw_bwd_weight_kernel: the same for one input channel per group (depthwise): program (split, output
  channel) forms the products g x (every tap) of its chunk of positions elementwise (a tl.dot tile
  would be 1/32 valid) and sums them once at the end.
- _conv_mask_kernel: the activation family's 1-bit mask, read from the output.
The table's first slots are csrc/conv.h's ConvShape in order (T_N ... T_G), as the launchers get it.
Every grid is 1-d (the tiles, groups and splits folded into x, decomposed in the kernel: no other
grid dimension has a limit to reach); plan() gives each launcher's grids and splits from the shape.
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
    two_waves,
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
T_SPLITS: tl.constexpr = tl.constexpr(27)  # the weight gradient's splits of N * OH * OW, and positions per split
T_CHUNK: tl.constexpr = tl.constexpr(28)

# Tile sizes: (BLOCK_M, BLOCK_N, BLOCK_K) for tl.dot (float32, float16, bfloat16) and for the float64
# product-sum; the direct kernel's positions per program; mask bytes per program.
DOT_BLOCKS = (32, 32, 32)
F64_BLOCKS = (32, 16, 16)
DW_BLOCK: tl.constexpr = tl.constexpr(256)
MASK_BYTES: tl.constexpr = tl.constexpr(32)  # (256 elements: ~20 registers, 16 programs resident per SM)
# The depthwise weight gradient's tile: positions x taps (a 3x3 kernel's 9 taps in one tile).
DW_P: tl.constexpr = tl.constexpr(128)
DW_T: tl.constexpr = tl.constexpr(16)
# Elements per program of the splits' combine.
COMBINE_BLOCK: tl.constexpr = tl.constexpr(1024)
# The weight gradient's split of N * OH * OW (wgrad_split()): enough (split, tile) programs for
# PROGRAMS, 2 waves on an H100 at the weight gradients' occupancy (on sm_90, tools/triton_aot.py's
# report: 168 to 208 registers per thread for _conv_bwd_weight_kernel, 168 to 254 for
# _dw_bwd_weight_kernel, so 2 or 3 programs of 4 warps resident per SM; the fewer registers need the
# more programs), a split at least MIN_STEPS steps of its tile's positions, at most MAX_SPLITS splits
# (the partials: MAX_SPLITS weight gradients).
PROGRAMS = two_waves(168)
MIN_STEPS = 4
MAX_SPLITS = 128


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


@triton.jit
def _tile_of(blocks_m, blocks_n):
    """(m block (int64), n block, group (int32)) of this program in a grid of blocks_m x blocks_n x G
    tiles folded into x, m blocks fastest."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % blocks_m
    rest = pid // blocks_m
    return pid_m, (rest % blocks_n).to(tl.int32), (rest // blocks_n).to(tl.int32)


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
    Cg = C // G
    Kg = K // G
    R = Cg * KH * KW
    M = N * OH * OW
    pid_m, pid_n, grp = _tile_of(tl.cdiv(M, BLOCK_M), tl.cdiv(Kg, BLOCK_N))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
    blocks = tl.cdiv(OH * OW, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // blocks  # (n, k), the blocks of one output plane neighbours in x
    n = plane // K
    k = (plane % K).to(tl.int32)
    ci = k // (K // G)  # one input channel per group
    offs = (pid - plane * blocks).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
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
    Cg = C // G
    Kg = K // G
    R = Kg * KH * KW
    M = N * H * W
    pid_m, pid_n, grp = _tile_of(tl.cdiv(M, BLOCK_M), tl.cdiv(Cg, BLOCK_N))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit
def _dw_bwd_input_kernel(g_ptr, w_ptr, gi_ptr, t, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """The input gradient of one input channel per group (depthwise): a program computes BLOCK positions
    of one input plane, output channel by output channel of its group and tap by tap (a tl.dot tile
    over the group's single channel would be 1/32 valid)."""
    N, C, H, W, K, KH, KW, OH, OW = _shape(t)
    sh, sw, ph, pw, dh, dw, G = _geometry(t)
    gs0, gs1, gs2, gs3 = _strides(t, T_A)
    is0, is1, is2, is3 = _strides(t, T_B)
    blocks = tl.cdiv(H * W, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // blocks  # (n, c), the blocks of one input plane neighbours in x
    n = plane // C
    c = (plane % C).to(tl.int32)
    offs = (pid - plane * blocks).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    ih = offs // W
    iw = offs % W
    inside = offs < H * W
    Kg = K // G
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for kl in range(0, Kg):
        k = c * Kg + kl
        for kh in range(0, KH):
            th = ih + ph - kh * dh
            thc = tl.maximum(th, 0)
            oh = thc // sh
            for kw in range(0, KW):
                tw = iw + pw - kw * dw
                twc = tl.maximum(tw, 0)
                ow = twc // sw
                m = inside & (th >= 0) & (tw >= 0) & (thc % sh == 0) & (twc % sw == 0) & (oh < OH) & (ow < OW)
                v = tl.load(g_ptr + n * gs0 + k * gs1 + oh * gs2 + ow * gs3, mask=m, other=0.0).to(COMPUTE)
                acc += v * tl.load(w_ptr + (k.to(tl.int64) * KH + kh) * KW + kw).to(COMPUTE)
    tl.store(gi_ptr + n * is0 + c * is1 + ih * is2 + iw * is3, acc.to(gi_ptr.dtype.element_ty), mask=inside)


# ---- weight and bias gradients ----------------------------------------------------------------------
@triton.jit
def _split_of(t, M):
    """This program's split, the rest of its id, and the positions [lo, hi) of N * OH * OW it reduces;
    the offset of its split's partials (K * R weights, then K biases)."""
    splits = tl.load(t + T_SPLITS)
    chunk = tl.load(t + T_CHUNK)
    pid = tl.program_id(0).to(tl.int64)
    rest = pid // splits
    s = pid - rest * splits
    lo = s * chunk
    return s, rest, lo, tl.minimum(lo + chunk, M)


@triton.jit
def _conv_bwd_weight_kernel(
    g_ptr,
    x_ptr,
    ws_ptr,
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
    Cg = C // G
    Kg = K // G
    R = Cg * KH * KW
    M = N * OH * OW
    s, rest, lo, hi = _split_of(t, M)
    blocks_n = tl.cdiv(R, BLOCK_N)
    blocks_k = tl.cdiv(Kg, BLOCK_M)
    pid_n = (rest % blocks_n).to(tl.int32)
    rest = rest // blocks_n
    pid_k = (rest % blocks_k).to(tl.int32)
    grp = (rest // blocks_k).to(tl.int32)
    kl = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = r // (KH * KW)
    kh = r // KW % KH
    kw = r % KW
    in_k = kl < Kg
    in_r = r < R
    k = grp * Kg + kl
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    bias = tl.zeros((BLOCK_M,), dtype=COMPUTE)
    for m0 in range(lo, hi, BLOCK_K):
        m = m0 + tl.arange(0, BLOCK_K)
        n = m // (OH * OW)
        oh = (m // OW % OH).to(tl.int32)
        ow = (m % OW).to(tl.int32)
        in_m = m < hi
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
    KR = K.to(tl.int64) * R
    base = ws_ptr + s * (KR + K)
    tl.store(base + k.to(tl.int64)[:, None] * R + r[None, :], acc, mask=in_k[:, None] & in_r[None, :])
    tl.store(base + KR + k, bias, mask=in_k & (pid_n == 0))


@triton.jit
def _dw_bwd_weight_kernel(g_ptr, x_ptr, ws_ptr, t, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    N, C, H, W, K, KH, KW, OH, OW = _shape(t)
    sh, sw, ph, pw, dh, dw, G = _geometry(t)
    gs0, gs1, gs2, gs3 = _strides(t, T_A)
    xs0, xs1, xs2, xs3 = _strides(t, T_B)
    HW = OH * OW
    M = N * HW
    s, k64, lo, hi = _split_of(t, M)
    k = k64.to(tl.int32)
    ci = k // (K // G)  # one input channel per group
    T = KH * KW  # (= R: one input channel)
    KR = K.to(tl.int64) * T
    base = ws_ptr + s * (KR + K)
    j = tl.arange(0, BLOCK_P)
    for t0 in range(0, T, BLOCK_T):
        taps = t0 + tl.arange(0, BLOCK_T)
        kh = taps // KW
        kw = taps - kh * KW
        in_t = taps < T
        acc = tl.zeros((BLOCK_P, BLOCK_T), dtype=COMPUTE)
        bias = tl.zeros((BLOCK_P,), dtype=COMPUTE)
        for m0 in range(lo, hi, BLOCK_P):
            # (n, oh, ow) of positions m0 + j: one int64 division per step, int32 per position
            n0 = m0 // HW
            q = (m0 - n0 * HW).to(tl.int32) + j
            dn = q // HW
            q = q - dn * HW
            oh = q // OW
            ow = q - oh * OW
            n = n0 + dn
            in_m = m0 + j < hi
            g = tl.load(g_ptr + n * gs0 + k * gs1 + oh * gs2 + ow * gs3, mask=in_m, other=0.0).to(COMPUTE)
            bias += g
            ih = oh[:, None] * sh - ph + kh[None, :] * dh
            iw = ow[:, None] * sw - pw + kw[None, :] * dw
            xm = in_m[:, None] & in_t[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + n[:, None] * xs0 + ci * xs1 + ih * xs2 + iw * xs3, mask=xm, other=0.0)
            acc += g[:, None] * xv.to(COMPUTE)
        tl.store(base + k64 * T + taps, tl.sum(acc, axis=0), mask=in_t)
        tl.store(base + KR + k, tl.sum(bias, axis=0), mask=t0 == 0)


@triton.jit
def _wgrad_combine_kernel(ws_ptr, gw_ptr, gb_ptr, t, BLOCK: tl.constexpr):
    """grad_weight (K * R) and grad_bias (K) = the sum of the splits' partials, in split order."""
    K = tl.load(t + T_K)
    R = tl.load(t + T_C) // tl.load(t + T_G) * tl.load(t + T_KH) * tl.load(t + T_KW)
    splits = tl.load(t + T_SPLITS)
    has_bias = tl.load(t + T_HAS_BIAS)
    KR = K * R
    total = KR + K
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = e < total
    acc = tl.zeros((BLOCK,), dtype=ws_ptr.dtype.element_ty)
    for s in range(0, splits):
        acc += tl.load(ws_ptr + s * total + e, mask=inside, other=0.0)
    tl.store(gw_ptr + e, acc.to(gw_ptr.dtype.element_ty), mask=e < KR)
    tl.store(gb_ptr + (e - KR), acc.to(gb_ptr.dtype.element_ty), mask=inside & (e >= KR) & (has_bias != 0))


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


# ---- launch plans: pure functions of the shape ------------------------------------------------------
def wgrad_split(positions, tiles, step, programs=None, min_steps=None, max_splits=None):
    """(splits, chunk): the weight gradient's N * OH * OW = `positions` cut into splits of chunk
    positions (a whole number of `step`-position steps), from the shape alone (the same order, and
    bits, on every run and GPU): enough that splits x `tiles` (the programs of one split) reaches
    `programs` where the positions allow, a split at least `min_steps` steps, at most `max_splits`
    splits. The defaults are the module's PROGRAMS, MIN_STEPS and MAX_SPLITS (tests pass others)."""
    programs = PROGRAMS if programs is None else programs
    min_steps = MIN_STEPS if min_steps is None else min_steps
    max_splits = MAX_SPLITS if max_splits is None else max_splits
    if positions == 0:
        return 1, 0
    want = triton.cdiv(programs, max(tiles, 1))
    # the longest chunk of whole steps that still gives `want` splits (rounding down: at least as many)
    chunk = max(min_steps * step, step, positions // want // step * step)
    if triton.cdiv(positions, chunk) > max_splits:
        chunk = triton.cdiv(triton.cdiv(positions, max_splits), step) * step
    return triton.cdiv(positions, chunk), chunk


def _depthwise(shape):
    return shape[T_C] // shape[T_G] == 1


def _wgrad_plan(shape, dtype, **split_args):
    """(kernel, constexprs, splits, chunk, programs) of the weight gradient's partial pass."""
    G, C, K, KH, KW = shape[T_G], shape[T_C], shape[T_K], shape[T_KH], shape[T_KW]
    positions = shape[T_N] * shape[T_OH] * shape[T_OW]
    if _depthwise(shape):
        tiles, step = K, DW_P.value
        kernel, consts = _dw_bwd_weight_kernel, _consts(dtype, blocks=False) | {"BLOCK_P": DW_P, "BLOCK_T": DW_T}
        consts.pop("MODE")
    else:
        bm, bn, bk = _blocks(dtype)
        tiles, step = triton.cdiv(K // G, bm) * triton.cdiv(C // G * KH * KW, bn) * G, bk
        kernel, consts = _conv_bwd_weight_kernel, _consts(dtype)
    splits, chunk = wgrad_split(positions, tiles, step, **split_args)
    return kernel, consts, splits, chunk, splits * tiles


def plan(shape, dtype=torch.float32, **split_args):
    """Each launcher's launches for a ConvShape (a list, as the launchers get it) and dtype:
    {launcher: [(kernel, grid)]}, the grids as the launchers compute them (no launch; split_args
    as wgrad_split()'s)."""
    N, C, H, W, K = (shape[i] for i in (T_N, T_C, T_H, T_W, T_K))
    G, OH, OW = shape[T_G], shape[T_OH], shape[T_OW]
    bm, bn, _ = _blocks(dtype)
    if _depthwise(shape):
        fwd = (_dw_fwd_kernel, (N * K * triton.cdiv(OH * OW, DW_BLOCK.value),))
    else:
        fwd = (_conv_fwd_kernel, (triton.cdiv(N * OH * OW, bm) * triton.cdiv(K // G, bn) * G,))
    if _depthwise(shape):
        bwd_input = (_dw_bwd_input_kernel, (N * C * triton.cdiv(H * W, DW_BLOCK.value),))
    else:
        bwd_input = (_conv_bwd_input_kernel, (triton.cdiv(N * H * W, bm) * triton.cdiv(C // G, bn) * G,))
    kernel, _, _, _, programs = _wgrad_plan(shape, dtype, **split_args)
    weights = K * (C // G) * shape[T_KH] * shape[T_KW]
    return {
        "conv2d_fwd": [fwd],
        "conv2d_bwd_input": [bwd_input],
        "conv2d_bwd_weight": [
            (kernel, (programs,)),
            (_wgrad_combine_kernel, (triton.cdiv(weights + K, COMBINE_BLOCK.value),)),
        ],
        "conv2d_mask": [(_conv_mask_kernel, (triton.cdiv(triton.cdiv(N * K * OH * OW, 8), MASK_BYTES.value),))],
    }


def wgrad_splits(shape, dtype=torch.float32, **split_args):
    """The splits of N * OH * OW the weight gradient of a ConvShape takes (1: not split)."""
    return _wgrad_plan(shape, dtype, **split_args)[2]


# ---- launchers ------------------------------------------------------------------------------------
def _table(shape, a, b, act=0, scalar=0.0, has_bias=0, splits=1, chunk=0):
    values = list(shape) + list(a.stride()) + list(b.stride()) + [act, f64_bits(scalar), int(has_bias), splits, chunk]
    return device_table(values, torch.int64, a.device)


def conv2d_fwd(x, w, bias, out, shape, act, scalar):
    """out = act(conv(x, w) + bias) (shape: csrc/conv.h's ConvShape as a list)."""
    G, K = shape[T_G], shape[T_K]
    t = _table(shape, x, out, act, scalar, bias is not None)
    b = bias if bias is not None else w
    n, oh, ow = shape[T_N], shape[T_OH], shape[T_OW]
    if _depthwise(shape):
        grid = (n * K * triton.cdiv(oh * ow, DW_BLOCK.value),)
        _dw_fwd_kernel[grid](x, w, b, out, t, BLOCK=DW_BLOCK, **_consts(x.dtype, blocks=False))
        return
    bm, bn, _ = _blocks(x.dtype)
    grid = (triton.cdiv(n * oh * ow, bm) * triton.cdiv(K // G, bn) * G,)
    _conv_fwd_kernel[grid](x, w, b, out, t, **_consts(x.dtype))


def conv2d_bwd_input(grad_out, w, grad_in, shape):
    """grad_in = the transpose of the convolution applied to grad_out."""
    G, C, H, W = shape[T_G], shape[T_C], shape[T_H], shape[T_W]
    t = _table(shape, grad_out, grad_in)
    if _depthwise(shape):
        grid = (shape[T_N] * C * triton.cdiv(H * W, DW_BLOCK.value),)
        _dw_bwd_input_kernel[grid](grad_out, w, grad_in, t, BLOCK=DW_BLOCK, COMPUTE=compute_dtype(w.dtype))
        return
    bm, bn, _ = _blocks(w.dtype)
    grid = (triton.cdiv(shape[T_N] * H * W, bm) * triton.cdiv(C // G, bn) * G,)
    _conv_bwd_input_kernel[grid](grad_out, w, grad_in, t, **_consts(w.dtype))


def conv2d_bwd_weight(grad_out, x, grad_weight, grad_bias, bias, shape):
    """grad_weight (and grad_bias when bias) = sums over images and output positions: partial sums per
    split of the positions, then the splits added in split order (deterministic)."""
    kernel, consts, splits, chunk, programs = _wgrad_plan(shape, x.dtype)
    t = _table(shape, grad_out, x, has_bias=bias, splits=splits, chunk=chunk)
    K = shape[T_K]
    total = grad_weight.numel() + K
    ws = torch.empty(
        splits * total, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
    )
    kernel[(programs,)](grad_out, x, ws, t, **consts)
    gb = grad_bias if bias else grad_weight
    _wgrad_combine_kernel[(triton.cdiv(total, COMBINE_BLOCK.value),)](ws, grad_weight, gb, t, BLOCK=COMBINE_BLOCK)


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
        ws = "*fp64" if dtype == torch.float64 else "*fp32"
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
                f"dw_bwd_input[{ty}]",
                _dw_bwd_input_kernel,
                {"g_ptr": p, "w_ptr": p, "gi_ptr": p, "t": "*i64"},
                {"COMPUTE": compute, "BLOCK": DW_BLOCK.value},
            ),
            (
                f"conv_bwd_weight[{ty}]",
                _conv_bwd_weight_kernel,
                {"g_ptr": p, "x_ptr": p, "ws_ptr": ws, "t": "*i64"},
                gemm,
            ),
            (
                f"dw_bwd_weight[{ty}]",
                _dw_bwd_weight_kernel,
                {"g_ptr": p, "x_ptr": p, "ws_ptr": ws, "t": "*i64"},
                {"COMPUTE": compute, "BLOCK_P": DW_P.value, "BLOCK_T": DW_T.value},
            ),
            (
                f"wgrad_combine[{ty}]",
                _wgrad_combine_kernel,
                {"ws_ptr": ws, "gw_ptr": p, "gb_ptr": p, "t": "*i64"},
                {"BLOCK": COMBINE_BLOCK.value},
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

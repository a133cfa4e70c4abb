"""Triton kernels of the batch_norm family and their launchers.

The host side (checks, layout, allocation, per-channel coefficients) is C++ (csrc/batch_norm.h) for
every backend; a launcher receives checked, allocated tensors on one device and only launches. The
data is [outer, C, inner] dense: element (o, c, i) at (o * C + c) * inner + i (NCHW as [N, C, H * W],
channels_last as [N * H * W, C, 1]); a channel's M = outer * inner values are its positions q, with
(o, i) = divmod(q, inner). Per-channel coefficients are dense float32 (float64 for float64 data).

Reductions are split: program (part, channel block) reduces a tile of ROWS positions x COLS channels
at a time over its span of positions (tile results in the compute dtype, accumulated in float64) and
writes partial results; a second kernel combines the parts
of each channel in part order (deterministic, no atomics). The number of parts depends on the shape
only. Statistics are per-tile two-pass (tile mean, then squared deviations from it) merged with
Chan's formula. The activation (kernels/_common.py's codes and math), its parameter and the optional
operands are runtime arguments (one compiled kernel per dtype serves every form); absent tensors are
masked out of every load.
"""

import torch
import triton
import triton.language as tl

from ._common import ACTIVATIONS, DTYPES, act_fwd, act_grad, act_inv, compute_dtype, f64, f64_halves

# Elementwise elements per program; reduction tile (positions x channels).
BLOCK: tl.constexpr = tl.constexpr(1024)
ROWS: tl.constexpr = tl.constexpr(128)
COLS: tl.constexpr = tl.constexpr(8)
# Channels per program of the combine kernels.
COMBINE_COLS: tl.constexpr = tl.constexpr(128)
# Positions of a channel per reduction program (at least), and parts of a channel at most.
SPAN = 16384
MAX_PARTS = 1024


def _act(name):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"pyops.kernels.batch_norm: unknown activation {name!r}, expected one of {sorted(ACTIVATIONS)}"
        ) from None


@triton.jit
def _dz_v(g_ptr, x_ptr, y_ptr, r_ptr, offs, mask, cen, act, p, from_output, has_r, COMPUTE: tl.constexpr):
    """dz = g act'(y) and v = x - center, or act^-1(y) - r - center from the output."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    y = tl.load(y_ptr + offs, mask=mask & ((act != 0) | (from_output != 0)), other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask & (from_output == 0), other=0.0).to(COMPUTE)
    r = tl.load(r_ptr + offs, mask=mask & (has_r != 0) & (from_output != 0), other=0.0).to(COMPUTE)
    dz = act_grad(g, y, act, p)
    v = tl.where(from_output != 0, act_inv(y, act, p) - r, x) - cen
    return dz, v


# ---- statistics ----------------------------------------------------------------------------------
@triton.jit
def _tile(count, inner, C, start, hi, cols):
    q = start + tl.arange(0, ROWS).to(tl.int64)
    o = q // inner
    i = q - o * inner
    offs = (o[:, None] * C + cols[None, :]) * inner + i[:, None]
    mask = (q < hi)[:, None] & (cols < C)[None, :]
    return offs, mask


@triton.jit(do_not_specialize=["count", "inner", "C", "span"])
def _stats_partial_kernel(x_ptr, pn_ptr, pmean_ptr, pm2_ptr, count, inner, C, span, COMPUTE: tl.constexpr):
    part = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS).to(tl.int64)
    lo = part * span
    hi = tl.minimum(lo + span, count)
    n = tl.zeros([COLS], dtype=tl.float64)
    mean = tl.zeros([COLS], dtype=tl.float64)
    m2 = tl.zeros([COLS], dtype=tl.float64)
    # each channel's first value as a shift: the tiles sum x - shift, small where the mean is far from 0
    shift = tl.load(x_ptr + cols * inner, mask=cols < C, other=0.0).to(COMPUTE)
    shift = tl.where((shift - shift) == 0, shift, 0.0)  # an infinite or NaN first value: no shift
    for start in range(lo, hi, ROWS):
        offs, mask = _tile(count, inner, C, start, hi, cols)
        x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - shift[None, :], 0.0)
        nt = tl.minimum(hi - start, ROWS).to(COMPUTE)
        mt = tl.sum(x, axis=0) / nt
        d = tl.where(mask, x - mt[None, :], 0.0)
        # the tile's statistics in the compute dtype, merged in float64
        nb = nt.to(tl.float64)
        mb = mt.to(tl.float64) + shift.to(tl.float64)
        m2b = tl.sum(d * d, axis=0).to(tl.float64)
        total = n + nb
        delta = mb - mean
        # the mean as a weighted average: an infinite value keeps it infinite (as torch's), where
        # mean + delta * nb / total would turn inf - inf into NaN
        mean = mean * (n / total) + mb * (nb / total)
        m2 = m2 + m2b + delta * delta * (n * nb / total)
        n = total
    idx = part * C + cols
    cm = cols < C
    tl.store(pn_ptr + idx, n, mask=cm)
    tl.store(pmean_ptr + idx, mean, mask=cm)
    tl.store(pm2_ptr + idx, m2, mask=cm)


@triton.jit(do_not_specialize=["C", "parts"])
def _stats_combine_kernel(pn_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, C, parts):
    cols = tl.program_id(0).to(tl.int64) * COMBINE_COLS + tl.arange(0, COMBINE_COLS).to(tl.int64)
    cm = cols < C
    n = tl.zeros([COMBINE_COLS], dtype=tl.float64)
    mean = tl.zeros([COMBINE_COLS], dtype=tl.float64)
    m2 = tl.zeros([COMBINE_COLS], dtype=tl.float64)
    for p in range(0, parts):
        idx = p * C + cols
        nb = tl.load(pn_ptr + idx, mask=cm, other=0.0)
        mb = tl.load(pmean_ptr + idx, mask=cm, other=0.0)
        m2b = tl.load(pm2_ptr + idx, mask=cm, other=0.0)
        total = n + nb
        safe = tl.where(total > 0, total, 1.0)
        delta = mb - mean
        mean = tl.where(nb > 0, mean * (n / safe) + mb * (nb / safe), mean)  # weighted, as above
        m2 = m2 + tl.where(nb > 0, m2b + delta * delta * (n * nb / safe), 0.0)
        n = total
    tl.store(mean_ptr + cols, mean.to(mean_ptr.dtype.element_ty), mask=cm)
    tl.store(var_ptr + cols, (m2 / tl.where(n > 0, n, 1.0)).to(var_ptr.dtype.element_ty), mask=cm)


@triton.jit(do_not_specialize=["C", "parts"])
def _sum_combine_kernel(p1_ptr, p2_ptr, s1_ptr, s2_ptr, C, parts):
    cols = tl.program_id(0).to(tl.int64) * COMBINE_COLS + tl.arange(0, COMBINE_COLS).to(tl.int64)
    cm = cols < C
    s1 = tl.zeros([COMBINE_COLS], dtype=tl.float64)
    s2 = tl.zeros([COMBINE_COLS], dtype=tl.float64)
    for p in range(0, parts):
        s1 += tl.load(p1_ptr + p * C + cols, mask=cm, other=0.0)
        s2 += tl.load(p2_ptr + p * C + cols, mask=cm, other=0.0)
    tl.store(s1_ptr + cols, s1.to(s1_ptr.dtype.element_ty), mask=cm)
    tl.store(s2_ptr + cols, s2.to(s2_ptr.dtype.element_ty), mask=cm)


# ---- forward, elementwise ------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n", "inner", "C", "act", "p_hi", "p_lo", "has_r"])
def _elemt_kernel(
    x_ptr, r_ptr, out_ptr, center_ptr, scale_ptr, shift_ptr, n, inner, C, act, p_hi, p_lo, has_r, COMPUTE: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    c = (offs // inner) % C
    p = f64(p_hi, p_lo).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(COMPUTE)
    cen = tl.load(center_ptr + c, mask=m, other=0.0)
    scale = tl.load(scale_ptr + c, mask=m, other=0.0)
    shift = tl.load(shift_ptr + c, mask=m, other=0.0)
    r = tl.load(r_ptr + offs, mask=m & (has_r != 0), other=0.0).to(COMPUTE)
    z = (x - cen) * scale + shift + r
    tl.store(out_ptr + offs, act_fwd(z, act, p).to(out_ptr.dtype.element_ty), mask=m)


# ---- backward ------------------------------------------------------------------------------------
@triton.jit(
    do_not_specialize=["count", "inner", "C", "span", "act", "p_hi", "p_lo", "from_output", "has_r", "write_dr"]
)
def _bwd_reduce_partial_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    r_ptr,
    dr_ptr,
    center_ptr,
    p1_ptr,
    p2_ptr,
    count,
    inner,
    C,
    span,
    act,
    p_hi,
    p_lo,
    from_output,
    has_r,
    write_dr,
    COMPUTE: tl.constexpr,
):
    part = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS).to(tl.int64)
    cm = cols < C
    p = f64(p_hi, p_lo).to(COMPUTE)
    cen = tl.load(center_ptr + cols, mask=cm, other=0.0)
    lo = part * span
    hi = tl.minimum(lo + span, count)
    s1 = tl.zeros([COLS], dtype=tl.float64)
    s2 = tl.zeros([COLS], dtype=tl.float64)
    for start in range(lo, hi, ROWS):
        offs, mask = _tile(count, inner, C, start, hi, cols)
        dz, v = _dz_v(g_ptr, x_ptr, y_ptr, r_ptr, offs, mask, cen[None, :], act, p, from_output, has_r, COMPUTE)
        # tile sums in the compute dtype, added up in float64
        s1 += tl.sum(tl.where(mask, dz, 0.0), axis=0).to(tl.float64)
        s2 += tl.sum(tl.where(mask, dz * v, 0.0), axis=0).to(tl.float64)
        tl.store(dr_ptr + offs, dz.to(dr_ptr.dtype.element_ty), mask=mask & (write_dr != 0))
    idx = part * C + cols
    tl.store(p1_ptr + idx, s1, mask=cm)
    tl.store(p2_ptr + idx, s2, mask=cm)


@triton.jit(do_not_specialize=["n", "inner", "C", "act", "p_hi", "p_lo", "from_output", "has_r", "training"])
def _bwd_elemt_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    r_ptr,
    out_ptr,
    center_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    n,
    inner,
    C,
    act,
    p_hi,
    p_lo,
    from_output,
    has_r,
    training,
    COMPUTE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    c = (offs // inner) % C
    p = f64(p_hi, p_lo).to(COMPUTE)
    cen = tl.load(center_ptr + c, mask=m, other=0.0)
    ca = tl.load(a_ptr + c, mask=m, other=0.0)
    cb = tl.load(b_ptr + c, mask=m & (training != 0), other=0.0)
    cc = tl.load(c_ptr + c, mask=m & (training != 0), other=0.0)
    dz, v = _dz_v(g_ptr, x_ptr, y_ptr, r_ptr, offs, m & (training != 0), cen, act, p, from_output, has_r, COMPUTE)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(COMPUTE)
    y = tl.load(y_ptr + offs, mask=m & (act != 0), other=0.0).to(COMPUTE)
    dz_eval = act_grad(g, y, act, p)
    dx = tl.where(training != 0, ca * dz + cb * v + cc, ca * dz_eval)
    tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=m)


# ---- launchers -----------------------------------------------------------------------------------
def _split(outer, inner):
    """(parts, span): a channel's positions cut into parts of span, from the shape alone."""
    count = outer * inner
    parts = max(1, min(MAX_PARTS, triton.cdiv(count, SPAN)))
    return parts, triton.cdiv(count, parts)


def stats(x, mean, var, outer, channels, inner):
    parts, span = _split(outer, inner)
    count = outer * inner
    opts = {"dtype": torch.float64, "device": x.device}
    pn, pmean, pm2 = (torch.empty(parts * channels, **opts) for _ in range(3))
    compute = compute_dtype(x.dtype)
    _stats_partial_kernel[(parts, triton.cdiv(channels, COLS.value))](
        x, pn, pmean, pm2, count, inner, channels, span, COMPUTE=compute
    )
    _stats_combine_kernel[(triton.cdiv(channels, COMBINE_COLS.value),)](pn, pmean, pm2, mean, var, channels, parts)


def elemt(x, residual, out, center, scale, shift, outer, channels, inner, activation, param):
    n = x.numel()
    hi, lo = f64_halves(param)
    _elemt_kernel[(triton.cdiv(n, BLOCK.value),)](
        x,
        residual if residual is not None else x,
        out,
        center,
        scale,
        shift,
        n,
        inner,
        channels,
        _act(activation),
        hi,
        lo,
        int(residual is not None),
        COMPUTE=compute_dtype(x.dtype),
    )


def bwd_reduce(
    grad,
    input,
    output,
    residual,
    center,
    sum_dz,
    sum_dzv,
    grad_residual,
    outer,
    channels,
    inner,
    activation,
    param,
    from_output,
):
    parts, span = _split(outer, inner)
    opts = {"dtype": torch.float64, "device": grad.device}
    p1, p2 = (torch.empty(parts * channels, **opts) for _ in range(2))
    hi, lo = f64_halves(param)
    _bwd_reduce_partial_kernel[(parts, triton.cdiv(channels, COLS.value))](
        grad,
        input if input is not None else grad,
        output if output is not None else grad,
        residual if residual is not None else grad,
        grad_residual if grad_residual is not None else grad,
        center,
        p1,
        p2,
        outer * inner,
        inner,
        channels,
        span,
        _act(activation),
        hi,
        lo,
        int(from_output),
        int(residual is not None),
        int(grad_residual is not None),
        COMPUTE=compute_dtype(grad.dtype),
    )
    _sum_combine_kernel[(triton.cdiv(channels, COMBINE_COLS.value),)](p1, p2, sum_dz, sum_dzv, channels, parts)


def bwd_elemt(
    grad, input, output, residual, center, a, b, c, grad_input, outer, channels, inner, activation, param, from_output
):
    n = grad.numel()
    hi, lo = f64_halves(param)
    _bwd_elemt_kernel[(triton.cdiv(n, BLOCK.value),)](
        grad,
        input if input is not None else grad,
        output if output is not None else grad,
        residual if residual is not None else grad,
        grad_input,
        center,
        a,
        b if b is not None else a,
        c if c is not None else a,
        n,
        inner,
        channels,
        _act(activation),
        hi,
        lo,
        int(from_output),
        int(residual is not None),
        int(b is not None),
        COMPUTE=compute_dtype(grad.dtype),
    )


# ---- ahead-of-time variants ----------------------------------------------------------------------
# Sizes are never specialised: each is i32 or i64 by its value; channels and parts always fit i32.
# Forms of (count, inner, span) with inner, span <= count, and of (n, inner) with inner <= n.
REDUCE_FORMS = (
    ("i32", "i32", "i32"),
    ("i64", "i32", "i32"),
    ("i64", "i64", "i32"),
    ("i64", "i32", "i64"),
    ("i64", "i64", "i64"),
)
ELEMENTWISE_FORMS = (("i32", "i32"), ("i64", "i32"), ("i64", "i64"))


def aot_variants():
    """Every specialisation the launchers above can launch, for ahead-of-time compilation (tools/triton_aot.py):
    (label, jit function, signature {runtime argument: Triton type}, constexprs {name: value})."""
    variants = []
    flags = ("act", "p_hi", "p_lo", "has_r")
    for ty, compute in DTYPES.values():
        acc = "fp64" if ty == "fp64" else "fp32"
        for count, inner, span in REDUCE_FORMS:
            sizes = {"count": count, "inner": inner, "C": "i32", "span": span}
            form = f"{count},{inner},{span}"
            sig = {"x_ptr": f"*{ty}"} | {k: "*fp64" for k in ("pn_ptr", "pmean_ptr", "pm2_ptr")} | sizes
            variants.append((f"stats_partial[{ty},{form}]", _stats_partial_kernel, sig, {"COMPUTE": compute}))
            sig = {k: f"*{ty}" for k in ("g_ptr", "x_ptr", "y_ptr", "r_ptr", "dr_ptr")}
            sig |= {"center_ptr": f"*{acc}", "p1_ptr": "*fp64", "p2_ptr": "*fp64"} | sizes
            sig |= {k: "i32" for k in ("act", "p_hi", "p_lo", "from_output", "has_r", "write_dr")}
            variants.append((f"bwd_reduce_partial[{ty},{form}]", _bwd_reduce_partial_kernel, sig, {"COMPUTE": compute}))
        for n, inner in ELEMENTWISE_FORMS:
            sizes = {"n": n, "inner": inner, "C": "i32"}
            sig = {k: f"*{ty}" for k in ("x_ptr", "r_ptr", "out_ptr")}
            sig |= {k: f"*{acc}" for k in ("center_ptr", "scale_ptr", "shift_ptr")} | sizes
            sig |= {k: "i32" for k in flags}
            variants.append((f"elemt[{ty},{n},{inner}]", _elemt_kernel, sig, {"COMPUTE": compute}))
            sig = {k: f"*{ty}" for k in ("g_ptr", "x_ptr", "y_ptr", "r_ptr", "out_ptr")}
            sig |= {k: f"*{acc}" for k in ("center_ptr", "a_ptr", "b_ptr", "c_ptr")} | sizes
            sig |= {k: "i32" for k in ("act", "p_hi", "p_lo", "from_output", "has_r", "training")}
            variants.append((f"bwd_elemt[{ty},{n},{inner}]", _bwd_elemt_kernel, sig, {"COMPUTE": compute}))
    for acc in ("fp32", "fp64"):
        sig = {k: "*fp64" for k in ("pn_ptr", "pmean_ptr", "pm2_ptr")}
        sig |= {"mean_ptr": f"*{acc}", "var_ptr": f"*{acc}", "C": "i32", "parts": "i32"}
        variants.append((f"stats_combine[{acc}]", _stats_combine_kernel, sig, {}))
        sig = {
            "p1_ptr": "*fp64",
            "p2_ptr": "*fp64",
            "s1_ptr": f"*{acc}",
            "s2_ptr": f"*{acc}",
            "C": "i32",
            "parts": "i32",
        }
        variants.append((f"sum_combine[{acc}]", _sum_combine_kernel, sig, {}))
    return variants

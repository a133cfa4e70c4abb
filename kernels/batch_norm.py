"""Triton kernels of the batch_norm family and their launchers.

The host side (checks, layout, allocation, per-channel coefficients) is C++ (csrc/batch_norm.h) for
every backend; a launcher receives checked, allocated tensors on one device and only launches. The
data is [outer, C, inner] dense: element (o, c, i) at (o * C + c) * inner + i (NCHW as [N, C, H * W],
channels_last as [N * H * W, C, 1]); a channel's M = outer * inner values are its positions q, with
(o, i) = divmod(q, inner). Per-channel coefficients are dense float32 (float64 for float64 data).

Reductions are split over positions as well as channels: program (part, channel block), both folded
into grid x, reduces a tile of ROWS positions x COLS channels at a time over its span of positions
(tile results in the compute dtype, accumulated in float64) and writes partial results; a second
kernel combines the parts of each channel in part order (deterministic, no atomics). The number of
parts depends on the shape only (split(): enough programs for 2 waves on an H100). Statistics are
per-tile two-pass (tile mean, then squared deviations from it) merged with Chan's formula.

The elementwise kernels walk TILE_R x TILE_C tiles of a 2-d view whose rows or columns carry the
channel, so that no element pays a division: [outer, C * inner] where inner is small (channels_last:
inner 1; the channel is the column // inner, once per column) and [outer * C, inner] otherwise (the
channel is the row modulo C, once per row). plan()
gives every launcher's grids as a pure function of the shape.

The activation (kernels/_common.py's codes and math), its parameter and the optional operands are
runtime arguments (one compiled kernel per dtype serves every form); absent tensors are masked out of
every load.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    ACTIVATIONS,
    DTYPES,
    act_fwd,
    act_grad,
    act_inv,
    compute_dtype,
    f64,
    f64_halves,
    i64,
    i64_halves,
    two_waves,
)

# Elementwise tile: TILE_R rows x TILE_C columns of the [rows, cols] view (_view).
TILE_R: tl.constexpr = tl.constexpr(32)
TILE_C: tl.constexpr = tl.constexpr(32)
# Reduction tile (positions x channels).
ROWS: tl.constexpr = tl.constexpr(128)
COLS: tl.constexpr = tl.constexpr(8)
# Channels per program of the combine kernels.
COMBINE_COLS: tl.constexpr = tl.constexpr(128)
# How a channel's positions are split (split()): enough (part, channel block) programs for PROGRAMS, 2
# waves on an H100 at the reductions' occupancy: their registers per thread on sm_90 (tools/triton_aot.py
# reports them) are 62 (_stats_partial_kernel, every dtype) and 96 (_bwd_reduce_partial_kernel, float32),
# so 8 and 5 programs of 4 warps are resident per SM; the fewer registers need the more programs. A part
# is at least MIN_SPAN positions (one tile) and at most MAX_SPAN, a channel at most MAX_PARTS parts.
PROGRAMS = two_waves(62)
MIN_SPAN = 128
MAX_SPAN = 16384
MAX_PARTS = 1024
# Sizes travel as int32 halves (kernels/_common.py's i64_halves), never specialised: one compiled kernel
# per dtype (and view) serves every size, past int32 included.
SIZES = ["count_hi", "count_lo", "inner_hi", "inner_lo", "span_hi", "span_lo"]
VIEW = ["rows_hi", "rows_lo", "cols_hi", "cols_lo"]


def _act(name):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"pyops.kernels.batch_norm: unknown activation {name!r}, expected one of {sorted(ACTIVATIONS)}"
        ) from None


@triton.jit
def _dz_v(g_ptr, x_ptr, y_ptr, r_ptr, offs, mask, need_v, cen, act, p, from_output, has_r, COMPUTE: tl.constexpr):
    """dz = g act'(y) and, where need_v, v = x - center, or act^-1(y) - r - center from the output; each
    operand loaded once, and only where it is used."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    need_y = (act != 0) | ((from_output != 0) & (need_v != 0))
    y = tl.load(y_ptr + offs, mask=mask & need_y, other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask & (need_v != 0) & (from_output == 0), other=0.0).to(COMPUTE)
    r = tl.load(r_ptr + offs, mask=mask & (need_v != 0) & (has_r != 0) & (from_output != 0), other=0.0).to(COMPUTE)
    dz = act_grad(g, y, act, p)
    v = tl.where(from_output != 0, act_inv(y, act, p) - r, x) - cen
    return dz, v


@triton.jit
def _elemt_tile(rows, cols, step, LAST: tl.constexpr):
    """Offsets, mask, channels and their mask of this program's TILE_R x TILE_C tile of the [rows, cols]
    view: LAST, [outer, C * inner] with inner < TILE_C (channels_last: inner 1), the channel is the
    column // step (= inner); else [outer * C, inner], the row % step (= C). One division per row or
    column, none per element. The tile comes from the program id, column blocks fastest (neighbouring
    programs read neighbouring memory)."""
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(cols, TILE_C).to(tl.int64)
    rb = pid // col_blocks
    r = rb * TILE_R + tl.arange(0, TILE_R).to(tl.int64)
    j = (pid - rb * col_blocks) * TILE_C + tl.arange(0, TILE_C).to(tl.int64)
    offs = r[:, None] * cols + j[None, :]
    mask = (r < rows)[:, None] & (j < cols)[None, :]
    if LAST:
        c = (j // step)[None, :]
        cmask = (j < cols)[None, :]
    else:
        c = (r % step)[:, None]
        cmask = c >= 0
    return offs, mask, c, cmask


# ---- statistics ----------------------------------------------------------------------------------
@triton.jit
def _tile(count, inner, C, start, hi, cols):
    q = start + tl.arange(0, ROWS).to(tl.int64)
    o = q // inner
    i = q - o * inner
    offs = (o[:, None] * C + cols[None, :]) * inner + i[:, None]
    mask = (q < hi)[:, None] & (cols < C)[None, :]
    return offs, mask


@triton.jit
def _part(parts, span, count):
    """This program's part, channels and span of positions [lo, hi): the grid is parts x channel
    blocks folded into x (parts fastest), so no grid dimension but x grows with the shape."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid // parts
    part = pid - cb * parts
    cols = cb * COLS + tl.arange(0, COLS).to(tl.int64)
    lo = part * span
    hi = tl.minimum(lo + span, count)
    return part, cols, lo, hi


@triton.jit(do_not_specialize=SIZES + ["C", "parts"])
def _stats_partial_kernel(
    x_ptr,
    pn_ptr,
    pmean_ptr,
    pm2_ptr,
    count_hi,
    count_lo,
    inner_hi,
    inner_lo,
    C,
    span_hi,
    span_lo,
    parts,
    COMPUTE: tl.constexpr,
):
    count, inner = i64(count_hi, count_lo), i64(inner_hi, inner_lo)
    part, cols, lo, hi = _part(parts, i64(span_hi, span_lo), count)
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
    for p in range(0, parts):  # in part order: the same bits on every run
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
    for p in range(0, parts):  # in part order
        s1 += tl.load(p1_ptr + p * C + cols, mask=cm, other=0.0)
        s2 += tl.load(p2_ptr + p * C + cols, mask=cm, other=0.0)
    tl.store(s1_ptr + cols, s1.to(s1_ptr.dtype.element_ty), mask=cm)
    tl.store(s2_ptr + cols, s2.to(s2_ptr.dtype.element_ty), mask=cm)


# ---- forward, elementwise ------------------------------------------------------------------------
@triton.jit(do_not_specialize=VIEW + ["step", "act", "p_hi", "p_lo", "has_r"])
def _elemt_kernel(
    x_ptr,
    r_ptr,
    out_ptr,
    center_ptr,
    scale_ptr,
    shift_ptr,
    rows_hi,
    rows_lo,
    cols_hi,
    cols_lo,
    step,
    act,
    p_hi,
    p_lo,
    has_r,
    COMPUTE: tl.constexpr,
    LAST: tl.constexpr,
):
    offs, m, c, cm = _elemt_tile(i64(rows_hi, rows_lo), i64(cols_hi, cols_lo), step, LAST)
    p = f64(p_hi, p_lo).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(COMPUTE)
    cen = tl.load(center_ptr + c, mask=cm, other=0.0)
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0)
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0)
    r = tl.load(r_ptr + offs, mask=m & (has_r != 0), other=0.0).to(COMPUTE)
    z = (x - cen) * scale + shift + r
    tl.store(out_ptr + offs, act_fwd(z, act, p).to(out_ptr.dtype.element_ty), mask=m)


# ---- backward ------------------------------------------------------------------------------------
@triton.jit(
    do_not_specialize=SIZES
    + [
        "C",
        "parts",
        "act",
        "p_hi",
        "p_lo",
        "from_output",
        "has_r",
        "write_dr",
    ]
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
    count_hi,
    count_lo,
    inner_hi,
    inner_lo,
    C,
    span_hi,
    span_lo,
    parts,
    act,
    p_hi,
    p_lo,
    from_output,
    has_r,
    write_dr,
    COMPUTE: tl.constexpr,
):
    count, inner = i64(count_hi, count_lo), i64(inner_hi, inner_lo)
    part, cols, lo, hi = _part(parts, i64(span_hi, span_lo), count)
    cm = cols < C
    p = f64(p_hi, p_lo).to(COMPUTE)
    cen = tl.load(center_ptr + cols, mask=cm, other=0.0)
    s1 = tl.zeros([COLS], dtype=tl.float64)
    s2 = tl.zeros([COLS], dtype=tl.float64)
    for start in range(lo, hi, ROWS):
        offs, mask = _tile(count, inner, C, start, hi, cols)
        dz, v = _dz_v(g_ptr, x_ptr, y_ptr, r_ptr, offs, mask, 1, cen[None, :], act, p, from_output, has_r, COMPUTE)
        # tile sums in the compute dtype, added up in float64
        s1 += tl.sum(tl.where(mask, dz, 0.0), axis=0).to(tl.float64)
        s2 += tl.sum(tl.where(mask, dz * v, 0.0), axis=0).to(tl.float64)
        tl.store(dr_ptr + offs, dz.to(dr_ptr.dtype.element_ty), mask=mask & (write_dr != 0))
    idx = part * C + cols
    tl.store(p1_ptr + idx, s1, mask=cm)
    tl.store(p2_ptr + idx, s2, mask=cm)


@triton.jit(do_not_specialize=VIEW + ["step", "act", "p_hi", "p_lo", "from_output", "has_r", "training"])
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
    rows_hi,
    rows_lo,
    cols_hi,
    cols_lo,
    step,
    act,
    p_hi,
    p_lo,
    from_output,
    has_r,
    training,
    COMPUTE: tl.constexpr,
    LAST: tl.constexpr,
):
    offs, m, c, cm = _elemt_tile(i64(rows_hi, rows_lo), i64(cols_hi, cols_lo), step, LAST)
    p = f64(p_hi, p_lo).to(COMPUTE)
    cen = tl.load(center_ptr + c, mask=cm, other=0.0)
    ca = tl.load(a_ptr + c, mask=cm, other=0.0)
    cb = tl.load(b_ptr + c, mask=cm & (training != 0), other=0.0)
    cc = tl.load(c_ptr + c, mask=cm & (training != 0), other=0.0)
    # g and y once: dz serves training (with v) and evaluation (dx = a dz) alike
    dz, v = _dz_v(g_ptr, x_ptr, y_ptr, r_ptr, offs, m, training, cen, act, p, from_output, has_r, COMPUTE)
    dx = tl.where(training != 0, ca * dz + cb * v + cc, ca * dz)
    tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=m)


# ---- launch plans: pure functions of the shape -----------------------------------------------------
def split(outer, channels, inner, programs=None, min_span=None, max_span=None, max_parts=None):
    """(parts, span): a channel's count = outer * inner positions cut into parts of span positions (a
    whole number of ROWS tiles), from the shape alone (so the reduction order, and the bits, are the
    same on every run and every GPU). Enough parts that parts x channel blocks reaches `programs` where
    the count allows, each part at least `min_span` and (but for the last) `max_span` positions, at
    most `max_parts` parts; the defaults are the module's PROGRAMS, MIN_SPAN, MAX_SPAN and MAX_PARTS
    (tests pass others)."""
    programs = PROGRAMS if programs is None else programs
    min_span = MIN_SPAN if min_span is None else min_span
    max_span = MAX_SPAN if max_span is None else max_span
    max_parts = MAX_PARTS if max_parts is None else max_parts
    count = outer * inner
    if count == 0:
        return 1, 0
    rows = ROWS.value
    blocks = max(1, triton.cdiv(channels, COLS.value))
    want = max(triton.cdiv(programs, blocks), triton.cdiv(count, max_span))
    # the longest span of whole tiles that still gives `want` parts (rounding down: at least as many)
    span = max(min_span, rows, count // want // rows * rows)
    if triton.cdiv(count, span) > max_parts:
        span = triton.cdiv(triton.cdiv(count, max_parts), rows) * rows
    return triton.cdiv(count, span), span


def _view(outer, channels, inner):
    """The elementwise kernels' (rows, cols, step, LAST) view: [outer, C * inner] with the channel the
    column // inner where inner is under a tile's width (channels_last: inner 1), else [outer * C, inner]
    with the channel the row % C (either way few of a tile's lanes fall past the view's edge)."""
    if inner < TILE_C.value:
        return outer, channels * inner, inner, True
    return outer * channels, inner, channels, False


def plan(outer, channels, inner, **split_args):
    """Each launcher's launches for data [outer, channels, inner]: {launcher: [(kernel, grid)]}, the
    grids as the launchers compute them (no launch; split_args as split()'s)."""
    parts, _ = split(outer, channels, inner, **split_args)
    reduce = (parts * triton.cdiv(channels, COLS.value),)
    combine = (triton.cdiv(channels, COMBINE_COLS.value),)
    rows, cols, _, _ = _view(outer, channels, inner)
    tiles = (triton.cdiv(rows, TILE_R.value) * triton.cdiv(cols, TILE_C.value),)
    return {
        "stats": [(_stats_partial_kernel, reduce), (_stats_combine_kernel, combine)],
        "elemt": [(_elemt_kernel, tiles)],
        "bwd_reduce": [(_bwd_reduce_partial_kernel, reduce), (_sum_combine_kernel, combine)],
        "bwd_elemt": [(_bwd_elemt_kernel, tiles)],
    }


# ---- launchers -----------------------------------------------------------------------------------
def stats(x, mean, var, outer, channels, inner):
    if channels == 0:
        return
    parts, span = split(outer, channels, inner)
    count = outer * inner
    opts = {"dtype": torch.float64, "device": x.device}
    pn, pmean, pm2 = (torch.empty(parts * channels, **opts) for _ in range(3))
    compute = compute_dtype(x.dtype)
    _stats_partial_kernel[(parts * triton.cdiv(channels, COLS.value),)](
        x,
        pn,
        pmean,
        pm2,
        *i64_halves(count),
        *i64_halves(inner),
        channels,
        *i64_halves(span),
        parts,
        COMPUTE=compute,
    )
    _stats_combine_kernel[(triton.cdiv(channels, COMBINE_COLS.value),)](pn, pmean, pm2, mean, var, channels, parts)


def elemt(x, residual, out, center, scale, shift, outer, channels, inner, activation, param):
    rows, cols, step, last = _view(outer, channels, inner)
    if rows * cols == 0:
        return
    hi, lo = f64_halves(param)
    _elemt_kernel[(triton.cdiv(rows, TILE_R.value) * triton.cdiv(cols, TILE_C.value),)](
        x,
        residual if residual is not None else x,
        out,
        center,
        scale,
        shift,
        *i64_halves(rows),
        *i64_halves(cols),
        step,
        _act(activation),
        hi,
        lo,
        int(residual is not None),
        COMPUTE=compute_dtype(x.dtype),
        LAST=last,
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
    if channels == 0:
        return
    parts, span = split(outer, channels, inner)
    opts = {"dtype": torch.float64, "device": grad.device}
    p1, p2 = (torch.empty(parts * channels, **opts) for _ in range(2))
    hi, lo = f64_halves(param)
    _bwd_reduce_partial_kernel[(parts * triton.cdiv(channels, COLS.value),)](
        grad,
        input if input is not None else grad,
        output if output is not None else grad,
        residual if residual is not None else grad,
        grad_residual if grad_residual is not None else grad,
        center,
        p1,
        p2,
        *i64_halves(outer * inner),
        *i64_halves(inner),
        channels,
        *i64_halves(span),
        parts,
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
    rows, cols, step, last = _view(outer, channels, inner)
    if rows * cols == 0:
        return
    hi, lo = f64_halves(param)
    _bwd_elemt_kernel[(triton.cdiv(rows, TILE_R.value) * triton.cdiv(cols, TILE_C.value),)](
        grad,
        input if input is not None else grad,
        output if output is not None else grad,
        residual if residual is not None else grad,
        grad_input,
        center,
        a,
        b if b is not None else a,
        c if c is not None else a,
        *i64_halves(rows),
        *i64_halves(cols),
        step,
        _act(activation),
        hi,
        lo,
        int(from_output),
        int(residual is not None),
        int(b is not None),
        COMPUTE=compute_dtype(grad.dtype),
        LAST=last,
    )


# ---- ahead-of-time variants ----------------------------------------------------------------------
def aot_variants():
    """Every specialisation the launchers above can launch, for ahead-of-time compilation (tools/triton_aot.py):
    (label, jit function, signature {runtime argument: Triton type}, constexprs {name: value}). Sizes
    are int32 halves and channels and parts fit int32: one variant per dtype (and view) whatever the sizes."""
    variants = []
    for ty, compute in DTYPES.values():
        acc = "fp64" if ty == "fp64" else "fp32"
        sizes = {k: "i32" for k in SIZES[:4]} | {"C": "i32"} | {k: "i32" for k in SIZES[4:]} | {"parts": "i32"}
        sig = {"x_ptr": f"*{ty}"} | {k: "*fp64" for k in ("pn_ptr", "pmean_ptr", "pm2_ptr")} | sizes
        variants.append((f"stats_partial[{ty}]", _stats_partial_kernel, sig, {"COMPUTE": compute}))
        sig = {k: f"*{ty}" for k in ("g_ptr", "x_ptr", "y_ptr", "r_ptr", "dr_ptr")}
        sig |= {"center_ptr": f"*{acc}", "p1_ptr": "*fp64", "p2_ptr": "*fp64"} | sizes
        sig |= {k: "i32" for k in ("act", "p_hi", "p_lo", "from_output", "has_r", "write_dr")}
        variants.append((f"bwd_reduce_partial[{ty}]", _bwd_reduce_partial_kernel, sig, {"COMPUTE": compute}))
        view = {k: "i32" for k in VIEW} | {"step": "i32"}
        for last in (True, False):
            consts = {"COMPUTE": compute, "LAST": last}
            form = f"{ty},{'last' if last else 'planes'}"
            sig = {k: f"*{ty}" for k in ("x_ptr", "r_ptr", "out_ptr")}
            sig |= {k: f"*{acc}" for k in ("center_ptr", "scale_ptr", "shift_ptr")} | view
            sig |= {k: "i32" for k in ("act", "p_hi", "p_lo", "has_r")}
            variants.append((f"elemt[{form}]", _elemt_kernel, sig, consts))
            sig = {k: f"*{ty}" for k in ("g_ptr", "x_ptr", "y_ptr", "r_ptr", "out_ptr")}
            sig |= {k: f"*{acc}" for k in ("center_ptr", "a_ptr", "b_ptr", "c_ptr")} | view
            sig |= {k: "i32" for k in ("act", "p_hi", "p_lo", "from_output", "has_r", "training")}
            variants.append((f"bwd_elemt[{form}]", _bwd_elemt_kernel, sig, consts))
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

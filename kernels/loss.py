"""Triton kernels of the loss family and their launchers.

The launchers are pure kernels: the host side (argument checks, output allocation, layout, the
reductions' scales) lives in C++ (csrc/loss.h) for every backend. A launcher receives checked,
allocated tensors on one device and only launches; it returns None. Elementwise tensors are
non-overlapping and dense with identical strides and are walked in memory order.

Reductions are deterministic: each program sums its block into partials[program] (float32, float64
for float64) and one program then adds the partials in a fixed order. Half types compute in float32,
float64 stays float64; runtime scalars travel as float64 bit halves (kernels/_common.py's f64_halves).

Cross entropy runs ROWS rows of a CBLOCK-class step per program, the tile from the class count
(ce_tile(); plan() gives the launch from the shape): many rows of few classes share a program.
"""

import torch
import triton
import triton.language as tl

from ._common import DTYPES, INT_FORMS, compute_dtype, f64, f64_halves, i64, i64_halves, int_args

# Elements per program of the elementwise kernels (512: 8,192 programs for 4M elements, ~4 waves on an
# H100 however few registers a Triton version gives the reduction: at 1024 one with 30 registers held 16
# programs an SM and made 1.94 waves), and partials read per step of the final sum.
BLOCK: tl.constexpr = tl.constexpr(512)
RBLOCK: tl.constexpr = tl.constexpr(1024)
# Cross entropy tiles (ce_tile()): (classes per step, rows per program), 1024 lanes (512 for 128
# classes: 8 rows of them spilled registers; 2048 for the widest); rows past the widest step loop over
# their classes. Four, so that few classes (10-21: classification heads, segmentation over N * H * W
# rows) do not run mostly masked lanes and the variants stay few.
# Not 2 waves everywhere: a row of more than 2048 classes is one program, so 256 rows of a 32,000-word
# vocabulary launch 256 programs, under half a wave at this kernel's 4-5 resident programs per SM (~100
# to 150 registers). Two waves there need a row split over programs (maxima and sums per (row, part),
# a per-row combine, the gradient per (row, part): two more launches); language-model batches have
# sequences x tokens rows (256 x 1024 = 262,144), far past 2 waves without it.
CE_TILES = ((16, 64), (32, 32), (128, 4), (2048, 1))
# What tools/launch_plan.py lets stay under 2 waves, and why (the comment above).
LAUNCH_EXEMPTIONS = {
    "_cross_entropy_kernel": "a program per row of more than 2048 classes: fewer rows than 2 waves of programs "
    "(256 x 32,000) leave SMs idle; the row split over programs is not built",
}

KIND_L1: tl.constexpr = tl.constexpr(0)
KIND_MSE: tl.constexpr = tl.constexpr(1)
KIND_HUBER: tl.constexpr = tl.constexpr(2)
KINDS = (KIND_L1.value, KIND_MSE.value, KIND_HUBER.value)


def _kind(kind):
    if kind not in KINDS:
        raise ValueError(f"pyops.kernels.loss: unknown kind {kind!r}, expected one of {KINDS}")
    return kind


@triton.jit
def _loss(d, delta, KIND: tl.constexpr):
    if KIND == KIND_L1:
        out = tl.abs(d)
    elif KIND == KIND_MSE:
        out = d * d
    else:
        tl.static_assert(KIND == KIND_HUBER)
        a = tl.abs(d)
        out = tl.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    return out


@triton.jit
def _deriv(d, delta, KIND: tl.constexpr):
    if KIND == KIND_L1:  # sign(d): 0 at zero error and for NaN (torch's sign)
        out = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    elif KIND == KIND_MSE:
        out = d + d
    else:
        tl.static_assert(KIND == KIND_HUBER)
        out = tl.where(d > delta, delta, tl.where(d < -delta, -delta, d))
    return out


@triton.jit
def _block(n):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return offs, offs < n


@triton.jit(do_not_specialize=["delta_hi", "delta_lo"])
def _pointwise_kernel(x_ptr, t_ptr, out_ptr, n, delta_hi, delta_lo, KIND: tl.constexpr, COMPUTE: tl.constexpr):
    offs, inb = _block(n)
    d = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE) - tl.load(t_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    tl.store(out_ptr + offs, _loss(d, f64(delta_hi, delta_lo).to(COMPUTE), KIND).to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["delta_hi", "delta_lo"])
def _pointwise_bwd_kernel(
    g_ptr, x_ptr, t_ptr, gi_ptr, n, delta_hi, delta_lo, KIND: tl.constexpr, COMPUTE: tl.constexpr
):
    offs, inb = _block(n)
    d = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE) - tl.load(t_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    gi = g * _deriv(d, f64(delta_hi, delta_lo).to(COMPUTE), KIND)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["delta_hi", "delta_lo", "scale_hi", "scale_lo"])
def _reduce_blocks_kernel(
    x_ptr,
    t_ptr,
    grad_ptr,
    partials_ptr,
    n,
    delta_hi,
    delta_lo,
    scale_hi,
    scale_lo,
    KIND: tl.constexpr,
    COMPUTE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    offs, inb = _block(n)
    d = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE) - tl.load(t_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    delta = f64(delta_hi, delta_lo).to(COMPUTE)
    loss = tl.where(inb, _loss(d, delta, KIND), 0.0)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(loss.to(partials_ptr.dtype.element_ty), axis=0))
    if HAS_GRAD:
        g = _deriv(d, delta, KIND) * f64(scale_hi, scale_lo).to(COMPUTE)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["scale_hi", "scale_lo"])
def _sum_partials_kernel(partials_ptr, out_ptr, count, scale_hi, scale_lo):
    acc = tl.zeros([RBLOCK], dtype=partials_ptr.dtype.element_ty)
    for start in range(0, count, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < count, other=0.0)
    total = tl.sum(acc, axis=0) * f64(scale_hi, scale_lo).to(partials_ptr.dtype.element_ty)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


def pointwise(x, target, out, kind, delta):
    """out = loss(x - target) elementwise: l1 |d|, mse d^2, huber (|d| < delta ? d^2 / 2 : delta (|d| - delta / 2))."""
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK.value),)
        _pointwise_kernel[grid](x, target, out, n, *f64_halves(delta), KIND=_kind(kind), COMPUTE=compute_dtype(x.dtype))


def pointwise_bwd(grad, x, target, grad_in, kind, delta):
    """grad_in = grad * loss'(x - target): l1 sign(d) (0 at 0), mse 2 d, huber clamp(d, -delta, delta)."""
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK.value),)
        _pointwise_bwd_kernel[grid](
            grad, x, target, grad_in, n, *f64_halves(delta), KIND=_kind(kind), COMPUTE=compute_dtype(x.dtype)
        )


def pointwise_reduce(x, target, out, grad, partials, kind, delta, scale):
    """out (0-d) = scale * sum loss(x - target); grad (when given) = scale * loss'(x - target). partials
    holds one float32 (float64 for float64) per block of BLOCK elements."""
    n = x.numel()
    blocks = triton.cdiv(n, BLOCK.value)
    assert partials.numel() >= blocks, "pyops.kernels.loss.pointwise_reduce: partials too short"
    has_grad = grad is not None
    _reduce_blocks_kernel[(blocks,)](
        x,
        target,
        grad if has_grad else x,
        partials,
        n,
        *f64_halves(delta),
        *f64_halves(scale),
        KIND=_kind(kind),
        COMPUTE=compute_dtype(x.dtype),
        HAS_GRAD=has_grad,
    )
    _sum_partials_kernel[(1,)](partials, out, blocks, *f64_halves(scale))


# ---- softmax cross entropy: ROWS rows of C classes per program --------------------------------------
@triton.jit(do_not_specialize=["rows_hi", "rows_lo", "eps_hi", "eps_lo", "ignore_index"])
def _cross_entropy_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    scale_ptr,
    loss_ptr,
    grad_ptr,
    rows_hi,
    rows_lo,
    C,
    ignore_index,
    eps_hi,
    eps_lo,
    COMPUTE: tl.constexpr,
    PROBS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    CBLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    live_row = row < i64(rows_hi, rows_lo)
    base = row * C
    cols = tl.arange(0, CBLOCK)
    eps = f64(eps_hi, eps_lo).to(COMPUTE)
    eps_c = eps / C
    keep = 1.0 - eps
    gscale = tl.load(scale_ptr).to(COMPUTE)
    # pass 1: each row's maximum
    mv = tl.full([ROWS, CBLOCK], float("-inf"), COMPUTE)
    for c0 in range(0, C, CBLOCK):
        c = c0 + cols
        inb = live_row[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + base[:, None] + c[None, :], mask=inb, other=float("-inf")).to(COMPUTE)
        mv = tl.maximum(mv, x)
    mx = tl.where(live_row, tl.max(mv, axis=1), 0.0)
    # pass 2: sum exp(x - mx); sum w (x - mx) (smoothing), sum w q', sum w q' (x - mx) (probabilities)
    sv = tl.zeros([ROWS, CBLOCK], COMPUTE)
    av = tl.zeros([ROWS, CBLOCK], COMPUTE)
    bv = tl.zeros([ROWS, CBLOCK], COMPUTE)
    wv = tl.zeros([CBLOCK], COMPUTE)
    for c0 in range(0, C, CBLOCK):
        c = c0 + cols
        inc = c < C
        inb = live_row[:, None] & inc[None, :]
        xv = tl.load(x_ptr + base[:, None] + c[None, :], mask=inb, other=0.0).to(COMPUTE) - mx[:, None]
        sv += tl.where(inb, tl.exp(xv), 0.0)
        w = tl.load(w_ptr + c, mask=inc, other=0.0).to(COMPUTE)
        wv += w
        if PROBS:
            q = tl.load(t_ptr + base[:, None] + c[None, :], mask=inb, other=0.0).to(COMPUTE)
            wq = tl.where(inb, (q * keep + eps_c) * w[None, :], 0.0)
            av += wq
            bv += wq * xv
        else:
            av += tl.where(inb, w[None, :] * xv, 0.0)
    s = tl.where(live_row, tl.sum(sv, axis=1), 1.0)
    logs = tl.log(s)
    if PROBS:
        sa = tl.sum(av, axis=1)
        loss = sa * logs - tl.sum(bv, axis=1)
        coef_p = sa
        coef_w = 1.0
        live = 1.0
        tc = -1
        wt = 0.0
    else:
        t = tl.load(t_ptr + row, mask=live_row, other=ignore_index)
        ignored = t == ignore_index
        # an index out of range (the host side checks CPU targets; a GPU cannot raise without a host
        # synchronisation) reads nothing out of bounds and makes the row's loss and gradient NaN
        bad = ((t < 0) | (t >= C)) & (t != ignore_index)
        tc = tl.where(ignored | bad, 0, t)
        live = tl.where(ignored, 0.0, tl.where(bad, float("nan"), 1.0)).to(COMPUTE)
        wt = tl.load(w_ptr + tc, mask=live_row, other=0.0).to(COMPUTE)
        xt = tl.load(x_ptr + base + tc, mask=live_row, other=0.0).to(COMPUTE) - mx
        wsum = tl.sum(wv, axis=0)
        loss = keep * wt * (logs - xt)
        if eps != 0:
            loss += eps_c * (wsum * logs - tl.sum(av, axis=1))
        loss = tl.where(ignored, 0.0, loss * live)
        coef_p = keep * wt + eps_c * wsum
        coef_w = eps_c
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty), mask=live_row)
    if HAS_GRAD:
        # ignored rows: 0 (the mean's scale is inf when every row is ignored)
        lscale = tl.where(live == 0, 0.0, live * gscale)
        fp = lscale * coef_p / s
        fw = lscale * coef_w
        for c0 in range(0, C, CBLOCK):
            c = c0 + cols
            inc = c < C
            inb = live_row[:, None] & inc[None, :]
            xv = tl.load(x_ptr + base[:, None] + c[None, :], mask=inb, other=0.0).to(COMPUTE) - mx[:, None]
            w = tl.load(w_ptr + c, mask=inc, other=0.0).to(COMPUTE)[None, :]
            if PROBS:
                q = tl.load(t_ptr + base[:, None] + c[None, :], mask=inb, other=0.0).to(COMPUTE)
                sub = (q * keep + eps_c) * w * fw
            else:
                sub = w * fw[:, None] + tl.where(c[None, :] == tc[:, None], (lscale * keep * wt)[:, None], 0.0)
            g = tl.exp(xv) * fp[:, None] - sub
            tl.store(grad_ptr + base[:, None] + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=inb)


def ce_tile(classes):
    """(CBLOCK, ROWS): classes per step and rows per program of a cross entropy over `classes` classes,
    the first of CE_TILES whose step holds every class (else the widest step, one row looping over its
    classes): few classes share a program between many rows rather than idle most lanes."""
    for cblock, rows in CE_TILES:
        if classes <= cblock:
            return cblock, rows
    return CE_TILES[-1]


def plan(rows, classes):
    """The cross entropy launcher's launch for x (rows, classes): [(kernel, grid)] (no launch)."""
    if rows == 0 or classes == 0:
        return []
    return [(_cross_entropy_kernel, (triton.cdiv(rows, ce_tile(classes)[1]),))]


def cross_entropy(x, target, weight, scale, loss_rows, grad, ignore_index, label_smoothing):
    """Per row of x (M, C contiguous): loss_rows (M,) and, when grad is given, grad (M, C); target: class
    indices (M,) int64 or probabilities (M, C); weight (C,) and the gradient's scale (0-d) in the compute
    dtype (csrc/loss.h has the math)."""
    rows, classes = x.shape
    if rows == 0 or classes == 0:
        return
    cblock, per_program = ce_tile(classes)
    _cross_entropy_kernel[(triton.cdiv(rows, per_program),)](
        x,
        target,
        weight,
        scale,
        loss_rows,
        grad if grad is not None else x,
        *i64_halves(rows),
        classes,
        ignore_index,
        *f64_halves(label_smoothing),
        COMPUTE=compute_dtype(x.dtype),
        PROBS=target.is_floating_point(),
        HAS_GRAD=grad is not None,
        CBLOCK=cblock,
        ROWS=per_program,
    )


# ---- ahead-of-time compilation -----------------------------------------------------------------
def aot_variants():
    """Every specialisation the launchers above can launch, for ahead-of-time compilation (tools/triton_aot.py):
    (label, jit function, signature {runtime argument: Triton type}, constexprs {name: value})."""
    variants = []
    for torch_dtype, (ty, compute) in DTYPES.items():
        pty = "fp64" if torch_dtype == torch.float64 else "fp32"
        for kind in KINDS:
            for n in INT_FORMS:
                sig = {"x_ptr": f"*{ty}", "t_ptr": f"*{ty}", "out_ptr": f"*{ty}", "delta_hi": "i32", "delta_lo": "i32"}
                consts = {"KIND": kind, "COMPUTE": compute}
                variants.append((f"pointwise[{kind},{ty}{int_args(sig, consts, n=n)}]", _pointwise_kernel, sig, consts))
                sig = {a: f"*{ty}" for a in ("g_ptr", "x_ptr", "t_ptr", "gi_ptr")} | {
                    "delta_hi": "i32",
                    "delta_lo": "i32",
                }
                consts = {"KIND": kind, "COMPUTE": compute}
                variants.append(
                    (f"pointwise_bwd[{kind},{ty}{int_args(sig, consts, n=n)}]", _pointwise_bwd_kernel, sig, consts)
                )
                for has_grad in (False, True):
                    sig = {a: f"*{ty}" for a in ("x_ptr", "t_ptr", "grad_ptr")} | {"partials_ptr": f"*{pty}"}
                    sig |= {a: "i32" for a in ("delta_hi", "delta_lo", "scale_hi", "scale_lo")}
                    consts = {"KIND": kind, "COMPUTE": compute, "HAS_GRAD": has_grad}
                    label = f"reduce_blocks[{kind},{ty},{has_grad}{int_args(sig, consts, n=n)}]"
                    variants.append((label, _reduce_blocks_kernel, sig, consts))
        for count in ("i32", "i32:16", 1):
            sig = {"partials_ptr": f"*{pty}", "out_ptr": f"*{ty}", "scale_hi": "i32", "scale_lo": "i32"}
            consts = {}
            label = f"sum_partials[{ty}{int_args(sig, consts, count=count)}]"
            variants.append((label, _sum_partials_kernel, sig, consts))
        wty = "fp64" if torch_dtype == torch.float64 else "fp32"
        for probs in (False, True):
            for has_grad in (False, True):
                for cblock, rows in CE_TILES:
                    # a class count 16 divides (hinted: other code, compiled too) in the widest and narrowest
                    # tiles; one class in the narrowest (the count specialised to the constant 1)
                    forms = ("i32", "i32:16", 1) if (cblock, rows) == CE_TILES[0] else ("i32",)
                    if (cblock, rows) == CE_TILES[-1]:
                        forms = ("i32", "i32:16")
                    for classes in forms:
                        sig = {
                            "x_ptr": f"*{ty}",
                            "t_ptr": f"*{ty}" if probs else "*i64",
                            "w_ptr": f"*{wty}",
                            "scale_ptr": f"*{wty}",
                            "loss_ptr": f"*{wty}",
                            "grad_ptr": f"*{ty}",
                            "rows_hi": "i32",
                            "rows_lo": "i32",
                            "ignore_index": "i32",
                            "eps_hi": "i32",
                            "eps_lo": "i32",
                        }
                        consts = {"COMPUTE": compute, "PROBS": probs, "HAS_GRAD": has_grad, "CBLOCK": cblock}
                        consts["ROWS"] = rows
                        label = f"cross_entropy[{ty},{probs},{has_grad},{cblock}x{rows}"
                        label += f"{int_args(sig, consts, C=classes)}]"
                        variants.append((label, _cross_entropy_kernel, sig, consts))
    return variants

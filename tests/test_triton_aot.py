"""Every Triton kernel compiled ahead of time for the GPU (tools/triton_aot.py, no GPU needed); every
launch the launchers really make is one of its family's `aot_variants()`, so that the compile checks
what runs; the fused activation's math (kernels/_common.py) as torch computes it; the Triton
launchers of the activation family and the scalar transport under the interpreter (or on the GPU).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from launches import record_launches, uncovered  # noqa: E402  (imports triton)

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("_pyops_triton_aot", ROOT / "tools" / "triton_aot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AOT = _load_tool()
# Compiling every family's variants for sm_90 takes ~2.5 min of CPU on 2 cores; the limit is for hangs.
COMPILE_TIMEOUT_S = 600


# ---- the ahead-of-time compile --------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a fresh cache, so every variant really compiles and ptxas reports on it
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    out = tmp / "report.json"
    proc = subprocess.run(
        [sys.executable, AOT.__file__, str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
    )
    if not out.exists():  # (a variant that does not compile exits 1 too, with the report written)
        pytest.fail(
            f"the ahead-of-time compile failed to run (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", AOT.FAMILIES)
def test_kernels_compile_for_gpu(aot_report, family):
    info = aot_report["modules"][family]
    assert "error" not in info, f"kernels/{family}.py: loading it or its aot_variants() failed:\n{info.get('error')}"
    results = [r for r in aot_report["results"] if r["module"] == family]
    targets = aot_report["targets"]
    assert info["variants"] > 0 and len(results) == info["variants"] * len(targets)
    print(
        f"\nkernels/{family}.py: {info['variants']} variants x {len(targets)} targets compiled to cubin "
        f"(triton {aot_report['triton']}; all families {aot_report['seconds']:.1f} s on {aot_report['jobs']} "
        f"processes)\n{AOT.summary(results)}"
    )
    spilling = [r for r in results if r["ok"] and r["spills"]]
    for r in spilling:
        print(f"  spills: {r['label']} {r['target']}: {r['spills']} bytes")
    if spilling:
        warnings.warn(
            stacklevel=2,
            message=f"kernels/{family}.py: {len(spilling)} compiled variants spill registers "
            f"(e.g. {spilling[0]['label']} on {spilling[0]['target']})",
        )
    failed = [r for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} variants do not compile:\n{AOT.failures(results)}"


# ---- the variants are the launches ----------------------------------------------------------------
def _assert_covered(launches):
    """Each launch is one of the aot_variants() of the kernels module it comes from."""
    by_module = {}
    for launch in launches:
        by_module.setdefault(launch.fn.__module__, []).append(launch)
    missing = []
    for name, group in sorted(by_module.items()):
        module = sys.modules[name]
        assert hasattr(module, "aot_variants"), f"{name} launches kernels and lists no aot_variants()"
        missing += uncovered(group, module.aot_variants())
    assert not missing, "launches no variant compiles:\n" + "\n".join(missing)


def _randn(*shape, dtype=torch.float64):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _backward(y):
    y.backward(_randn(*y.shape, dtype=y.dtype))


# Each family's ops, forward and backward, on tiny CPU tensors in every dtype, through pyops (the C++
# host side decides the launches): every op, in-place form, option and size form (1 where Triton
# folds it) that picks a different kernel or argument type. Sizes past 2^31 are below (meta tensors).
def _activation_ops(F, dtype):
    for shape in ((1,), (3, 7)):
        x = _randn(*shape, dtype=dtype)
        for op, kwargs in [
            (F.relu, {}),
            (F.leaky_relu, {"negative_slope": 0.1}),
            (F.elu, {}),
            (F.sigmoid, {}),
            (F.tanh, {}),
        ]:
            _backward(op(x.clone().requires_grad_(), **kwargs))
        for op in (F.relu, F.leaky_relu, F.elu):
            _backward(op(x.clone().requires_grad_().clone(), inplace=True))
    for shape, pieces in (((2, 6, 3), 3), ((1, 2), 2)):
        _backward(F.maxout(_randn(*shape, dtype=dtype).requires_grad_(), pieces, dim=1))


def _batch_norm_ops(F, dtype):
    side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = _randn(2, 3, 4, dtype=dtype)
    # (activation, its keyword arguments, memory_efficient, a residual)
    forms = [(None, {}, False, True), ("relu", {}, False, False), ("elu", {"alpha": 1.0}, True, True)]
    for training in (True, False):
        for activation, kwargs, memory_efficient, residual in forms:
            w = (torch.rand(3, dtype=torch.float64) + 0.5).to(side).requires_grad_()
            b = _randn(3, dtype=side).requires_grad_()
            rm, rv = _randn(3, dtype=side), torch.rand(3, dtype=torch.float64).add(0.5).to(side)
            y = F.batch_norm(
                x.clone().requires_grad_(),
                rm,
                rv,
                w,
                b,
                training,
                activation=activation,
                residual=torch.randn_like(x).requires_grad_() if residual else None,
                memory_efficient=memory_efficient,
                **kwargs,
            )
            _backward(y)


def _conv_ops(F, dtype):
    # dense, grouped and depthwise (the direct kernel); with and without bias; each activation
    for channels, groups, out_channels, bias, activation in [
        (4, 1, 6, True, None),
        (4, 1, 6, False, "elu"),
        (4, 2, 6, True, "leaky_relu"),
        (2, 2, 2, False, "relu"),
    ]:
        y = F.conv2d(
            _randn(1, channels, 3, 3, dtype=dtype).requires_grad_(),
            _randn(out_channels, channels // groups, 3, 3, dtype=dtype).requires_grad_(),
            _randn(out_channels, dtype=dtype).requires_grad_() if bias else None,
            padding=1,
            groups=groups,
            activation=activation,
        )
        _backward(y)


def _loss_ops(F, dtype):
    for shape in ((1,), (3, 5)):
        x, t = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
        for fn in (F.l1_loss, F.mse_loss, F.huber_loss, F.rmse_loss):
            for reduction in ("none", "mean") if fn is not F.rmse_loss else ("mean",):
                _backward(fn(x.clone().requires_grad_(), t, reduction=reduction))
            with torch.no_grad():
                fn(x, t)
    for rows, classes in ((4, 5), (3, 1), (2, 130)):
        x = _randn(rows, classes, dtype=dtype)
        index = torch.randint(classes, (rows,))
        index[0] = -100
        probs = torch.softmax(_randn(rows, classes), 1).to(dtype)
        weight = (torch.rand(classes, dtype=torch.float64) + 0.5).to(dtype)
        for target, kwargs, reduction in [
            (index, {}, "mean"),
            (index, {"weight": weight, "label_smoothing": 0.1}, "none"),
            (probs, {"weight": weight, "label_smoothing": 0.2}, "sum"),
        ]:
            _backward(F.cross_entropy(x.clone().requires_grad_(), target, reduction=reduction, **kwargs))
        with torch.no_grad():
            F.cross_entropy(x, index)
            F.cross_entropy(x, probs)


def _optim_ops(optim, dtype):
    for cls, kwargs in [
        (optim.SGD, {}),
        (optim.SGD, {"momentum": 0.9, "nesterov": True}),
        (optim.Adam, {"amsgrad": True}),
        (optim.AdamW, {}),
        (optim.Adagrad, {}),
        (optim.RMSprop, {"centered": True, "momentum": 0.9}),
    ]:
        params = [_randn(3, 2, dtype=dtype).requires_grad_(), _randn(5, dtype=dtype).requires_grad_()]
        opt = cls(params, lr=0.1, **kwargs)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    # Adam with 8-bit states (its parameters need 4096 elements to take them: the primitive, on 300)
    from pyops.ops import PRIMITIVES
    from pyops.optim import quantized

    p = _randn(300, dtype=dtype)
    codes = [torch.zeros(300, dtype=torch.uint8) for _ in range(2)]
    PRIMITIVES["triton"]["adam_step_8bit_"](
        [p], [torch.randn_like(p)], [codes[0]], [codes[1]], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(())],
        *quantized.maps("cpu"), 256, torch.tensor(0.1, dtype=torch.float64), 0.9, 0.999, 0.0, 1e-8, False, True,
        None, None,
    )  # fmt: skip


FAMILY_OPS = {
    "activation": _activation_ops,
    "batch_norm": _batch_norm_ops,
    "conv": _conv_ops,
    "loss": _loss_ops,
    "optim": _optim_ops,
}


@pytest.mark.parametrize("family", AOT.FAMILIES)
def test_real_launches_are_aot_variants(family):
    """The launches a family's ops make (run under the interpreter, recorded as they launch) are among
    the aot_variants() of the kernels module each comes from."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the launchers on CPU tensors under TRITON_INTERPRET=1")
    import pyops
    import pyops.optim

    assert family in FAMILY_OPS, f"kernels/{family}.py: no ops here to record its launches by"
    run = FAMILY_OPS[family]
    with pyops.backend("triton"), record_launches() as launches:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            run(pyops.optim if family == "optim" else pyops.functional, dtype)
    assert any(la.fn.__module__ == f"pyops.kernels.{family}" for la in launches), f"no launch of kernels/{family}.py"
    _assert_covered(launches)


BIG = 2**31 + 16  # past int32: Triton passes it as i64


def _meta(n, dtype):
    return torch.empty(n, dtype=dtype, device="meta")


def test_activation_size_forms_are_aot_variants():
    """Each launch the activation launchers make (every op, dtype and size form, on meta tensors) is
    one of aot_variants()."""
    K = AOT.load_kernels("activation")
    with record_launches(run=False) as launches:
        for dtype in K.DTYPES:
            for n in (1, 100, BIG):
                x, mask = _meta(n, dtype), _meta(math.ceil(n / 8), torch.uint8)
                for op in K.MASKED_OPS:
                    K.masked_fwd(x, x, mask, op, -1e300)
                    K.masked_bwd(x, mask, x, op, float("nan"))
                for op in K.UNARY_OPS:
                    K.unary(x, x, op, float("inf"))
                for op in K.BINARY_BWD_OPS:
                    K.binary_bwd(x, x, x, op, 0.5)
            for count, inner, pieces in [(1, 1, 3), (60, 5, 3), (8, 1, 1), (BIG, 8, 2), (BIG, BIG, 2), (BIG, 1, 256)]:
                out, idx = _meta(count, dtype), _meta(count, torch.uint8)
                K.maxout_fwd(_meta(count * pieces, dtype), out, idx, inner, pieces)
                K.maxout_bwd(out, idx, _meta(count * pieces, dtype), inner, pieces)
    per_dtype = 3 * (2 * len(K.MASKED_OPS) + len(K.UNARY_OPS) + len(K.BINARY_BWD_OPS)) + 6 * 2
    assert len(launches) == len(K.DTYPES) * per_dtype
    _assert_covered(launches)


def test_batch_norm_size_forms_are_aot_variants():
    """batch_norm's launches with sizes past int32 (positions per channel, elements, both, and a
    channel's span), on meta tensors."""
    K = AOT.load_kernels("batch_norm")
    with record_launches(run=False) as launches:
        for dtype in K.DTYPES:
            side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            # (outer, channels, inner): small; positions past int32, then inner too; elements only; spans
            for outer, channels, inner in [
                (2, 3, 4),
                (BIG, 2, 1),
                (1, 2, BIG),
                (1, 4, 2**30),
                (2**42, 1, 1),
                (1, 1, 2**42),
            ]:
                x, c = _meta(outer * channels * inner, dtype), _meta(channels, side)
                K.stats(x, c, c, outer, channels, inner)
                K.elemt(x, x, x, c, c, c, outer, channels, inner, "relu", 0.0)
                K.elemt(x, None, x, c, c, c, outer, channels, inner, "none", 0.0)
                K.bwd_reduce(x, x, None, None, c, c, c, None, outer, channels, inner, "elu", 1.0, False)
                K.bwd_reduce(x, None, x, x, c, c, c, x, outer, channels, inner, "elu", 1.0, True)
                K.bwd_elemt(x, x, x, None, c, c, c, c, x, outer, channels, inner, "relu", 0.0, False)
                K.bwd_elemt(x, None, x, x, c, c, None, None, x, outer, channels, inner, "none", 0.0, True)
    _assert_covered(launches)


def test_loss_size_forms_are_aot_variants():
    """The loss launches with sizes past int32 and the constant 1, on meta tensors."""
    K = AOT.load_kernels("loss")
    with record_launches(run=False) as launches:
        for dtype in K.DTYPES:
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            for n in (1, 100, BIG):
                x = _meta(n, dtype)
                partials = _meta(math.ceil(n / K.BLOCK.value), wide)
                for kind in K.KINDS:
                    K.pointwise(x, x, x, kind, 1.0)
                    K.pointwise_bwd(x, x, x, x, kind, 1.0)
                    K.pointwise_reduce(x, x, _meta((), dtype), None, partials, kind, 1.0, 0.5)
                    K.pointwise_reduce(x, x, _meta((), dtype), x, partials, kind, 1.0, 0.5)
            for rows, classes in [(3, 1), (BIG, 5), (2, 200)]:
                x, rows_out = _meta((rows, classes), dtype), _meta(rows, wide)
                w, scale = _meta(classes, wide), _meta((), wide)
                for target in (_meta(rows, torch.int64), x):
                    K.cross_entropy(x, target, w, scale, rows_out, None, -100, 0.0)
                    K.cross_entropy(x, target, w, scale, rows_out, x, -100, 0.1)
    _assert_covered(launches)


# ---- the launchers, under the interpreter on CPU (on the GPU where there is one) -----------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not RUNS_HERE, reason="Triton needs a GPU or TRITON_INTERPRET=1")
K = AOT.load_kernels("activation")
C = AOT.load_kernels("_common")
# globals of the probe kernels below, as jit functions need
C_F64, C_ACT_FWD, C_ACT_GRAD, C_ACT_INV = C.f64, C.act_fwd, C.act_grad, C.act_inv


@triton.jit(do_not_specialize=["hi", "lo"])
def _scalar_probe(out_ptr, i, hi, lo):
    tl.store(out_ptr + i, C_F64(hi, lo))


SCALARS = [
    float("inf"),
    -float("inf"),
    float("nan"),
    1e300,
    -1e300,
    -0.0,
    0.0,
    5e-324,
    -5e-324,
    0.2,
    1.7976931348623157e308,
    2.2250738585072014e-308,
    3.4028235677973366e38,
    -1.5,
]


@needs_triton
def test_scalar_transport_is_exact():
    """Any float64 crosses into a kernel bit for bit, as two never-specialised int32 halves."""
    out = torch.empty(len(SCALARS), dtype=torch.float64, device=DEVICE)
    for i, v in enumerate(SCALARS):
        hi, lo = C.f64_halves(v)
        assert -(2**31) <= hi < 2**31 and -(2**31) <= lo < 2**31
        _scalar_probe[(1,)](out, i, hi, lo)
    want = torch.tensor(SCALARS, dtype=torch.float64)
    assert torch.equal(out.cpu().view(torch.int64), want.view(torch.int64)), (out, want)


def _edge(shape, dtype, layout):
    x = torch.randn(shape, dtype=torch.float64) * 3
    x.view(-1)[:10] = torch.tensor(
        [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 0.1], dtype=torch.float64
    )
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.flatten(1).t()
    return x.to(DEVICE)


def _memory_order(t):
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(perm).reshape(-1)


def _bits(pos):
    flat = torch.zeros(math.ceil(pos.numel() / 8) * 8, dtype=torch.uint8, device=pos.device)
    flat[: pos.numel()] = _memory_order(pos).to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=pos.device)
    return (flat.view(-1, 8).int() * weights).sum(1).to(torch.uint8)


def _close(got, want, dtype, what=""):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    zeros = want == 0
    assert torch.equal(got[zeros].signbit(), want[zeros].signbit()), "sign of zero"


LAYOUTS = ["contiguous", "channels_last", "transposed"]
LAUNCH_DTYPES = [torch.float64, torch.float32, torch.float16]


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
def test_masked_launchers(dtype, layout):
    import torch.nn.functional as F

    x = _edge((2, 3, 4, 5), dtype, layout)
    g = torch.randn(x.shape, dtype=dtype).to(DEVICE)
    g = torch.empty_like(x).copy_(g)
    for op, slope in [("relu", 0.0), ("leaky_relu", 0.01), ("leaky_relu", -2.5)]:
        want = torch.relu(x) if op == "relu" else F.leaky_relu(x, slope)
        pos = ~(x <= 0) if op == "relu" else x > 0
        for inplace in (False, True):
            xi = x.clone()
            out = xi if inplace else torch.empty_like(xi)
            mask = torch.empty(math.ceil(x.numel() / 8), dtype=torch.uint8, device=DEVICE)
            K.masked_fwd(xi, out, mask, op, slope)
            _close(out, want, dtype)
            assert torch.equal(mask, _bits(pos))
        gi = torch.empty_like(g)
        K.masked_bwd(g, mask, gi, op, slope)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        neg = torch.zeros_like(g) if op == "relu" else (g.to(wide) * slope).to(dtype)  # threshold_backward: +0
        _close(gi, torch.where(pos, g, neg), dtype)


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
def test_unary_and_binary_bwd_launchers(dtype, layout):
    import torch.nn.functional as F

    x = _edge((2, 3, 4, 5), dtype, layout)
    g = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=dtype))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for op, alpha, ref in [
        ("elu", 1.0, lambda t: F.elu(t, 1.0)),
        ("elu", 0.3, lambda t: F.elu(t, 0.3)),
        ("sigmoid", 0.0, torch.sigmoid),
        ("tanh", 0.0, torch.tanh),
    ]:
        want = ref(x.double()).to(dtype)
        for inplace in (False, True):
            xi = x.clone()
            out = xi if inplace else torch.empty_like(xi)
            K.unary(xi, out, op, alpha)
            _close(out, want, dtype, op)
        saved_cases = [("elu_result", out), ("elu_input", x)] if op == "elu" else [(op, out)]
        for bop, saved in saved_cases:
            gi = torch.empty_like(g)
            K.binary_bwd(g, saved, gi, bop, alpha)
            s, gw = saved.to(wide), g.to(wide)
            # as torch's scalar and CUDA elu_backward (its CPU vector path gives NaN for a NaN s)
            if bop == "elu_result":
                want_g = torch.where(s <= 0, gw * (s + alpha), gw)
            elif bop == "elu_input":
                want_g = torch.where(s <= 0, gw * alpha * torch.exp(s), gw)
            elif bop == "sigmoid":
                want_g = gw * (1 - s) * s
            else:
                want_g = gw * (1 - s * s)
            _close(gi, want_g.to(dtype), dtype, bop)


@needs_triton
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,pieces", [((4, 12, 5), 1, 3), ((6, 8), 1, 4), ((3, 5, 4), 2, 1)])
def test_maxout_launchers(dtype, shape, dim, pieces):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    x.view(-1)[3] = float("nan")
    x.view(-1)[1] = x.view(-1)[0]  # a tie: the first piece wins
    x = x.to(DEVICE)
    inner = math.prod(shape[dim + 1 :])
    oshape = list(shape)
    oshape[dim] //= pieces
    out = torch.empty(oshape, dtype=dtype, device=DEVICE)
    idx = torch.empty(oshape, dtype=torch.uint8, device=DEVICE)
    K.maxout_fwd(x, out, idx, inner, pieces)
    want, want_idx = x.reshape(*shape[:dim], oshape[dim], pieces, *shape[dim + 1 :]).max(dim=dim + 1)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.long(), want_idx)
    g = torch.randn(oshape, dtype=dtype).to(DEVICE)
    gi = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
    K.maxout_bwd(g, idx, gi, inner, pieces)
    want_gi = torch.zeros(*shape[:dim], oshape[dim], pieces, *shape[dim + 1 :], dtype=dtype, device=DEVICE)
    want_gi.scatter_(dim + 1, want_idx.unsqueeze(dim + 1), g.unsqueeze(dim + 1))
    assert torch.equal(gi, want_gi.reshape(shape))


def test_unknown_op_names_the_op():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="'gelu'"):
        K.masked_fwd(x, x, x, "gelu", 0.0)
    with pytest.raises(ValueError, match="'relu'"):
        K.unary(x, x, "relu", 1.0)
    with pytest.raises(ValueError, match="'elu'"):
        K.binary_bwd(x, x, x, "elu", 1.0)


# ---- the fused activation's math, once for every family (kernels/_common.py) ----------------------
@triton.jit(do_not_specialize=["n", "act", "p_hi", "p_lo"])
def _act_probe(x_ptr, g_ptr, y_ptr, gi_ptr, n, act, p_hi, p_lo, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inb = offs < n
    p = C_F64(p_hi, p_lo).to(COMPUTE)
    y = C_ACT_FWD(tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE), act, p)
    gi = C_ACT_GRAD(tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE), y, act, p)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=inb)


ACTIVATION_CASES = [
    ("none", 0.0),
    ("relu", 0.0),
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.0),
    ("leaky_relu", -2.5),
    ("elu", 1.0),
    ("elu", 0.3),
    ("elu", 0.0),
    ("elu", -0.5),
]


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in unselected branches
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
def test_fused_activation_is_torchs(dtype):
    """act_fwd, with the code and parameter as runtime values (as batch_norm and conv run it), gives
    torch's relu, leaky_relu and elu, the sign of zero included for every parameter (elu passes ±0
    unchanged); act_grad, read from the output, gives torch's derivative where the output's sign is
    the input's (parameter >= 0)."""
    import torch.nn.functional as F

    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 0.1, -0.1, 3.0, -3.0, -40.0])
    x = x.to(dtype).to(DEVICE)
    g = torch.linspace(-2, 2, x.numel(), dtype=torch.float64).to(dtype).to(DEVICE)
    compute = C.compute_dtype(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for name, p in ACTIVATION_CASES:
        y, gi = torch.empty_like(x), torch.empty_like(x)
        _act_probe[(1,)](x, g, y, gi, x.numel(), C.ACTIVATIONS[name], *C.f64_halves(p), COMPUTE=compute, BLOCK=16)
        xw = x.to(wide).requires_grad_()
        want = {"none": xw * 1, "relu": torch.relu(xw), "leaky_relu": F.leaky_relu(xw, p), "elu": F.elu(xw, p)}[name]
        _close(y, want.detach().to(dtype), dtype, f"{name}({p})")
        if p >= 0:
            (want_g,) = torch.autograd.grad(want, xw, g.to(wide))
            if name == "elu":  # at NaN g passes, as torch's scalar and CUDA elu_backward (its CPU vector path: NaN)
                want_g = torch.where(xw.isnan(), g.to(wide), want_g)
            _close(gi, want_g.to(dtype), dtype, f"{name}({p})'")


@triton.jit
def _inv_probe(y_ptr, z_ptr, n, act, p_hi, p_lo, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inb = offs < n
    y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    tl.store(z_ptr + offs, C_ACT_INV(y, act, C_F64(p_hi, p_lo).to(COMPUTE)).to(z_ptr.dtype.element_ty), mask=inb)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_activation_inverse_is_the_cpp_one(dtype):
    """act_inv recovers z from y = act(z) as csrc/common/act.h does: leaky_relu y / p below zero; elu
    log1p(max(y / p, -1 + eps)) with eps the compute dtype's epsilon, so a saturated float64 output maps
    near its true input (once a float32-sized floor of 1e-7 clamped float64 at z = -16.1)."""
    z = torch.tensor([2.0, 0.0, -0.5, -3.0, -20.0, -30.0, -200.0], dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    for name, p in (("leaky_relu", 0.2), ("elu", 1.5)):
        y = torch.where(z > 0, z, z * p if name == "leaky_relu" else p * torch.expm1(z)).to(dtype)
        got = torch.empty_like(y, device=DEVICE)
        code, halves = C.ACTIVATIONS[name], C.f64_halves(p)
        _inv_probe[(1,)](y.to(DEVICE), got, y.numel(), code, *halves, COMPUTE=C.compute_dtype(dtype), BLOCK=8)
        yw = y.double()
        want = torch.where(yw > 0, yw, yw / p if name == "leaky_relu" else torch.log1p((yw / p).clamp(min=-1 + eps)))
        torch.testing.assert_close(got.cpu().double(), want, rtol=8 * eps, atol=0, msg=f"{name}({p})")
    if dtype == torch.float64:  # -20 and -30 come back within float64's reach, not clamped at -16.1
        assert got[4].item() < -19.9 and got[5].item() < -29.9, got


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton backend on CPU")
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
def test_batch_norm_elu_passes_zero_unchanged(dtype):
    """batch_norm's fused elu is torch's elu: a zero pre-activation stays +0 whatever alpha is (with a
    negative alpha, alpha * expm1(0) would be -0). pyops.functional.batch_norm applies an elu of
    negative alpha as its own op; the primitive takes it fused."""
    import torch.nn.functional as F

    import pyops  # noqa: F401  (the primitives)

    side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = torch.randn(4, 3, 5, dtype=torch.float64).to(dtype)
    zeros, ones = torch.zeros(3, dtype=side), torch.ones(3, dtype=side)
    for alpha in (1.0, -0.5):
        # z = (x - 0) * 1 * 0 + 0 = +0
        y = torch.ops.pyops.batch_norm_elemt_triton(x, zeros, ones, zeros, zeros, None, "elu", alpha)
        want = F.elu(torch.zeros(x.shape, dtype=torch.float64), alpha)
        assert not want.signbit().any()
        assert torch.equal(y.signbit(), want.signbit()), f"alpha={alpha}: {y}"

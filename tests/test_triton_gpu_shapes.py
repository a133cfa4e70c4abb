"""The Triton launches shaped for a GPU: the launch plans of the README's shapes (pure functions of the
shape, nothing launched) give every large launch at least 2 waves of programs on an H100 and use grid x
only; with the splits forced onto tiny shapes (the plans' parameters made small), batch_norm's split
reductions in both layouts, conv's split-K and depthwise weight gradients and cross_entropy's rows per
program give the float64 oracle's values and gradients, the same bits on every run, and launch only
their families' aot_variants()."""

import math
import os

import pytest
import torch
import torch.nn.functional as TF

triton = pytest.importorskip("triton")

from launches import record_launches, uncovered  # noqa: E402

import pyops  # noqa: E402
import pyops.functional as PF  # noqa: E402
import pyops.kernels.batch_norm as BN  # noqa: E402
import pyops.kernels.conv as CV  # noqa: E402
import pyops.kernels.loss as LS  # noqa: E402
from pyops.kernels._common import resident, two_waves  # noqa: E402
from pyops.testing.oracle import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
# The interpreter runs float32 and float64 here (bfloat16 arithmetic is wrong in it); a GPU all four.
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])

H100_SMS = 132
TWO_WAVES = 2 * H100_SMS
LARGE = 1 << 20  # elements: a launch touching a tensor this large needs 2 waves
X_MAX = 2**31 - 1  # grid x's limit (y and z: 65,535, so no launch uses them)


def _programs(grid):
    assert len(grid) == 1, f"grid {grid}: only x may grow with the shape"
    assert 0 < grid[0] <= X_MAX, grid
    return grid[0]


def _conv_shape(n, c, h, w, k, kh, kw, stride=1, padding=0, dilation=1, groups=1):
    """csrc/conv.h's ConvShape as the launchers get it (T_N ... T_G)."""
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return [n, c, h, w, k, kh, kw, oh, ow, stride, stride, padding, padding, dilation, dilation, groups]


# ---- the plans at the README's shapes (nothing launched) ---------------------------------------------
def test_resident_programs_follow_registers_warps_and_shared_memory():
    """Programs resident per H100 SM: 64K registers allocated per warp in units of 256 (62 registers take
    64), 64 warps, 32 blocks, 228 KB of shared memory."""
    assert resident(62) == 8 and resident(64) == 8 and resident(65) == 7
    assert resident(168) == 3 and resident(255) == 2 and resident(20) == 16 and resident(20, num_warps=1) == 32
    assert resident(32, shared=100 * 1024) == 2
    assert two_waves(62) == 2 * 132 * 8


BN_SHAPES = {  # (outer, channels, inner)
    "(32,64,56,56) NCHW": (32, 64, 56 * 56),
    "(32,64,56,56) channels_last": (32 * 56 * 56, 64, 1),
    "(256,256,14,14) NCHW": (256, 256, 14 * 14),
    "(256,256,14,14) channels_last": (256 * 14 * 14, 256, 1),
}


@pytest.mark.parametrize("name", list(BN_SHAPES))
def test_batch_norm_plan_reaches_two_waves(name):
    """Every batch_norm launch over the README's shapes (> 1M elements) has >= 2 H100 waves of programs,
    the reductions at the occupancy their registers allow (2112 programs: 8 resident per SM; 56 and 128
    programs before they split positions too)."""
    outer, channels, inner = BN_SHAPES[name]
    assert outer * channels * inner >= LARGE
    plan = BN.plan(outer, channels, inner)
    assert BN.PROGRAMS == two_waves(62) > TWO_WAVES
    for launcher, want in [("stats", BN.PROGRAMS), ("elemt", 0), ("bwd_reduce", BN.PROGRAMS), ("bwd_elemt", 0)]:
        kernel, grid = plan[launcher][0]  # the pass over the data (the combines read C x parts floats)
        assert _programs(grid) >= max(TWO_WAVES, want), f"{name} {kernel.fn.__name__}: {grid[0]} programs"
    parts, span = BN.split(outer, channels, inner)
    assert parts * span >= outer * inner > (parts - 1) * span and span % BN.ROWS.value == 0


def test_batch_norm_split_is_a_pure_function_of_the_shape():
    """split(): the H100 numbers by default, the parameters overridable (the tests below force a split
    onto tiny shapes); no part is empty, and small tensors are not split."""
    assert BN.split(32, 64, 3136) == BN.split(32, 64, 3136, programs=BN.PROGRAMS, min_span=BN.MIN_SPAN)
    assert BN.split(2, 3, 4) == (1, 128)
    assert BN.split(0, 3, 4) == (1, 0)
    parts, span = BN.split(5, 3, 56, programs=10**6, min_span=1)
    assert (parts, span) == (3, 128)
    for shape in [(7, 5, 300), (1000, 3, 1), (1, 1, 2**42), (2**40, 1000, 1)]:
        parts, span = BN.split(*shape)
        count = shape[0] * shape[2]
        assert 1 <= parts <= BN.MAX_PARTS and (parts - 1) * span < count <= parts * span


def test_batch_norm_grids_use_x_only():
    """Channels past grid y's limit (65,535 blocks of 8) and sizes past int32 launch on grid x alone."""
    for shape in [(2, 600_000, 1), (4, 600_000, 9), (2**33, 3, 1), (1, 2, 2**33)]:
        for launches in BN.plan(*shape).values():
            for _, grid in launches:
                _programs(grid)


CONV_SHAPES = {  # name: ConvShape (the README's benchmark shapes)
    "depthwise (16,64,56,56) 3x3": _conv_shape(16, 64, 56, 56, 64, 3, 3, padding=1, groups=64),
    "g=32 (16,128,28,28) 3x3": _conv_shape(16, 128, 28, 28, 128, 3, 3, padding=1, groups=32),
    "dense (32,64,56,56) 3x3 64->64": _conv_shape(32, 64, 56, 56, 64, 3, 3, padding=1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CONV_SHAPES))
def test_conv_plan_reaches_two_waves(name, dtype):
    """The README's convolutions: every launch over a large tensor has >= 2 H100 waves; the weight
    gradient splits N * OH * OW (36 and 64 programs before), depthwise on its own kernel."""
    shape = CONV_SHAPES[name]
    plan = CV.plan(shape, dtype)
    assert CV.wgrad_splits(shape, dtype) > 1
    depthwise = name.startswith("depthwise")
    want = CV._dw_bwd_weight_kernel if depthwise else CV._conv_bwd_weight_kernel
    assert plan["conv2d_bwd_weight"][0][0] is want
    assert _programs(plan["conv2d_bwd_weight"][0][1]) >= CV.PROGRAMS == two_waves(168)  # 3 resident per SM
    for launcher in ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_mask"):
        kernel, grid = plan[launcher][0]
        assert _programs(grid) >= TWO_WAVES, f"{name} {kernel.fn.__name__}: {grid[0]} programs"
    # the mask (about 20 registers: 16 programs resident per SM) too
    assert _programs(plan["conv2d_mask"][0][1]) >= two_waves(20)


def test_conv_grids_use_x_only():
    """Groups past grid z's limit and a depthwise plane of more than 65,535 x 256 positions: grid x."""
    for shape in [
        _conv_shape(1, 70_000, 4, 4, 70_000, 3, 3, padding=1, groups=70_000),
        _conv_shape(1, 140_000, 4, 4, 70_000, 1, 1, groups=70_000),
        _conv_shape(1, 1, 5000, 5000, 1, 3, 3, padding=1),
        _conv_shape(1, 2, 5000, 5000, 2, 3, 3, padding=1, groups=2),
    ]:
        for launches in CV.plan(shape).values():
            for _, grid in launches:
                _programs(grid)


def test_conv_wgrad_split_is_a_pure_function_of_the_shape():
    assert CV.wgrad_split(0, 36, 32) == (1, 0)
    assert CV.wgrad_split(100, 36, 32) == (1, 128)  # too few positions to split
    splits, chunk = CV.wgrad_split(100352, 36, 32)
    assert splits * 36 >= TWO_WAVES and chunk % 32 == 0 and (splits - 1) * chunk < 100352 <= splits * chunk
    assert CV.wgrad_split(162, 10, 32, programs=10**6, min_steps=1) == (6, 32)
    assert CV.wgrad_split(162, 10, 32, programs=20, min_steps=1) == (3, 64)
    assert CV.wgrad_split(10**9, 1, 32)[0] == CV.MAX_SPLITS


@pytest.mark.parametrize("rows,classes", [(4096, 1000), (32768, 10), (32768, 21), (8192, 100)])
def test_cross_entropy_plan_reaches_two_waves(rows, classes):
    """Rows of few classes share a program (64 rows of <= 16 classes): (32768, 10) launches 512 programs
    of 1024 lanes, not 32768 of 128 lanes over 90% idle."""
    ((kernel, grid),) = LS.plan(rows, classes)
    assert _programs(grid) >= TWO_WAVES
    cblock, per_program = LS.ce_tile(classes)
    assert cblock >= classes and cblock * per_program <= 2048
    assert all(narrower < classes for narrower, _ in LS.CE_TILES if narrower < cblock)  # the narrowest that fits


def test_cross_entropy_long_rows_are_one_program_each():
    """(256, 32000): one program per row, 256 programs (kernels/loss.py says why: splitting a row's
    softmax would need a third pass); rows past int32 launch on grid x."""
    assert LS.plan(256, 32000) == [(LS._cross_entropy_kernel, (256,))]
    ((_, grid),) = LS.plan(2**33, 10)
    _programs(grid)


# ---- the launchers' grids are the plans' --------------------------------------------------------------
def _grids(launches):
    return [(la.fn.__name__, tuple(la.grid)) for la in launches]


def _planned(plan):
    return [(kernel.fn.__name__, grid) for kernel, grid in plan]


def test_batch_norm_launches_are_the_plan():
    for outer, channels, inner in [(3, 5, 300), (600, 5, 1), (7, 5, 4), (2**33, 3, 1)]:
        x = torch.empty(outer * channels * inner, device="meta")
        c = torch.empty(channels, device="meta")
        plan = BN.plan(outer, channels, inner)
        with record_launches(run=False) as launches:
            BN.stats(x, c, c, outer, channels, inner)
        assert _grids(launches) == _planned(plan["stats"])
        with record_launches(run=False) as launches:
            BN.elemt(x, None, x, c, c, c, outer, channels, inner, "relu", 0.0)
        assert _grids(launches) == _planned(plan["elemt"])
        with record_launches(run=False) as launches:
            BN.bwd_reduce(x, x, None, None, c, c, c, None, outer, channels, inner, "none", 0.0, False)
        assert _grids(launches) == _planned(plan["bwd_reduce"])
        with record_launches(run=False) as launches:
            BN.bwd_elemt(x, x, None, None, c, c, c, c, x, outer, channels, inner, "none", 0.0, False)
        assert _grids(launches) == _planned(plan["bwd_elemt"])


@runs_here
def test_conv_launches_are_the_plan():
    for args, kwargs in [
        ((2, 4, 9, 9, 6, 3, 3), {"padding": 1}),
        ((2, 4, 9, 9, 6, 3, 3), {"stride": 2, "groups": 2}),
        ((1, 3, 12, 12, 6, 5, 5), {"padding": 2, "groups": 3}),
    ]:
        shape = _conv_shape(*args, **kwargs)
        N, C, H, W, K, KH, KW, OH, OW = shape[:9]
        G = shape[CV.T_G.value]
        x, w = torch.zeros(N, C, H, W), torch.zeros(K, C // G, KH, KW)
        out = torch.zeros(N, K, OH, OW)
        plan = CV.plan(shape, x.dtype)
        with record_launches(run=False) as launches:
            CV.conv2d_fwd(x, w, None, out, shape, 0, 0.0)
        assert _grids(launches) == _planned(plan["conv2d_fwd"])
        with record_launches(run=False) as launches:
            CV.conv2d_bwd_input(out, w, x, shape)
        assert _grids(launches) == _planned(plan["conv2d_bwd_input"])
        with record_launches(run=False) as launches:
            CV.conv2d_bwd_weight(out, x, w, torch.zeros(K), True, shape)
        assert _grids(launches) == _planned(plan["conv2d_bwd_weight"])


def test_cross_entropy_launches_are_the_plan():
    for rows, classes in [(70, 10), (5, 21), (3, 100), (2, 3000), (2**33, 10)]:
        x = torch.empty(rows, classes, device="meta")
        r = torch.empty(rows, device="meta")
        with record_launches(run=False) as launches:
            LS.cross_entropy(x, r.long(), x[0], r[0], r, x, -100, 0.0)
        assert _grids(launches) == _planned(LS.plan(rows, classes))


# ---- the forced splits against the oracle, bit for bit run to run ------------------------------------
@pytest.fixture
def forced_split(monkeypatch):
    """The plans' parameters made small: a channel of a tiny batch norm splits into parts of one tile
    (128 positions), a tiny convolution's positions into splits of one step."""
    monkeypatch.setattr(BN, "PROGRAMS", 10**6)
    monkeypatch.setattr(BN, "MIN_SPAN", 1)
    monkeypatch.setattr(CV, "PROGRAMS", 10**6)
    monkeypatch.setattr(CV, "MIN_STEPS", 1)


def _assert_covered(launches):
    modules = {"pyops.kernels.batch_norm": BN, "pyops.kernels.conv": CV, "pyops.kernels.loss": LS}
    missing = []
    for name, module in modules.items():
        missing += uncovered([la for la in launches if la.fn.__module__ == name], module.aot_variants())
    assert not missing, "launches no variant compiles:\n" + "\n".join(missing)


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def _run_twice(fn):
    """fn() twice: its tensors, the same bits both times; the first run's launches."""
    with record_launches() as launches:
        first = fn()
    second = fn()
    for a, b in zip(first, second):
        assert torch.equal(_bits(a), _bits(b)), "a second run gave other bits"
    _assert_covered(launches)
    return first, launches


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


BN_FORMS = {  # training, activation, its keyword arguments, a residual, memory_efficient
    "train": (True, None, {}, False, False),
    "train-relu-residual": (True, "relu", {}, True, False),
    "train-elu-memory-efficient": (True, "elu", {"alpha": 0.7}, True, True),
    "eval-leaky-relu": (False, "leaky_relu", {"negative_slope": 0.2}, False, False),
}


def _bn_reference(x, w, b, rm, rv, r, training, activation, kwargs):
    y = TF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if r is not None:
        y = y + r
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "leaky_relu":
        y = TF.leaky_relu(y, kwargs["negative_slope"])
    elif activation == "elu":
        y = TF.elu(y, kwargs["alpha"])
    return y


def _cases(forms, full, layouts=("contiguous", "channels_last")):
    """Every form and layout in `full` (float64 under the interpreter, which is slow: the kernels are the
    same), the first form in the other dtypes."""
    for dtype in DTYPES:
        for form in forms:
            for layout in layouts:
                if dtype in full or form == next(iter(forms)):
                    yield pytest.param(dtype, form, layout, id=f"{dtype}-{form}-{layout}")


INTERPRETED_FULL = DTYPES if DEVICE == "cuda" else [torch.float64]


@runs_here
@pytest.mark.parametrize(
    "dtype,form,layout", list(_cases(BN_FORMS, INTERPRETED_FULL, ("contiguous", "channels_last", "short-rows")))
)
def test_batch_norm_split_reductions_against_oracle(forced_split, dtype, form, layout):
    """A batch norm whose channels split into 3 parts (280 positions: 5 images of 56, or as rows in
    channels_last, or 70 rows of 4), values and gradients against the float64 oracle, the same bits run
    to run."""
    training, activation, kwargs, residual, memory_efficient = BN_FORMS[form]
    side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    # short-rows: (N, C, L) with L under a tile's width, the elementwise kernels' [N, C * L] view
    shape = (70, 3, 4) if layout == "short-rows" else (5, 3, 7, 8)
    gen = torch.Generator().manual_seed(1)
    x = _layout((torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype).to(DEVICE), layout)
    r = _layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    g = _layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(side).to(DEVICE)
    b = torch.randn(3, generator=gen, dtype=torch.float64).to(side).to(DEVICE)
    rm = torch.randn(3, generator=gen, dtype=torch.float64).to(side).to(DEVICE)
    rv = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(side).to(DEVICE)
    leaves = [x, w, b] + ([r] if residual else [])

    def run():
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        with pyops.backend("triton"):
            y = PF.batch_norm(
                ins[0],
                rm.clone(),
                rv.clone(),
                ins[1],
                ins[2],
                training,
                activation=activation,
                residual=ins[3] if residual else None,
                memory_efficient=memory_efficient,
                **kwargs,
            )
            grads = torch.autograd.grad(y, ins, g)
        return (y, *grads)

    (y, *grads), launches = _run_twice(run)
    reduce = [
        la for la in launches if la.kernel is BN._stats_partial_kernel or la.kernel is BN._bwd_reduce_partial_kernel
    ]
    if training:
        assert len(reduce) == 2 and all(la.grid[0] == 3 * 1 for la in reduce), _grids(reduce)  # 3 parts x 1 block
    wide = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    y64 = _bn_reference(
        wide[0], wide[1], wide[2], rm.double(), rv.double(), wide[3] if residual else None, training, activation, kwargs
    )
    grads64 = torch.autograd.grad(y64, wide, g.double())
    count = math.prod(shape) // shape[1]
    assert_close(y, y64, dtype, what="output")
    assert y.stride() == x.stride()
    for name, got, want in zip(["input", "weight", "bias", "residual"], grads, grads64):
        # weight and bias gradients sum over a channel's positions: their error grows with the count
        assert_close(got, want, got.dtype, what=f"{name} gradient", reduced=count if name in ("weight", "bias") else 1)


CONV_FORMS = {  # x shape, weight shape, keyword arguments
    "depthwise-5x5-multiplier-dilated": ((2, 2, 12, 12), (4, 1, 5, 5), {"padding": 4, "dilation": 2, "groups": 2}),
    "dense": ((2, 4, 9, 9), (6, 4, 3, 3), {"padding": 1}),
    "grouped-strided": ((2, 4, 13, 13), (6, 2, 3, 3), {"stride": 2, "groups": 2, "padding": 1}),
    "depthwise": ((2, 3, 12, 12), (3, 1, 3, 3), {"padding": 1, "groups": 3}),
}


@runs_here
# (float32 in every form: float64's product-sum tiles are the slowest under the interpreter)
@pytest.mark.parametrize("dtype,form,layout", list(_cases(CONV_FORMS, [t for t in DTYPES if t != torch.float64])))
def test_conv_split_weight_gradient_against_oracle(forced_split, dtype, form, layout):
    """The weight gradient split over N * OH * OW into several partials added in split order (dense,
    grouped: tl.dot tiles; depthwise, a 5x5 kernel's 25 taps in two tap tiles: the elementwise kernel,
    and the direct input gradient), against the float64 oracle, the same bits run to run."""
    xs, ws, kwargs = CONV_FORMS[form]
    gen = torch.Generator().manual_seed(2)
    x = _layout(torch.randn(xs, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE), layout)
    w = torch.randn(ws, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    b = torch.randn(ws[0], generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    y64 = TF.conv2d(x.double(), w.double(), b.double(), **kwargs)
    g = torch.randn(y64.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

    def run():
        ins = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with pyops.backend("triton"):
            y = PF.conv2d(*ins, **kwargs)
            return (y, *torch.autograd.grad(y, ins, g))

    (y, *grads), launches = _run_twice(run)
    partial = [la for la in launches if la.kernel in (CV._conv_bwd_weight_kernel, CV._dw_bwd_weight_kernel)]
    assert len(partial) == 1
    assert partial[0].kernel is (
        CV._dw_bwd_weight_kernel if form.startswith("depthwise") else CV._conv_bwd_weight_kernel
    )
    assert CV.wgrad_splits(CV_shape(x, w, kwargs), dtype) > 1
    # depthwise: the direct kernels throughout (no tl.dot tile of one valid channel in 32)
    direct = {CV._dw_fwd_kernel, CV._dw_bwd_input_kernel, CV._dw_bwd_weight_kernel}
    gemm = {CV._conv_fwd_kernel, CV._conv_bwd_input_kernel, CV._conv_bwd_weight_kernel}
    used = {la.kernel for la in launches}
    assert used & (direct | gemm) == (direct if form.startswith("depthwise") else gemm)
    wide = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = TF.conv2d(*wide, **kwargs)
    grads64 = torch.autograd.grad(want, wide, g.double())
    positions = y64.shape[0] * y64.shape[2] * y64.shape[3]
    assert_close(y, want, dtype, what="output", reduced=w[0].numel())
    for name, got, ref, reduced in zip(["input", "weight", "bias"], grads, grads64, [ws[0] * 25, positions, positions]):
        assert_close(got, ref, dtype, what=f"{name} gradient", reduced=reduced)


def CV_shape(x, w, kwargs):
    stride, padding, dilation = (kwargs.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    N, C, H, W = x.shape
    return _conv_shape(
        N, C, H, W, w.shape[0], w.shape[2], w.shape[3], stride, padding, dilation, kwargs.get("groups", 1)
    )


CE_FORMS = {  # rows, classes: 2 programs of 64 rows (the second part full), 32 rows, 4 rows, one row
    "70x10": (70, 10),
    "40x21": (40, 21),
    "11x100": (11, 100),
    "3x300": (3, 300),
}


@runs_here
@pytest.mark.parametrize("form", list(CE_FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_rows_per_program_against_oracle(dtype, form):
    """Several rows per program (a last program part full): class indices with weights, smoothing and
    ignored rows, and probabilities, losses (none and mean) and gradients against the float64 oracle,
    the same bits run to run."""
    rows, classes = CE_FORMS[form]
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    index = torch.randint(classes, (rows,), generator=gen)
    index[::7] = -100
    index = index.to(DEVICE)
    probs = torch.softmax(torch.randn(rows, classes, generator=gen, dtype=torch.float64), 1).to(dtype).to(DEVICE)
    weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)
    for target, kwargs in [
        (index, {}),
        (index, {"weight": weight, "label_smoothing": 0.1}),
        (probs, {"weight": weight, "label_smoothing": 0.2}),
    ]:
        for reduction in ("none", "mean"):

            def run(target=target, kwargs=kwargs, reduction=reduction):
                xi = x.detach().clone().requires_grad_()
                with pyops.backend("triton"):
                    loss = PF.cross_entropy(xi, target, reduction=reduction, **kwargs)
                    g = (
                        torch.ones_like(loss)
                        if reduction == "mean"
                        else torch.linspace(-1, 1, rows, dtype=torch.float64).to(loss)
                    )
                    return loss, torch.autograd.grad(loss, xi, g)[0]

            (loss, grad), launches = _run_twice(run)
            ce = [la for la in launches if la.kernel is LS._cross_entropy_kernel]
            assert ce and all(tuple(la.grid) == (math.ceil(rows / LS.ce_tile(classes)[1]),) for la in ce)
            xw = x.double().requires_grad_()
            kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            t64 = target.double() if target.is_floating_point() else target
            want = TF.cross_entropy(xw, t64, reduction=reduction, **kw)
            g = torch.ones_like(want) if reduction == "mean" else torch.linspace(-1, 1, rows, dtype=torch.float64)
            (want_grad,) = torch.autograd.grad(want, xw, g)
            assert_close(loss, want, loss.dtype, what=f"{reduction} loss", reduced=classes)
            assert_close(grad, want_grad, dtype, what=f"{reduction} gradient", reduced=classes)

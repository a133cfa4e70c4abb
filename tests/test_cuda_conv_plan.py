"""The CUDA conv kernels' launch plans (csrc/cuda/conv_plan.h: the host functions the launchers call),
read on the CPU: which engine a shape takes, and that every launch touching a large tensor fills an H100
(132 SMs) with at least two waves of blocks, with no grid dimension but x above 65,535. On a GPU, each
engine's primitives against float64 torch, its mask bits, and the weight gradient's bitwise determinism."""

import pytest
import torch
import torch.nn.functional as TF

import pyops

needs_plan = pytest.mark.skipif(
    not hasattr(pyops._C, "_cuda_launch_plan"), reason="pyops._C._cuda_launch_plan is not built in"
)

SMS = 132
LARGE = 1 << 20  # elements: a launch touching this many has at least 2 waves
MAX_GRID_YZ = 65535
MAX_GRID_X = (1 << 31) - 1

TILED = {"conv_dw_fwd_kernel", "conv_dw_bwd_input_kernel", "conv_dw_bwd_weight_kernel"}
DIRECT = {"conv_fwd_kernel", "conv_bwd_input_kernel", "conv_bwd_weight_kernel", "conv_bwd_weight_cl_kernel"}
REDUCE = "conv_reduce_partials_kernel"


def plan(shape, weight, groups=1, stride=1, padding=0, dilation=1, training=True):
    return pyops._C._cuda_launch_plan(
        "conv2d",
        {
            "shape": shape,
            "weight": weight,
            "groups": groups,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "training": training,
        },
    )


def blocks(launch):
    g = launch["grid"]
    return g[0] * g[1] * g[2]


def resident(launch):
    """Blocks of the launch one H100 SM holds by threads and shared memory (2048 threads, 32 blocks,
    228 KB with 1 KB reserved per block)."""
    b = launch["block"]
    per_sm = min(2048 // (b[0] * b[1] * b[2]), 32)
    if launch["smem"]:
        per_sm = min(per_sm, 228 * 1024 // (launch["smem"] + 1024))
    return per_sm


def waves(launch):
    return blocks(launch) / (SMS * resident(launch))


def out_numel(shape, weight, stride=1, padding=0, dilation=1):
    n, _, h, w = shape
    k, _, kh, kw = weight
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return n * k * oh * ow


def check_large_launches(launches, shape, weight, **kw):
    """Every launch but the fixed-order pass over the partial sums (which touches fewer than 1M by design)
    touches the input or the output; when either is large, it has >= 2 waves (>= 264 blocks at least)."""
    touched = max(shape[0] * shape[1] * shape[2] * shape[3], out_numel(shape, weight, **kw))
    assert touched >= LARGE
    for launch in launches:
        if launch["kernel"] == REDUCE:
            continue
        assert blocks(launch) >= 2 * SMS, launch
        assert waves(launch) >= 2, (launch, waves(launch))


def names(launches):
    return [launch["kernel"] for launch in launches]


@needs_plan
def test_depthwise_is_tiled_and_fills_the_gpu():
    shape, weight = (16, 64, 56, 56), (64, 1, 3, 3)
    launches = plan(shape, weight, groups=64, padding=1)
    assert names(launches) == [
        "conv_dw_fwd_kernel",
        "conv_dw_bwd_input_kernel",
        "conv_dw_bwd_weight_kernel",
        REDUCE,
    ]
    check_large_launches(launches, shape, weight, padding=1)
    for launch in launches:
        if launch["kernel"] in TILED:
            assert launch["block"][0] * launch["block"][1] * launch["block"][2] == 256
            assert 0 < launch["smem"] <= 48 * 1024


@needs_plan
def test_depthwise_forward_only_when_not_training():
    launches = plan((16, 64, 56, 56), (64, 1, 3, 3), groups=64, padding=1, training=False)
    assert names(launches) == ["conv_dw_fwd_kernel"]


@needs_plan
def test_depthwise_stride_two_and_a_channel_multiplier_stay_tiled():
    launches = plan((8, 32, 64, 64), (64, 1, 3, 3), groups=32, stride=2, padding=1)
    assert set(names(launches)) == TILED | {REDUCE}


@needs_plan
def test_depthwise_stride_three_falls_back_to_the_direct_kernels():
    launches = plan((8, 32, 64, 64), (32, 1, 3, 3), groups=32, stride=3, padding=1)
    assert set(names(launches)) == {"conv_fwd_kernel", "conv_bwd_input_kernel", "conv_bwd_weight_kernel", REDUCE}


@needs_plan
def test_few_channels_per_group_fill_the_gpu():
    shape, weight = (16, 128, 28, 28), (128, 4, 3, 3)
    launches = plan(shape, weight, groups=32, padding=1)
    assert names(launches) == ["conv_fwd_kernel", "conv_bwd_input_kernel", "conv_bwd_weight_kernel", REDUCE]
    check_large_launches(launches, shape, weight, padding=1)


@needs_plan
def test_weight_gradient_is_split_over_positions():
    """The weight gradient's blocks cover slices of N * OH * OW: more blocks than output channels times
    tap groups, and its partial sums stay under 1M elements."""
    shape, weight = (16, 128, 28, 28), (128, 4, 3, 3)
    wgrad = next(p for p in plan(shape, weight, groups=32, padding=1) if p["kernel"] == "conv_bwd_weight_kernel")
    taps = 4 * 3 * 3 + 1
    assert blocks(wgrad) > 128 * -(-taps // 64)
    reduce = next(p for p in plan(shape, weight, groups=32, padding=1) if p["kernel"] == REDUCE)
    assert blocks(reduce) * 256 >= 128 * taps


@needs_plan
@pytest.mark.parametrize(
    "shape,weight,groups",
    [
        ((32, 64, 56, 56), (64, 64, 3, 3), 1),  # dense
        ((16, 128, 28, 28), (128, 32, 3, 3), 4),  # grouped, 32 channels per group
        ((16, 128, 28, 28), (128, 8, 3, 3), 16),  # the smallest that cuDNN takes
        ((256, 256, 14, 14), (256, 256, 1, 1), 1),  # pointwise
    ],
)
@needs_plan
def test_eight_or_more_channels_per_group_go_to_cudnn(shape, weight, groups):
    assert plan(shape, weight, groups=groups, padding=1 if weight[2] == 3 else 0) == []


@needs_plan
@pytest.mark.parametrize(
    "shape,weight,groups,stride",
    [
        ((256, 4096, 512, 512), (4096, 1, 3, 3), 4096, 1),  # tiled depthwise, 2^38 outputs
        ((64, 1 << 17, 64, 64), (1 << 17, 1, 5, 5), 1 << 17, 2),
        ((1024, 1 << 16, 64, 64), (1 << 16, 2, 3, 3), 1 << 15, 1),  # direct, 2 channels per group
        ((1024, 1 << 16, 64, 64), (1 << 16, 1, 3, 3), 1 << 16, 3),  # depthwise falling back to direct
    ],
)
@needs_plan
def test_huge_shapes_use_grid_x_only(shape, weight, groups, stride):
    launches = plan(shape, weight, groups=groups, stride=stride, padding=1)
    assert launches
    for launch in launches:
        assert 1 <= launch["grid"][0] <= MAX_GRID_X, launch
        assert launch["grid"][1] <= MAX_GRID_YZ and launch["grid"][2] <= MAX_GRID_YZ, launch
        assert launch["block"][0] * launch["block"][1] * launch["block"][2] <= 1024


# ---- on a GPU: every engine and kernel variant against float64 torch --------------------------------------
# (input, weight, groups, stride, padding, dilation, activation code, channels_last)
ENGINE_CASES = {
    # tiled depthwise: several tiles per plane and a ragged last one, relu's mask
    "dw": ((4, 16, 37, 45), (16, 1, 3, 3), 16, (1, 1), (1, 1), (1, 1), 1, False),
    # stride 2 both ways and a channel multiplier of 2
    "dw_s2_mult": ((2, 8, 33, 30), (16, 1, 3, 3), 8, (2, 2), (1, 1), (1, 1), 0, False),
    # 7x7, dilation 2, strides (1, 2), 16-wide tiles, leaky_relu
    "dw_7x7": ((2, 4, 30, 20), (4, 1, 7, 7), 4, (1, 2), (6, 3), (2, 1), 2, False),
    # a narrow plane (8-wide tiles), stride (2, 1), elu
    "dw_narrow": ((3, 5, 40, 6), (5, 1, 5, 5), 5, (2, 1), (2, 2), (1, 1), 3, False),
    # a weight gradient with several tiles per chunk
    "dw_chunks": ((4, 64, 64, 64), (64, 1, 3, 3), 64, (1, 1), (1, 1), (1, 1), 0, False),
    # direct: depthwise stride 3, and channels_last depthwise with more than 32 channels
    "dw_s3": ((2, 6, 20, 19), (6, 1, 3, 3), 6, (3, 3), (1, 1), (1, 1), 0, False),
    "dw_cl": ((2, 40, 15, 17), (40, 1, 3, 3), 40, (1, 1), (1, 1), (1, 1), 1, True),
    # direct: 4 channels per group (37 taps), and 3 channels 7x7 (148 taps: 3 groups of 64), both layouts
    "g4": ((2, 16, 20, 20), (24, 4, 3, 3), 4, (1, 1), (1, 1), (1, 1), 2, False),
    "g4_cl": ((2, 16, 20, 20), (24, 4, 3, 3), 4, (2, 1), (1, 1), (1, 2), 0, True),
    "c3_7x7": ((2, 3, 16, 16), (8, 3, 7, 7), 1, (1, 1), (3, 3), (1, 1), 0, False),
    "c3_7x7_cl": ((2, 3, 16, 16), (40, 3, 7, 7), 1, (2, 2), (3, 3), (1, 1), 0, True),
    # direct: a weight gradient split into many chunks of positions
    "g4_chunks": ((16, 8, 64, 64), (8, 2, 3, 3), 4, (1, 1), (1, 1), (1, 1), 0, False),
    # cuDNN: 16 channels per group, relu's epilogue and mask, both layouts
    "cudnn": ((2, 32, 12, 12), (16, 16, 3, 3), 2, (1, 1), (1, 1), (1, 1), 1, False),
    "cudnn_cl": ((2, 32, 12, 12), (32, 32, 3, 3), 1, (2, 2), (1, 1), (1, 1), 3, True),
}

ACTS = {0: lambda y: y, 1: torch.relu, 2: lambda y: TF.leaky_relu(y, 0.01), 3: lambda y: TF.elu(y, 1.0)}
SCALARS = {0: 0.0, 1: 0.0, 2: 0.01, 3: 1.0}


def _close(actual, expected, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol, atol=tol * scale)


def _mask_of(y, act):
    """The activation family's mask of y: bit j of byte i is element 8 i + j in memory order."""
    flat = y.as_strided((y.numel(),), (1,)).double().cpu()
    bits = ~(flat <= 0) if act == 1 else flat > 0
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engine_against_float64_torch(name, dtype):
    """The three primitives on the engine the case takes: the output, its layout and mask, and the
    gradients from the convolution's own grad_out, against float64 torch on the CPU."""
    shape, wshape, groups, stride, padding, dilation, act, cl = ENGINE_CASES[name]
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(size, generator=gen, dtype=dtype) for size in (shape, wshape, (wshape[0],)))
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    z64 = TF.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    y64 = ACTS[act](z64)
    gy = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    gz = torch.autograd.grad(y64, z64, gy, retain_graph=True)[0].to(dtype)
    gx64, gw64, gb64 = torch.autograd.grad(z64, (x64, w64, b64), gz.double())

    fmt = torch.channels_last if cl else torch.contiguous_format
    xc = x.cuda().contiguous(memory_format=fmt)
    wc, bc = w.cuda(), b.cuda()
    gzc = gz.cuda().contiguous(memory_format=fmt)
    ops = torch.ops.pyops
    with torch.backends.cudnn.flags(allow_tf32=False):  # the cuDNN engine in full float32
        _check_primitives(ops, xc, wc, bc, gzc, y64, gx64, gw64, gb64, ENGINE_CASES[name], dtype)


def _check_primitives(ops, xc, wc, bc, gzc, y64, gx64, gw64, gb64, case, dtype):
    shape, wshape, groups, stride, padding, dilation, act, cl = case
    fmt = torch.channels_last if cl else torch.contiguous_format
    y, mask = ops.conv2d_fwd(xc, wc, bc, stride, padding, dilation, groups, act, SCALARS[act])
    _close(y, y64.detach(), dtype)
    assert y.is_contiguous(memory_format=fmt)
    if act in (1, 2):
        assert torch.equal(mask.cpu(), _mask_of(y, act))
    gx = ops.conv2d_bwd_input(gzc, wc, list(shape), stride, padding, dilation, groups)
    _close(gx, gx64, dtype)
    assert gx.is_contiguous(memory_format=fmt)
    gw, gb = ops.conv2d_bwd_weight(gzc, xc, list(wshape), stride, padding, dilation, groups, True)
    _close(gw, gw64, dtype)
    _close(gb, gb64, dtype)
    if wshape[1] < 8:  # pyops's own weight gradient (cuDNN's determinism follows torch's settings)
        gw2, gb2 = ops.conv2d_bwd_weight(gzc, xc, list(wshape), stride, padding, dilation, groups, True)
        assert torch.equal(gw, gw2) and torch.equal(gb, gb2)

"""The CUDA conv kernels' launch plans (csrc/cuda/conv_plan.h: the host functions the launchers call),
read on the CPU: which engine a shape takes, and that every launch touching a large tensor fills an H100
(132 SMs) with at least two waves of blocks, with no grid dimension but x above 65,535."""

import pytest

import pyops

if not hasattr(pyops._C, "_cuda_launch_plan"):
    pytest.skip("pyops._C._cuda_launch_plan is not built in", allow_module_level=True)

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


def test_depthwise_forward_only_when_not_training():
    launches = plan((16, 64, 56, 56), (64, 1, 3, 3), groups=64, padding=1, training=False)
    assert names(launches) == ["conv_dw_fwd_kernel"]


def test_depthwise_stride_two_and_a_channel_multiplier_stay_tiled():
    launches = plan((8, 32, 64, 64), (64, 1, 3, 3), groups=32, stride=2, padding=1)
    assert set(names(launches)) == TILED | {REDUCE}


def test_depthwise_stride_three_falls_back_to_the_direct_kernels():
    launches = plan((8, 32, 64, 64), (32, 1, 3, 3), groups=32, stride=3, padding=1)
    assert set(names(launches)) == {"conv_fwd_kernel", "conv_bwd_input_kernel", "conv_bwd_weight_kernel", REDUCE}


def test_few_channels_per_group_fill_the_gpu():
    shape, weight = (16, 128, 28, 28), (128, 4, 3, 3)
    launches = plan(shape, weight, groups=32, padding=1)
    assert names(launches) == ["conv_fwd_kernel", "conv_bwd_input_kernel", "conv_bwd_weight_kernel", REDUCE]
    check_large_launches(launches, shape, weight, padding=1)


def test_weight_gradient_is_split_over_positions():
    """The weight gradient's blocks cover slices of N * OH * OW: more blocks than output channels times
    tap groups, and its partial sums stay under 1M elements."""
    shape, weight = (16, 128, 28, 28), (128, 4, 3, 3)
    wgrad = next(p for p in plan(shape, weight, groups=32, padding=1) if p["kernel"] == "conv_bwd_weight_kernel")
    taps = 4 * 3 * 3 + 1
    assert blocks(wgrad) > 128 * -(-taps // 64)
    reduce = next(p for p in plan(shape, weight, groups=32, padding=1) if p["kernel"] == REDUCE)
    assert blocks(reduce) * 256 >= 128 * taps


@pytest.mark.parametrize(
    "shape,weight,groups",
    [
        ((32, 64, 56, 56), (64, 64, 3, 3), 1),  # dense
        ((16, 128, 28, 28), (128, 32, 3, 3), 4),  # grouped, 32 channels per group
        ((16, 128, 28, 28), (128, 8, 3, 3), 16),  # the smallest that cuDNN takes
        ((256, 256, 14, 14), (256, 256, 1, 1), 1),  # pointwise
    ],
)
def test_eight_or_more_channels_per_group_go_to_cudnn(shape, weight, groups):
    assert plan(shape, weight, groups=groups, padding=1 if weight[2] == 3 else 0) == []


@pytest.mark.parametrize(
    "shape,weight,groups,stride",
    [
        ((256, 4096, 512, 512), (4096, 1, 3, 3), 4096, 1),  # tiled depthwise, 2^38 outputs
        ((64, 1 << 17, 64, 64), (1 << 17, 1, 5, 5), 1 << 17, 2),
        ((1024, 1 << 16, 64, 64), (1 << 16, 2, 3, 3), 1 << 15, 1),  # direct, 2 channels per group
        ((1024, 1 << 16, 64, 64), (1 << 16, 1, 3, 3), 1 << 16, 3),  # depthwise falling back to direct
    ],
)
def test_huge_shapes_use_grid_x_only(shape, weight, groups, stride):
    launches = plan(shape, weight, groups=groups, stride=stride, padding=1)
    assert launches
    for launch in launches:
        assert 1 <= launch["grid"][0] <= MAX_GRID_X, launch
        assert launch["grid"][1] <= MAX_GRID_YZ and launch["grid"][2] <= MAX_GRID_YZ, launch
        assert launch["block"][0] * launch["block"][1] * launch["block"][2] <= 1024

"""The CUDA launch plans (csrc/common/launch_plan.h), read on the CPU through
pyops._C._cuda_launch_plan: every op of batch_norm, the losses, the activations and the optimizers has
one, every grid is valid for any size (grid dims but x within 65,535, 64-bit counts never truncate),
and the large launches fill an H100 (132 SMs) at least twice. Also the weight total of a mean cross
entropy with class weights and out-of-range targets (no index out of range, on any device)."""

import math
import pathlib
import re

import pytest
import torch

import pyops
import pyops.functional as PF
from pyops import _C

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMS = 132
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535

# op -> (the .cu file whose __global__ functions it launches, sizes to plan)
OPS = {
    "batch_norm": ("batch_norm", {"shape": (32, 64, 56, 56)}),
    "l1_loss": ("loss", {"numel": 1 << 22}),
    "mse_loss": ("loss", {"numel": 1 << 22, "reduction": "none"}),
    "huber_loss": ("loss", {"numel": 1 << 22, "reduction": "sum"}),
    "rmse_loss": ("loss", {"numel": 1 << 22}),
    "cross_entropy": ("loss", {"rows": 4096, "classes": 1000}),
    "relu": ("activation", {"numel": 1 << 24}),
    "leaky_relu": ("activation", {"numel": 1 << 24}),
    "elu": ("activation", {"numel": 1 << 24}),
    "sigmoid": ("activation", {"numel": 1 << 24}),
    "tanh": ("activation", {"numel": 1 << 24}),
    "maxout": ("activation", {"numel": 1 << 24, "pieces": 4}),
    "sgd": ("optim", {"numel": 1 << 20, "tensors": 10}),
    "adam": ("optim", {"numels": [64 * 3 * 7 * 7, 64, 64, 1000 * 512, 1000]}),
    "adamw": ("optim", {"numel": 1 << 20, "tensors": 3}),
    "adam_8bit": ("optim", {"numels": [1 << 20, 300, 100]}),
    "adagrad": ("optim", {"numel": 4097, "tensors": 2}),
    "rmsprop": ("optim", {"numel": 1, "tensors": 300}),
}


def plan(op, **sizes):
    return _C._cuda_launch_plan(op, sizes)


def blocks(launch):
    return math.prod(launch["grid"])


def threads(launch):
    return math.prod(launch["block"])


def waves(launch):
    """Waves on an H100 at the most blocks an SM holds at this block size (a lower bound)."""
    per_sm = min(32, 2048 // threads(launch))
    return blocks(launch) / (SMS * per_sm)


def check_valid(launches):
    for launch in launches:
        assert set(launch) == {"kernel", "grid", "block", "smem", "elements", "why"}, launch
        x, y, z = launch["grid"]
        assert 1 <= x <= MAX_GRID_X and 1 <= y <= MAX_GRID_YZ and 1 <= z <= MAX_GRID_YZ, launch
        assert 1 <= threads(launch) <= 1024 and launch["block"][2] <= 64, launch
        assert 0 <= launch["smem"] <= 48 * 1024, launch


def global_kernels(family):
    """The __global__ function names of csrc/cuda/<family>.cu."""
    text = (ROOT / "csrc" / "cuda" / f"{family}.cu").read_text()
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text))


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_has_a_plan_of_its_kernels(op):
    family, sizes = OPS[op]
    launches = plan(op, **sizes)
    assert launches, op
    check_valid(launches)
    kernels = global_kernels(family)
    for launch in launches:
        assert launch["kernel"] in kernels, (launch["kernel"], sorted(kernels))


def names(op, **sizes):
    return [launch["kernel"] for launch in plan(op, **sizes)]


def test_plans_name_each_kernel_of_each_pass():
    bn = [launch["kernel"] for launch in plan("batch_norm", shape=(8, 16, 4, 4), training=True)]
    assert bn == [
        "stats_partial_kernel",
        "stats_combine_kernel",
        "elemt_kernel",
        "bwd_reduce_partial_kernel",
        "sum_combine_kernel",
        "bwd_elemt_kernel",
    ]
    ev = [launch["kernel"] for launch in plan("batch_norm", shape=(8, 16, 4, 4), training=False)]
    assert ev == ["elemt_kernel", "bwd_reduce_partial_kernel", "sum_combine_kernel", "bwd_elemt_kernel"]
    assert [launch["kernel"] for launch in plan("mse_loss", numel=10, reduction="none")] == [
        "pointwise_kernel",
        "pointwise_bwd_kernel",
    ]
    assert names("mse_loss", numel=10) == ["reduce_blocks_kernel", "sum_partials_kernel"]
    assert [launch["kernel"] for launch in plan("adam", numel=10, tensors=2)] == ["multi_tensor_kernel", "finish_step"]
    assert [launch["kernel"] for launch in plan("sgd", numel=10, tensors=2)] == ["multi_tensor_kernel"]
    assert [launch["kernel"] for launch in plan("sgd", numel=10, tensors=2, new_buffers=True)] == [
        "multi_tensor_kernel",
        "finish_step",
    ]
    # the optimizers' grid: a block per 4096-element chunk of each tensor
    assert plan("adam", numels=[4096, 4097, 1])[0]["grid"] == (4, 1, 1)
    # 8-bit states: a block of 256 threads per 256-element block, 16 per chunk (those past the end return)
    assert names("adam_8bit", numel=10, tensors=2) == ["adam_8bit_kernel", "finish_step"]
    launch = plan("adam_8bit", numels=[4096, 4097, 1])[0]
    assert launch["grid"] == (4 * 16, 1, 1) and launch["block"] == (256, 1, 1)
    # nothing to launch for empty tensors
    assert plan("relu", numel=0) == [] and plan("batch_norm", shape=(0, 3, 4, 4)) == []


def test_bad_requests_name_the_problem():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        plan("nope")
    with pytest.raises(ValueError, match=r"op 'mse_loss' needs sizes\['numel'\]"):
        plan("mse_loss")
    with pytest.raises(ValueError, match="reduction must be"):
        plan("mse_loss", numel=4, reduction="avg")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        plan("batch_norm", shape=(4,))
    with pytest.raises(TypeError, match="sizes"):
        plan("relu", numel=1.5)


HUGE = [1, 7, 31, 33, 257, 65535, 65536, 2**20 + 3, 2**31 - 1, 2**31, 2**31 + 5, 2**33 + 1, 2**40]


@pytest.mark.parametrize("n", HUGE)
def test_grids_are_valid_for_any_size(n):
    """No grid dimension but x above 65,535 and x within 2^31 - 1, whatever the size (the kernels
    stride over the rest with 64-bit indices)."""
    for op in ("l1_loss", "relu", "elu", "tanh"):
        for reduction in ("none", "mean"):
            check_valid(plan(op, numel=n, reduction=reduction) if op == "l1_loss" else plan(op, numel=n))
    check_valid(plan("maxout", numel=2 * n, pieces=2))
    check_valid(plan("adam", numel=n, tensors=3))
    for classes in (1, 2, 10, 21, 32, 33, 256, 257, 1000, 4096, 32000, 2**31 + 1):
        check_valid(plan("cross_entropy", rows=n, classes=classes))
    # (one block per channel of an NCHW reduction: grid x holds up to 2^31 - 1 channels)
    for shape in ((n, 3), (2, min(n, MAX_GRID_X), 3, 3), (3, 5, n, 1), (1, 70_000, 3, 3)):
        for channels_last in (False, True):
            for training in (False, True):
                check_valid(plan("batch_norm", shape=shape, channels_last=channels_last, training=training))


def test_cross_entropy_rows_beyond_2_31():
    """2^31 + 5 rows: a valid grid of at most a million blocks (a grid-stride loop over 64-bit rows);
    torch's `<<<rows>>>` would truncate."""
    rows = 2**31 + 5
    for classes in (10, 100, 1000, 50000):
        (launch,) = plan("cross_entropy", rows=rows, classes=classes)
        check_valid([launch])
        assert launch["grid"][1:] == (1, 1) and launch["grid"][0] <= 2**20


@pytest.mark.parametrize("classes", [1, 2, 5, 10, 16, 21, 32, 64, 256])
def test_cross_entropy_takes_several_rows_per_block_when_classes_are_few(classes):
    """A row gets the next power of two of lanes up to 32 (a warp up to 256 classes): 256 threads
    serve 8 rows or more, so 10 or 21 classes leave few lanes idle."""
    rows = 100_000
    (launch,) = plan("cross_entropy", rows=rows, classes=classes)
    lanes = min(32, 1 << max(0, (classes - 1).bit_length()))
    rows_per_block = threads(launch) // lanes
    assert rows_per_block >= 8
    assert blocks(launch) == math.ceil(rows / rows_per_block)


def test_cross_entropy_many_classes_take_a_block_per_row():
    (launch,) = plan("cross_entropy", rows=4096, classes=1000)
    assert threads(launch) == 256 and blocks(launch) == 4096
    (launch,) = plan("cross_entropy", rows=256, classes=32000)
    assert threads(launch) == 1024 and blocks(launch) == 256


README_BN = [(32, 64, 56, 56), (256, 256, 14, 14), (32, 256, 56, 56), (32, 64, 112, 112)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", README_BN, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_fills_an_h100_twice(shape, channels_last):
    """The README's batch_norm shapes: both split reductions (statistics, backward) and both
    elementwise passes have at least 2 waves (>= 264 blocks, and >= 2 waves at the most blocks an SM
    can hold); the reductions split over N*H*W in both layouts (channels_last used to give 14 blocks
    for (32, 64, 56, 56))."""
    launches = plan("batch_norm", shape=shape, channels_last=channels_last, training=True)
    check_valid(launches)
    by_name = {launch["kernel"]: launch for launch in launches}
    for name in ("stats_partial_kernel", "bwd_reduce_partial_kernel", "elemt_kernel", "bwd_elemt_kernel"):
        launch = by_name[name]
        assert blocks(launch) >= 2 * SMS, (name, launch)
        assert waves(launch) >= 2, (name, launch, waves(launch))
    for name in ("stats_partial_kernel", "bwd_reduce_partial_kernel"):
        assert by_name[name]["grid"][1] > 1, "split over the positions"


@pytest.mark.parametrize(
    ("op", "sizes"),
    [
        ("mse_loss", {"numel": 1 << 20}),
        ("l1_loss", {"numel": 1 << 22, "reduction": "none"}),
        ("huber_loss", {"numel": 1 << 22}),
        ("cross_entropy", {"rows": 4096, "classes": 1000}),
        ("cross_entropy", {"rows": 1 << 20, "classes": 10}),
        ("batch_norm", {"shape": (64, 64, 32, 32), "channels_last": True}),
        ("batch_norm", {"shape": (64, 64, 32, 32)}),
        ("batch_norm", {"shape": (16384, 256)}),
        ("relu", {"numel": 1 << 24}),
        ("adam", {"numel": 11_000_000, "tensors": 1}),
        ("adam_8bit", {"numel": 1 << 20, "tensors": 1}),
    ],
)
def test_large_launches_have_two_waves(op, sizes):
    """Large launches have >= 2 waves where the plan claims it (the header names the limits:
    batch_norm reductions from about 2.2M elements, activations from 4.3M, not cross_entropy with
    few rows of many classes)."""
    for launch in plan(op, **sizes):
        if launch["kernel"] in ("sum_partials_kernel", "stats_combine_kernel", "sum_combine_kernel", "finish_step"):
            continue  # over the partials or the per-channel/per-tensor values, not the tensor
        assert waves(launch) >= 2, (op, launch, waves(launch))


# ---- the weight total of a mean cross entropy (csrc/loss.h) ------------------------------------------


def test_weight_total_never_indexes_out_of_range():
    """With class weights, targets out of range add no weight (the kernels make their rows NaN) and are
    never used as an index: on a GPU that index was a device-side assert ending the process. The same
    host function on the CPU raised IndexError."""
    w = torch.tensor([1.0, 2.0, 4.0, 8.0])
    t = torch.tensor([0, 4, 3, -1, -100, 2, 1000, 1])
    got = _C._cross_entropy_weight_total(t, w, -100)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == 1.0 + 8.0 + 4.0 + 2.0
    # ignore_index itself out of range, and in range
    assert _C._cross_entropy_weight_total(torch.tensor([5, 1]), w, 5).item() == 2.0
    assert _C._cross_entropy_weight_total(torch.tensor([3, 1, 3]), w, 3).item() == 2.0
    assert _C._cross_entropy_weight_total(torch.tensor([7, -2]), w.double(), -100).item() == 0.0


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_out_of_range_target_with_weights_raises_on_the_cpu(backend):
    """On the CPU an out-of-range class index raises a clear IndexError (a CPU check costs no
    synchronisation), with class weights and every reduction as without them."""
    if backend not in pyops.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    x = torch.randn(3, 4)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pyops.backend(backend):
        for reduction in ("mean", "sum", "none"):
            for bad in (torch.tensor([0, 4, 1]), torch.tensor([0, -1, 1])):
                with pytest.raises(IndexError, match=r"pyops::cross_entropy_fwd: target -?\d+ is out of bounds"):
                    PF.cross_entropy(x, bad, weight=w, reduction=reduction)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_out_of_range_target_with_weights_is_a_nan_row_on_cuda(backend):
    """On a GPU an out-of-range class index makes its row's loss and gradient NaN (raising would
    synchronise), with class weights and a mean too: never a device-side assert. Other rows keep the
    gradient of the mean over the targets in range."""
    if backend not in pyops.available_backends("cuda"):
        pytest.skip(f"{backend} does not run on CUDA here")
    x = torch.randn(4, 5, device="cuda", dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device="cuda", dtype=torch.float64)
    t = torch.tensor([0, 7, 3, -100], device="cuda")
    with pyops.backend(backend):
        rows = PF.cross_entropy(x, t, weight=w, reduction="none")
        xr = x.clone().requires_grad_()
        mean = PF.cross_entropy(xr, t, weight=w, reduction="mean")
        mean.backward()
    torch.cuda.synchronize()
    assert torch.isnan(rows[1]) and rows[3] == 0
    ref = torch.nn.functional.cross_entropy(x[[0, 2]], t[[0, 2]], weight=w, reduction="none")
    torch.testing.assert_close(rows[[0, 2]], ref)
    assert torch.isnan(mean)
    assert torch.isnan(xr.grad[1]).all() and (xr.grad[3] == 0).all()
    xg = x[[0, 2]].clone().requires_grad_()
    torch.nn.functional.cross_entropy(xg, t[[0, 2]], weight=w).backward()
    torch.testing.assert_close(xr.grad[[0, 2]], xg.grad)


# ---- on a GPU: the split reductions against float64, bitwise run to run ------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (3, 40, 5, 7), (16, 100, 1, 1), (300, 33)])
def test_batch_norm_split_reductions_on_cuda(shape, channels_last):
    """Statistics, forward and backward of the native CUDA batch norm over split reductions (more than
    32 channels, several parts a channel, channels_last) against torch in float64, and bitwise the same
    on a second run."""
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    x64 = torch.randn(shape, dtype=torch.float64, device="cuda") * 3 + 1
    g64 = torch.randn(shape, dtype=torch.float64, device="cuda")
    c = shape[1]
    w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")

    def run():
        x = x64.float().contiguous(memory_format=fmt).requires_grad_()
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        with pyops.backend("native"):
            y = PF.batch_norm(x, None, None, wr, br, training=True)
        y.backward(g64.float().contiguous(memory_format=fmt))
        return y.detach(), x.grad, wr.grad, br.grad

    first, second = run(), run()
    for a, b2 in zip(first, second):
        assert torch.equal(a, b2)  # bitwise, run to run
    xr = x64.clone().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    y = torch.nn.functional.batch_norm(xr, None, None, wr, br, training=True)
    y.backward(g64)
    for got, want in zip(first, (y.detach(), xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

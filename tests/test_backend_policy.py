"""`auto`'s written rule (csrc/common/backend.h): the CPU crossovers and the CUDA table, row by row,
as the pure function of device kind, op and shape facts that the ops call (pyops._C._auto_rule), so
that the CUDA policy is checked on a machine without a GPU."""

import pytest
import torch

import pyops
import pyops.functional as PF
from pyops import _C
from pyops.backend import auto_rule, auto_table, resolve

# The CUDA table as the README states it: op -> what `auto` runs on a CUDA tensor.
CUDA_KERNEL = ("relu", "leaky_relu", "maxout", "l1_loss", "mse_loss", "huber_loss", "cross_entropy")
CUDA_KERNEL += ("sgd", "adam", "adagrad", "rmsprop")
CUDA_TORCH = ("elu", "sigmoid", "tanh")


def test_every_op_has_a_row_in_both_tables_with_a_reason():
    assert set(_C.AUTO_CUDA) == set(_C.AUTO_MIN_NUMEL)
    rules = auto_table("cuda")
    for op, (rule, why) in rules.items():
        assert rule in ("kernel", "torch", "fused", "depthwise"), op
        assert len(why) > 20, op
    assert {op for op, (rule, _) in rules.items() if rule == "kernel"} == set(CUDA_KERNEL)
    assert {op for op, (rule, _) in rules.items() if rule == "torch"} == set(CUDA_TORCH)
    assert rules["batch_norm"][0] == "fused" and rules["conv2d"][0] == "depthwise"


@pytest.mark.parametrize("op", CUDA_KERNEL)
def test_cuda_kernel_rows(op):
    for numel in (-1, 1, 1 << 10, 1 << 24):
        assert auto_rule(op, "cuda", numel) == "pyops"


@pytest.mark.parametrize("op", CUDA_TORCH)
def test_cuda_torch_rows(op):
    for numel in (-1, 1, 1 << 24):
        assert auto_rule(op, "cuda", numel) == "torch"
    # on the CPU the measured crossover decides
    assert auto_rule(op, "cpu", _C.AUTO_MIN_NUMEL[op]) == "pyops"
    assert auto_rule(op, "cpu", _C.AUTO_MIN_NUMEL[op] - 1) == "torch"


def test_cuda_batch_norm_only_when_it_fuses():
    n = 1 << 22
    assert auto_rule("batch_norm", "cuda", n) == "torch"  # plain: cuDNN
    assert auto_rule("batch_norm", "cuda", n, training=True) == "torch"
    assert auto_rule("batch_norm", "cuda", n, fused=True) == "pyops"  # activation and/or residual
    assert auto_rule("batch_norm", "cuda", n, training=True, fused=True) == "pyops"
    assert auto_rule("batch_norm", "cuda", n, memory_efficient=True) == "pyops"  # torch has no such form


def test_batch_norm_rule_on_the_cpu_keeps_its_crossover():
    assert auto_rule("batch_norm", "cpu", 1 << 15, fused=True) == "pyops"
    assert auto_rule("batch_norm", "cpu", (1 << 15) - 1, fused=True) == "torch"
    assert auto_rule("batch_norm", "cpu", 1 << 15) == "pyops"


CONV = dict(groups=1, in_per_group=64, kh=3, kw=3, out_plane=56 * 56)


@pytest.mark.parametrize(
    "facts",
    [
        dict(CONV),  # dense 3x3
        dict(CONV, kh=1, kw=1),  # dense 1x1
        dict(CONV, groups=32, in_per_group=4),  # grouped (ResNeXt)
        dict(CONV, groups=64, in_per_group=2),
        dict(CONV, groups=64, in_per_group=1, kh=9, kw=9),  # depthwise beyond 7x7
        dict(CONV, groups=64, in_per_group=1, kh=3, kw=11),
        dict(CONV, groups=1, in_per_group=1),  # one input channel, groups=1: a dense convolution
        dict(CONV, groups=64, in_per_group=-1),  # unknown (symbolic) channels per group
        dict(CONV, channels_last=True),
        dict(CONV, groups=64, in_per_group=1, channels_last=True),  # depthwise channels_last: a direct kernel
        dict(CONV, groups=64, in_per_group=1, sh=3, sw=3),  # depthwise, stride 3
        dict(CONV, groups=64, in_per_group=1, sh=1, sw=4),
    ],
)
def test_cuda_conv2d_goes_to_torch_outside_the_designed_shapes(facts):
    for numel in (-1, 1 << 10, 1 << 24):
        assert auto_rule("conv2d", "cuda", numel, **facts) == "torch"


@pytest.mark.parametrize("k", [(1, 1), (3, 3), (5, 5), (7, 7), (3, 7)])
def test_cuda_conv2d_depthwise_up_to_7x7_is_ours(k):
    """NCHW, strides up to 2: the shapes the tiled depthwise kernel is designed for."""
    for numel in (-1, 1 << 10, 1 << 24):
        for stride in ((1, 1), (2, 2), (1, 2)):
            facts = dict(CONV, groups=64, in_per_group=1, kh=k[0], kw=k[1], sh=stride[0], sw=stride[1])
            assert auto_rule("conv2d", "cuda", numel, **facts) == "pyops"


def test_cpu_conv2d_rule():
    """The CPU rule as tools/conv_sweep.py measured it (csrc/common/backend.h, bench/RESULTS.md)."""
    big, mid, small = 1 << 20, 1 << 17, 1 << 13
    assert auto_rule("conv2d", "cpu", big, **CONV) == "torch"  # dense
    assert auto_rule("conv2d", "cpu", small, **CONV) == "torch"  # dense, small too
    assert auto_rule("conv2d", "cpu", big, **dict(CONV, groups=4, in_per_group=16)) == "torch"  # > 8 a group
    assert auto_rule("conv2d", "cpu", small, **dict(CONV, groups=4, in_per_group=16)) == "torch"
    pairs = dict(CONV, groups=64, in_per_group=2)
    assert auto_rule("conv2d", "cpu", big, **dict(pairs, out_plane=7 * 7)) == "pyops"  # 2 a group: everywhere
    assert auto_rule("conv2d", "cpu", big, **dict(pairs, channels_last=True)) == "torch"
    assert auto_rule("conv2d", "cpu", small, **dict(pairs, channels_last=True)) == "pyops"  # torch's fixed cost
    dw = dict(CONV, groups=64, in_per_group=1)
    assert auto_rule("conv2d", "cpu", 1000, **dict(dw, out_plane=8 * 8)) == "pyops"  # small input
    assert auto_rule("conv2d", "cpu", big, **dict(dw, out_plane=7 * 7)) == "torch"  # a batch of small planes
    assert auto_rule("conv2d", "cpu", big, **dict(dw, out_plane=14 * 14)) == "pyops"
    assert auto_rule("conv2d", "cpu", big, **dict(dw, out_plane=-1)) == "pyops"  # unknown: as large
    assert auto_rule("conv2d", "cpu", big, **dict(dw, sh=2, sw=2)) == "torch"  # strided: the scalar loop
    assert auto_rule("conv2d", "cpu", small, **dict(dw, sh=2, sw=2)) == "pyops"
    assert auto_rule("conv2d", "cpu", mid, **dict(dw, channels_last=True)) == "pyops"  # channels_last, < 256K
    assert auto_rule("conv2d", "cpu", big, **dict(dw, channels_last=True)) == "torch"
    eight = dict(CONV, groups=8, in_per_group=8)
    assert auto_rule("conv2d", "cpu", big, **dict(eight, out_plane=28 * 28)) == "pyops"
    assert auto_rule("conv2d", "cpu", big, **dict(eight, out_plane=14 * 14)) == "torch"
    assert auto_rule("conv2d", "cpu", small, **dict(eight, out_plane=14 * 14)) == "pyops"
    four = dict(CONV, groups=32, in_per_group=4)
    assert auto_rule("conv2d", "cpu", big, **dict(four, out_plane=14 * 14)) == "pyops"
    assert auto_rule("conv2d", "cpu", big, **dict(four, out_plane=7 * 7)) == "torch"


def test_conv2d_op_follows_the_rule_on_the_cpu():
    """The op computes its facts from the tensors: a dense convolution goes to torch, two channels
    per group to pyops (the grad_fn tells)."""
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    dense = PF.conv2d(x, torch.randn(4, 8, 3, 3), padding=1)
    assert "pyops" not in type(dense.grad_fn).__name__ + dense.grad_fn.name()
    pairs = PF.conv2d(x, torch.randn(8, 2, 3, 3), padding=1, groups=4)
    assert pairs.grad_fn.name().startswith("pyops::")


def test_cpu_crossovers_and_unknown_sizes():
    for op, n in _C.AUTO_MIN_NUMEL.items():
        if op == "conv2d":
            continue
        assert auto_rule(op, "cpu", -1) == "pyops", op  # symbolic: as large
        assert auto_rule(op, "cpu", n) == "pyops", op
        if n > 0:
            assert auto_rule(op, "cpu", n - 1) == "torch", op


def test_other_devices_and_unknown_ops():
    assert auto_rule("relu", "meta", 1 << 24) == "torch"
    with pytest.raises(ValueError, match="unknown op"):
        auto_rule("softmax", "cuda")


def test_python_resolve_reads_the_cuda_table():
    """pyops.backend.resolve on CUDA: torch for a `torch` row whatever is installed; a kernel row
    takes native (else triton) where one can run here, else torch."""
    cuda = torch.device("cuda")
    for op in CUDA_TORCH:
        assert resolve(op, cuda, 1 << 24) == "torch"
    kernels = [b for b in pyops.available_backends("cuda") if b != "torch"]
    for op in CUDA_KERNEL:
        assert resolve(op, cuda, 1 << 24) == (kernels[0] if kernels else "torch")
    with pyops.backend("torch"):
        assert resolve("relu", cuda) == "torch"


def test_maxout_saves_fewer_bytes_than_torchs_composite():
    """The maxout row's reason: uint8 indices where torch's max saves int64 ones."""
    x = torch.randn(64, 256, requires_grad=True)
    with pyops.backend("native"):
        ours = pyops.saved_bytes(lambda t: PF.maxout(t, 4), x)
    theirs = pyops.saved_bytes(lambda t: t.unflatten(1, (64, 4)).max(2)[0], x)
    assert ours * 8 <= theirs
    assert ours == 64 * 64  # one byte an output


@pytest.mark.parametrize("op", ["relu", "leaky_relu"])
def test_mask_rows_save_fewer_bytes(op):
    x = torch.randn(64, 256, requires_grad=True)
    with pyops.backend("native"):
        ours = pyops.saved_bytes(getattr(PF, op), x)
    theirs = pyops.saved_bytes(getattr(torch.nn.functional, op), x)
    assert ours * 32 <= theirs


@pytest.mark.parametrize("op", ["relu", "leaky_relu", "elu", "sigmoid", "tanh"])
def test_python_twins_decide_as_the_op(op):
    """The Python twins of pyops.functional decide small CPU inputs themselves: the same as the op,
    on either side of the crossover."""
    twin = getattr(PF, "_py_" + op)
    n = _C.AUTO_MIN_NUMEL[op]
    for size in (n - 1, n):
        x = torch.randn(size, requires_grad=True)
        a, b = twin(x), getattr(torch.ops.pyops, op)(x)
        assert a.grad_fn.name() == b.grad_fn.name(), (op, size)

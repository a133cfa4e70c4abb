"""The conv family against the float64 torch oracle on every backend that runs here: the argument forms
of the spec table (pyops.testing.CONVS), float64 gradcheck with groups, strides, dilation and padding
together, opcheck of each primitive, nn.Conv2d and convert, torch.compile, and bad input."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import pyops
import pyops.functional as PF
import pyops.nn as pnn
from oracle import DTYPES, assert_close, device_backends, kernel_device_backends, opcheck_primitive, skip_unreliable
from pyops.ops import PRIMITIVES
from pyops.ops.conv import FAKES as CONV_FAKES
from pyops.ops.conv import conv2d_reference
from pyops.testing import CONV_CASES, CONVS, check_conv_case

SPEC = CONVS["conv2d"]
# The Triton interpreter is slow: the spec's interpreted forms, in float32 and float64.
TRITON_CASES = SPEC.interpreted


def _cases():
    for device, backend in [p if type(p) is tuple else p.values for p in device_backends()]:
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for dtype in DTYPES:
            for name in CONV_CASES:
                if device == "cpu" and backend == "triton":
                    if name not in TRITON_CASES or dtype not in (torch.float32, torch.float64):
                        continue
                yield pytest.param(name, device, backend, dtype, marks=marks, id=f"{name}-{device}-{backend}-{dtype}")


@pytest.mark.parametrize("name,device,backend,dtype", list(_cases()))
def test_against_oracle(name, device, backend, dtype):
    """Output (values and torch's strides) and the input, weight and bias gradients."""
    skip_unreliable(device, backend, dtype)
    with pyops.backend(backend):
        results = check_conv_case(SPEC, CONV_CASES[name], dtype, device, torch.Generator().manual_seed(0))
    for r in results:
        assert r.ok, r.message


# The direct engine's register-blocked paths (csrc/cpu/conv_direct.cpp), on the native backend: the
# depthwise 3x3 kernel (rows in blocks, widths below, at and past a vector of every dtype's length,
# 1-wide planes, dilation, stride 2 along the height, a crop, an activation, a strided input) and the
# grouped kernel blocked over output channels (multiples of the block and remainders).
def _blocked_cases():
    cases = {
        "dw3_w1": ((2, 3, 5, 1), (3, 1, 3, 3), {"groups": 3, "padding": 1}),
        "dw3_w5_h9": ((2, 3, 9, 5), (3, 1, 3, 3), {"groups": 3, "padding": 1}),
        "dw3_w17": ((1, 2, 7, 17), (2, 1, 3, 3), {"groups": 2, "padding": 1, "activation": "relu"}),
        "dw3_w33_h1": ((2, 2, 1, 33), (2, 1, 3, 3), {"groups": 2, "padding": 1}),
        "dw3_w40_h13": ((1, 3, 13, 40), (3, 1, 3, 3), {"groups": 3, "padding": 1, "activation": "elu"}),
        "dw3_dilated": ((1, 2, 11, 19), (2, 1, 3, 3), {"groups": 2, "padding": 2, "dilation": 2}),
        "dw3_dil_rows": ((1, 2, 12, 9), (2, 1, 3, 3), {"groups": 2, "padding": (2, 1), "dilation": (2, 1)}),
        "dw3_stride_h": ((2, 2, 11, 18), (2, 1, 3, 3), {"groups": 2, "padding": 1, "stride": (2, 1)}),
        "dw3_stride2": ((1, 3, 9, 21), (3, 1, 3, 3), {"groups": 3, "padding": 1, "stride": 2}),
        "dw3_stride2_w34": ((1, 2, 6, 34), (2, 1, 3, 3), {"groups": 2, "padding": 1, "stride": 2}),
        "dw3_stride2_w1": ((1, 2, 5, 1), (2, 1, 3, 3), {"groups": 2, "padding": 1, "stride": 2}),
        "dw3_crop": ((1, 2, 8, 10), (2, 1, 3, 3), {"groups": 2, "padding": 0}),
        "dw3_multiplier": ((1, 2, 7, 9), (4, 1, 3, 3), {"groups": 2, "padding": 1}),
        "grouped_k4": ((2, 16, 9, 28), (16, 4, 3, 3), {"groups": 4, "padding": 1}),
        "grouped_k5": ((1, 4, 6, 17), (10, 2, 3, 3), {"groups": 2, "padding": 1, "activation": "leaky_relu"}),
        "grouped_k3_dil": ((1, 6, 8, 13), (6, 2, 3, 3), {"groups": 3, "padding": 2, "dilation": 2}),
        "grouped_k8_w1": ((2, 8, 4, 1), (16, 4, 3, 3), {"groups": 2, "padding": 1}),
        "grouped_k6_w40": ((1, 6, 5, 40), (12, 3, 3, 3), {"groups": 2, "padding": 1}),
        # strided along the width: the input rows split by column phase
        "grouped_k4_stride2": ((2, 16, 9, 29), (16, 4, 3, 3), {"groups": 4, "padding": 1, "stride": 2}),
        "grouped_stride3_dil2": ((1, 4, 10, 37), (4, 2, 3, 3), {"groups": 2, "padding": 2, "stride": 3, "dilation": 2}),
        "dw5_stride2_w70": (
            (1, 2, 9, 70),
            (2, 1, 5, 5),
            {"groups": 2, "padding": 2, "stride": 2, "activation": "relu"},
        ),
        "k1_stride2": ((2, 4, 7, 9), (8, 2, 1, 1), {"groups": 2, "stride": 2}),
        "dw3_stride_w": ((1, 3, 6, 19), (3, 1, 3, 3), {"groups": 3, "padding": (0, 1), "stride": (1, 2)}),
    }
    for name, (xs, ws, kw) in cases.items():
        for dtype in DTYPES:
            yield pytest.param(name, xs, ws, kw, dtype, id=f"{name}-{dtype}")
    # a strided (sliced) input
    yield pytest.param(
        "dw3_sliced", (2, 3, 10, 40), (3, 1, 3, 3), {"groups": 3, "padding": 1}, torch.float32, id="sliced"
    )
    # non-finite inputs past the last output column must not reach the blocked weight gradients
    for name, xs, ws, g in [
        ("dw3_nonfinite", (2, 4, 6, 6), (4, 1, 3, 3), 4),
        ("k4_nonfinite", (2, 8, 6, 6), (8, 4, 3, 3), 2),
    ]:
        yield pytest.param(name, xs, ws, {"groups": g, "padding": 1}, torch.float32, id=name)
        kw = {"groups": g, "padding": 1, "stride": 2}
        yield pytest.param(name, xs, ws, kw, torch.float32, id=f"{name}_stride2")


@pytest.mark.parametrize("name,xs,ws,kw,dtype", list(_blocked_cases()))
def test_direct_blocked_paths(name, xs, ws, kw, dtype):
    from pyops.testing.conv import ConvCase, _conv_nonfinite

    view = (lambda t: t[:, :, ::2, 1::2]) if name == "dw3_sliced" else None
    view = _conv_nonfinite if name.endswith("nonfinite") else view
    case = ConvCase(xs, ws, kw) if view is None else ConvCase(xs, ws, kw, view=view)
    with pyops.backend("native"):
        results = check_conv_case(SPEC, case, dtype, "cpu", torch.Generator().manual_seed(0))
    for r in results:
        assert r.ok, r.message


GRADCHECK = [
    # groups, strides, dilation and padding together, a channel multiplier, every activation
    ((1, 4, 7, 6), (6, 2, 3, 2), {"groups": 2, "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)}),
    ((2, 3, 6, 6), (6, 1, 2, 3), {"groups": 3, "stride": 2, "padding": 1, "dilation": (1, 2), "activation": "elu"}),
    ((1, 4, 5, 6), (4, 2, 3, 3), {"groups": 2, "padding": "same", "dilation": 2, "activation": "leaky_relu"}),
]


# Under the interpreter: the same forms on fewer elements, in gradcheck's fast mode (random projections).
GRADCHECK_INTERPRETED = [
    ((1, 4, 5, 4), (4, 2, 3, 2), {"groups": 2, "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)}),
    ((1, 2, 4, 4), (4, 1, 2, 3), {"groups": 2, "stride": 2, "padding": 1, "dilation": (1, 2), "activation": "elu"}),
    ((1, 2, 4, 4), (2, 1, 3, 3), {"groups": 2, "padding": "same", "dilation": 2, "activation": "leaky_relu"}),
]


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("form", range(len(GRADCHECK)))
def test_gradcheck(form, device, backend):
    interpreted = device == "cpu" and backend == "triton"
    xs, ws, kw = (GRADCHECK_INTERPRETED if interpreted else GRADCHECK)[form]
    fast = backend != "native"  # the reference's plumbing and the interpreter: random projections
    x = torch.randn(xs, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(ws, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(ws[0], dtype=torch.float64, device=device, requires_grad=True)
    with pyops.backend(backend):
        assert torch.autograd.gradcheck(lambda *t: PF.conv2d(*t, **kw), (x, w, b), fast_mode=fast)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if "native" in str(p)])
def test_gradgradcheck(device, backend):
    """Second derivatives: the primitives' own derivatives (conv is bilinear), the fused relu's mask."""
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    kw = {"groups": 2, "stride": (2, 1), "padding": 1, "dilation": (1, 2)}
    with pyops.backend(backend):
        assert torch.autograd.gradgradcheck(lambda *t: PF.conv2d(*t, **kw), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *t: PF.conv2d(*t, **kw, activation="relu"), (x, w, b))


# ---- opcheck of each primitive ----------------------------------------------------------------------
def _primitive_samples(name, device):
    f64 = {"dtype": torch.float64, "device": device}
    x = torch.randn(2, 4, 6, 5, **f64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, **f64, requires_grad=True)
    b = torch.randn(6, **f64, requires_grad=True)
    xcl = torch.randn(1, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    wdw = torch.randn(3, 1, 3, 3, device=device)
    geometry = ([2, 1], [1, 0], [1, 2], 2)  # stride, padding, dilation, groups
    if name == "conv2d_fwd":
        yield (x, w, b, *geometry, 1, 0.0)
        yield (xcl, wdw, None, [1, 1], [1, 1], [1, 1], 3, 3, 1.0)
    if name == "conv2d_fwd_stats":
        yield (x, w, b, *geometry)
        yield (xcl, wdw, None, [1, 1], [1, 1], [1, 1], 3)
    y = torch.nn.functional.conv2d(x.detach(), w.detach(), None, *geometry)
    g = torch.randn_like(y, requires_grad=True)
    if name == "conv2d_bwd_input":
        yield (g, w, list(x.shape), *geometry)
    if name == "conv2d_bwd_weight":
        yield (g, x, list(w.shape), *geometry, True)
        yield (g.detach(), x.detach(), list(w.shape), *geometry, False)


CONV_PRIMITIVES = [name for name in PRIMITIVES["native"] if name in CONV_FAKES]


@pytest.mark.parametrize("device,backend", kernel_device_backends())
@pytest.mark.parametrize("name", CONV_PRIMITIVES)
def test_opcheck(name, device, backend):
    opcheck_primitive(backend, name, _primitive_samples(name, device))


# ---- layouts, saved memory, determinism, backend choice ---------------------------------------------
@pytest.mark.parametrize("backend", [b for b in pyops.available_backends("cpu") if b != "triton"])
def test_channels_last_stays_channels_last(backend):
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3)
    with pyops.backend(backend):
        y = PF.conv2d(x, w, padding=1, groups=8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, TF.conv2d(x.double(), w.double(), padding=1, groups=8), torch.float32, reduced=9)


def test_fused_relu_saves_a_bit_mask():
    """conv + relu keeps input, weight and a 1-bit mask of the output (torch keeps the whole output)."""
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    with pyops.backend("native"):
        got = pyops.saved_bytes(lambda t: PF.conv2d(t, w, padding=1, groups=4, activation="relu"), x)
    out = 2 * 4 * 16 * 16
    assert got == x.numel() * 4 + w.numel() * 4 + (out + 7) // 8
    theirs = pyops.saved_bytes(lambda t: torch.relu(TF.conv2d(t, w, padding=1, groups=4)), x)
    assert theirs == x.numel() * 4 + w.numel() * 4 + out * 4


def test_weight_gradient_is_deterministic_across_thread_counts():
    x = torch.randn(8, 16, 12, 12)
    w = torch.randn(16, 2, 3, 3, requires_grad=True)
    g = torch.randn(8, 16, 12, 12)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            with pyops.backend("native"):
                (gw,) = torch.autograd.grad(PF.conv2d(x, w, padding=1, groups=8), w, g)
            grads.append(gw)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], gw) for gw in grads[1:])


def test_auto_picks_the_measured_faster_convolution():
    """auto keeps pyops' CPU kernels only where they were measured faster than torch's (see
    the conv2d rule in csrc/backend.cpp): dense, more than 8 channels per group, large channels_last and
    strided inputs and batches of 7x7 planes go to torch; 2 per group, small inputs and larger planes stay."""

    def picks(shape, out_channels, groups, channels_last=False, stride=1):
        x = torch.randn(shape, requires_grad=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(out_channels, shape[1] // groups, 3, 3)
        y = PF.conv2d(x, w, padding=1, groups=groups, stride=stride)
        return "pyops" if "pyops::" in y.grad_fn.name() else "torch"

    assert picks((2, 32, 8, 8), 8, 1) == "torch"  # dense
    assert picks((2, 64, 8, 8), 64, 4) == "torch"  # 16 channels per group
    assert picks((2, 64, 8, 8), 64, 8) == "pyops"  # 8 channels per group, small
    assert picks((64, 64, 7, 7), 64, 64) == "torch"  # depthwise, a batch of 7x7 planes
    assert picks((8, 64, 28, 28), 64, 64, channels_last=True) == "torch"
    assert picks((2, 64, 28, 28), 64, 64, channels_last=True) == "pyops"  # depthwise channels_last, < 256K
    assert picks((8, 64, 28, 28), 64, 64, stride=2) == "torch"
    assert picks((64, 64, 8, 8), 64, 32) == "pyops"  # 2 channels per group
    assert picks((2, 32, 8, 8), 32, 32) == "pyops"  # depthwise, small
    assert picks((4, 64, 28, 28), 64, 16) == "pyops"  # 4 channels per group, 28x28 planes
    with pyops.backend("native"):
        assert picks((2, 32, 8, 8), 8, 1) == "pyops"


def test_argument_forms_match_torch():
    """ints and pairs, one-element lists, padding strings, keyword and positional calls, unbatched."""
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    with pyops.backend("native"):
        for args, kw in [
            ((b, 2, 1, 1, 2), {}),
            ((b,), {"stride": (2, 1), "padding": [1], "dilation": (1, 2), "groups": 2}),
            ((), {"bias": None, "padding": "valid", "groups": 2}),
            ((b, 1, "same", 2, 2), {}),
        ]:
            assert_close(PF.conv2d(x, w, *args, **kw), TF.conv2d(x, w, *args, **kw), torch.float64, reduced=18)
        assert_close(PF.conv2d(x[0], w, b, groups=2), TF.conv2d(x[0], w, b, groups=2), torch.float64, reduced=18)


def test_numpy_and_tensor_integer_arguments_as_torch():
    """stride, padding, dilation and groups as numpy integers or 0-d integer tensors, as torch's conv2d
    takes them; a float is refused."""
    import numpy as np

    x, w = torch.randn(2, 4, 9, 8, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    with pyops.backend("native"):
        for kw in [
            {"stride": np.int64(2), "padding": np.int32(1), "dilation": np.int64(1), "groups": np.int64(2)},
            {"stride": (np.int64(2), 1), "padding": [np.int16(1), 0], "groups": torch.tensor(2)},
        ]:
            plain = {k: (2 if k == "groups" else v) for k, v in kw.items()}
            assert_close(PF.conv2d(x, w, **kw), TF.conv2d(x, w, **plain), torch.float64, reduced=18)
        with pytest.raises((TypeError, RuntimeError)):
            PF.conv2d(x, w, stride=1.5, groups=2)


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_bad_arguments_raise_with_torchs_words(backend):
    """The public op's checks run before any backend, with torch's words after the op's name (torch's own
    tests match them): the same error on every backend."""
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 2, 3, 3)
    cases = [
        ((x, w), {"groups": 2, "stride": -1}, "non-positive stride is not supported"),
        ((x, w), {"groups": 2, "padding": -1}, "negative padding is not supported"),
        ((x, w), {"groups": 2, "dilation": -1}, "dilation should be greater than zero"),
        ((x, w), {"groups": 2, "dilation": 0}, "non-positive dilation is not supported"),
        ((x, w), {"groups": 0}, "non-positive groups is not supported"),
        ((x, torch.randn(2, 1, 3, 3)), {"groups": 4}, "expected weight to be at least 4 at dimension 0"),
        ((x, torch.randn(6, 1, 3, 3)), {"groups": 4}, "expected weight to be divisible by 4 at dimension 0"),
        ((x, w), {}, r"expected input\[1, 4, 6, 6\] to have 2 channels, but got 4 channels instead"),
        ((torch.randn(6, 6), w), {}, "Expected 3D \\(unbatched\\) or 4D \\(batched\\) input to conv2d"),
    ]
    for args, kwargs, words in cases:
        with pyops.backend(backend), pytest.raises(RuntimeError, match="pyops.conv2d: .*" + words):
            PF.conv2d(*args, **kwargs)
        with pytest.raises(RuntimeError, match=words):
            TF.conv2d(*args, **kwargs)
    # a 3-d weight: the words torch's OpInfo expects (torch's conv2d itself first objects to the pairs)
    with pyops.backend(backend), pytest.raises(RuntimeError, match="Expected 3-dimensional input for 3-dimensional"):
        PF.conv2d(x, torch.randn(4, 2, 3), groups=2)


# ---- modules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_is_a_drop_in(padding_mode):
    kw = {"stride": (1, 2), "padding": (2, 1), "groups": 2, "padding_mode": padding_mode}
    torch.manual_seed(1)
    ours = pnn.Conv2d(4, 6, (3, 2), **kw, dtype=torch.float64)
    torch.manual_seed(1)
    theirs = nn.Conv2d(4, 6, (3, 2), **kw, dtype=torch.float64)
    assert isinstance(ours, nn.Conv2d) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    with pyops.backend("native"):
        assert_close(ours(x), theirs(x).detach(), torch.float64, reduced=12)


def test_conv2d_module_activation():
    m = pnn.Conv2d(4, 4, 3, padding=1, groups=4, activation="relu")
    assert "activation='relu'" in repr(m)
    x = torch.randn(2, 4, 6, 6)
    with pyops.backend("native"):
        assert_close(m(x), torch.relu(TF.conv2d(x, m.weight, m.bias, padding=1, groups=4)).double(), torch.float32)
    with pytest.raises(ValueError, match="pyops.nn.Conv2d: activation"):
        pnn.Conv2d(4, 4, 3, activation="gelu")


def test_convert_maps_conv2d_sharing_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding="same"))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x).detach()
    weights = [m.weight for m in model if isinstance(m, nn.Conv2d)]
    ours = pyops.convert(model, inplace=True)
    convs = [m for m in ours if isinstance(m, nn.Conv2d)]
    assert all(type(m) is pnn.Conv2d for m in convs)
    assert all(m.weight is w for m, w in zip(convs, weights))
    with pyops.backend("native"):
        assert_close(ours(x), expected.double(), torch.float32, reduced=72)


@pytest.mark.parametrize("backend", ["native"])
def test_torch_compile_fullgraph(backend):
    """A model with pyops convolutions (depthwise, grouped with an activation) compiles with no graph
    break and matches eager, gradients included."""
    torch.manual_seed(0)
    model = nn.Sequential(
        pnn.Conv2d(4, 8, 3, padding=1, groups=2, activation="relu"),
        pnn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        pnn.Conv2d(8, 4, 1, activation="elu"),
    )
    x = torch.randn(2, 4, 10, 10)
    with pyops.backend(backend):
        eager = model(x)
        eager.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-5)


def test_conv2d_module_scripts():
    x = torch.randn(2, 4, 6, 6)
    for m in (
        pnn.Conv2d(4, 4, 3, padding=1, groups=4, activation="relu"),
        pnn.Conv2d(4, 8, 3, padding="same", groups=2),
    ):
        scripted = torch.jit.script(m)
        with pyops.backend("native"):
            assert torch.allclose(scripted(x), m(x))


def test_autocast_runs_in_the_lower_precision_dtype():
    """As torch's convolution: under autocast inputs are cast to the autocast dtype."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pyops.backend("native"):
        y = PF.conv2d(x, w, padding=1, groups=4)
        assert y.dtype == TF.conv2d(x, w, padding=1, groups=4).dtype == torch.bfloat16
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    assert_close(y, TF.conv2d(xb, wb, padding=1, groups=4), torch.bfloat16, reduced=9)


def test_reference_is_torch():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    assert torch.equal(conv2d_reference(x, w, groups=2, activation="relu"), torch.relu(TF.conv2d(x, w, groups=2)))


# ---- bad input: an error naming the op, never a crash ------------------------------------------------
def test_bad_input_is_refused_without_crashing():
    """Each bad argument, through the public function and each primitive of each backend, is an error
    naming the op (torch's own on the torch backend), never a signal (run in a subprocess)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "bad_calls_conv.py")
    backends = pyops.available_backends("cpu")
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, script, *backends], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    assert "all refused" in r.stdout


def test_operands_on_another_device_are_refused_in_torch_words():
    """The weight and the bias are checked against the input's device by the check every family shares
    (csrc/common/checks.h), in torch's words."""
    x, w, b = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)
    with pytest.raises(RuntimeError, match="pyops.conv2d: weight: Tensor on device meta is not on the expected device"):
        PF.conv2d(x, w.to("meta"), b)
    with pytest.raises(RuntimeError, match="pyops.conv2d: bias: Tensor on device meta is not on the expected device"):
        PF.conv2d(x, w, b.to("meta"))


@pytest.mark.parametrize("stride", [(2, 2), (1, 2), (3, 1)])
def test_strided_input_gradient_with_a_non_finite_weight(stride):
    """Input columns no output reads get no 0 * inf from the strided input gradient's vector lanes: the
    NaN pattern is torch's."""
    x = torch.randn(1, 2, 9, 24, dtype=torch.float64, requires_grad=True)  # stride 2: the last column unread
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    w[1, 0, 2, 1] = float("inf")
    g = torch.randn(TF.conv2d(x, w, None, stride, 0, 1, 2).shape, dtype=torch.float64)
    (want,) = torch.autograd.grad(TF.conv2d(x, w, None, stride, 0, 1, 2), x, g)
    with pyops.backend("native"):
        (got,) = torch.autograd.grad(PF.conv2d(x, w, None, stride, 0, 1, 2), x, g)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin])

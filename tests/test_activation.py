"""The activation family against the float64 torch oracle, on every backend that runs here."""
import math

import pytest
import torch
import torch.nn.functional as TF

import pyops
import pyops.functional as PF
from pyops.ops import PRIMITIVES
from pyops.ops.activation import maxout_reference

from oracle import DTYPES, assert_close, device_backends, skip_unreliable

# name -> (pyops op, torch reference, keyword arguments)
OPS = {
    "relu": (PF.relu, TF.relu, {}),
    "leaky_relu": (PF.leaky_relu, TF.leaky_relu, {"negative_slope": 0.2}),
    "elu": (PF.elu, TF.elu, {"alpha": 1.3}),
    "sigmoid": (PF.sigmoid, torch.sigmoid, {}),
    "tanh": (PF.tanh, torch.tanh, {}),
}
INPLACE = ["relu", "leaky_relu", "elu"]


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


# (shape to draw, view of it that the op gets): empty, 0-d, one element, sizes that are not a
# multiple of 8 (the vector/mask width), several Triton programs, and non-contiguous layouts.
LAYOUTS = {
    "0d": ((), lambda t: t),
    "one": ((1,), lambda t: t),
    "empty": ((0, 3), lambda t: t),
    "odd": ((13, 9), lambda t: t),
    "blocks": ((3, 1001), lambda t: t),
    "transposed": ((9, 21), lambda t: t.t()),
    "sliced": ((6, 34), lambda t: t[1:, ::3]),
    "channels_last": ((2, 5, 3, 7), _channels_last),
    "expanded": ((1, 37), lambda t: t.expand(4, 37)),
}


def _make(shape, view, dtype, device):
    base = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    return view(base.to(device))


def _oracle(ref, x, kw, g):
    """Reference output and gradient in float64 from the same (dtype-rounded) inputs."""
    x64 = x.detach().to(torch.float64).requires_grad_()
    y64 = ref(x64, **kw)
    (gx64,) = torch.autograd.grad(y64, x64, g.to(torch.float64)) if y64.numel() else (torch.zeros_like(x64),)
    return y64, gx64


def _elu_saving_output(x, alpha=1.0, inplace=False):
    """torch's ELU in its output-saving form (its in-place one), the counterpart of pyops' in-place
    ELU: in float16/bfloat16 the rounded output bounds the gradient's accuracy."""
    return TF.elu(x * 1, alpha, inplace=alpha >= 0)


def _torch_in_dtype(ref, x, kw, g):
    """torch's own result in x's dtype: how far the dtype itself lets a result be from the oracle."""
    xt = x.detach().clone().requires_grad_()
    yt = ref(xt, **kw)
    (gt,) = torch.autograd.grad(yt, xt, g) if yt.numel() else (torch.zeros_like(xt),)
    return yt, gt


def _check(op, ref, kw, x, g):
    xp = x.detach().clone().requires_grad_()
    y = op(xp, **kw)
    y64, gx64 = _oracle(ref, x, kw, g)
    yt, gt = _torch_in_dtype(ref, x, kw, g)
    assert y.stride() == yt.stride() or y.numel() <= 1, f"layout {y.stride()} differs from torch's {yt.stride()}"
    assert_close(y, y64, x.dtype, yt)
    if y.numel():
        (gx,) = torch.autograd.grad(y, xp, g)
        assert_close(gx, gx64, x.dtype, gt, what="gradient")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(OPS))
def test_against_oracle(name, device, backend, dtype, layout):
    skip_unreliable(device, backend, dtype)
    op, ref, kw = OPS[name]
    shape, view = LAYOUTS[layout]
    x = _make(shape, view, dtype, device)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(device)
    if layout == "transposed":
        g = g.t().contiguous().t()  # a gradient laid out differently from the output
    with pyops.backend(backend):
        _check(op, ref, kw, x, g)


EDGE = [0.0, -0.0, 1e-30, -1e-30, 1e-5, -1e-5, 0.5, -0.5, 1.0, -1.0, 20.0, -20.0, 80.0, -80.0, 1e30, -1e30,
        math.inf, -math.inf, math.nan, 3.0, -3.0, 0.1499, -0.1501, 1e-8, -1e-8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(OPS))
def test_edge_values(name, device, backend, dtype):
    """Exact zeros at the kinks, tiny and huge values, inf and NaN propagate as in torch."""
    skip_unreliable(device, backend, dtype)
    op, ref, kw = OPS[name]
    x = torch.tensor(EDGE, dtype=torch.float64).to(dtype).to(device)
    g = torch.linspace(-2, 2, len(EDGE), dtype=torch.float64).to(dtype).to(device)
    with pyops.backend(backend):
        _check(op, ref, kw, x, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", INPLACE)
@pytest.mark.parametrize("layout", ["odd", "transposed", "sliced", "channels_last"])
def test_inplace(name, device, backend, dtype, layout):
    """inplace=True writes into the input (any layout, views included), returns it, bumps its
    version, and backpropagates through a non-leaf exactly as the out-of-place op."""
    skip_unreliable(device, backend, dtype)
    op, ref, kw = OPS[name]
    shape, view = LAYOUTS[layout]
    full = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(device)
    g = torch.randn(view(full).shape, dtype=torch.float64).to(dtype).to(device)
    leaf = full.clone().requires_grad_()
    with pyops.backend(backend):
        y = view(leaf * 1)  # a non-leaf (a view of one for sliced/transposed) in the layout under test
        ptr, version, stride = y.data_ptr(), y._version, y.stride()
        out = op(y, inplace=True, **kw)
        assert out is y and y.data_ptr() == ptr and y.stride() == stride and y._version > version
        (gx,) = torch.autograd.grad(out, leaf, g)
    full64 = full.to(torch.float64).requires_grad_()
    y64 = ref(view(full64), **kw)
    (gx64,) = torch.autograd.grad(y64, full64, g.to(torch.float64))
    tref = _elu_saving_output if ref is TF.elu else ref
    fullt = full.clone().requires_grad_()
    yt = tref(view(fullt), **kw)
    (gt,) = torch.autograd.grad(yt, fullt, g)
    assert_close(out, y64, dtype, yt)
    assert_close(gx, gx64, dtype, gt, what="gradient")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", INPLACE)
def test_inplace_leaf_errors_as_torch(name, device, backend):
    op, ref, kw = OPS[name]
    x = torch.randn(5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        ref(x, inplace=True, **kw)
    with pyops.backend(backend):
        with pytest.raises(RuntimeError, match="leaf"):
            op(x, inplace=True, **kw)
        with torch.no_grad():  # allowed without grad recording, as in torch
            y = x.detach().clone()
            op(y, inplace=True, **kw)
            assert_close(y, ref(x.detach().double(), **kw), torch.float32)


@pytest.mark.parametrize("device,backend", device_backends())
def test_elu_negative_alpha(device, backend):
    """alpha < 0: the output no longer tells the branch; out of place saves the input as torch does,
    in place fails at backward as torch does."""
    x = torch.randn(50, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    with pyops.backend(backend):
        _check(PF.elu, TF.elu, {"alpha": -0.7}, x, g)
        leaf = x.clone().requires_grad_()
        y = PF.elu(leaf * 1, alpha=-0.7, inplace=True)
        with pytest.raises(RuntimeError, match="negative"):
            y.backward(g)


# ---- maxout -------------------------------------------------------------------------------------
MAXOUT_CASES = {
    "dim1": ((4, 12, 3), 3, 1, lambda t: t),
    "last": ((5, 20), 4, -1, lambda t: t),
    "first": ((6, 7), 2, 0, lambda t: t),
    "1d": ((9,), 9, 0, lambda t: t),
    "pieces1": ((3, 4), 1, 1, lambda t: t),
    "empty": ((0, 6), 3, 1, lambda t: t),
    "big": ((2, 1030, 2), 2, 1, lambda t: t),
    "channels_last": ((2, 8, 3, 5), 4, 1, _channels_last),
    "transposed": ((6, 10), 5, 0, lambda t: t.t()),
}


@pytest.mark.parametrize("case", list(MAXOUT_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
def test_maxout_against_oracle(case, device, backend, dtype):
    skip_unreliable(device, backend, dtype)
    shape, pieces, dim, view = MAXOUT_CASES[case]
    x = _make(shape, view, dtype, device)
    g_shape = list(x.shape)
    g_shape[dim] //= pieces
    g = torch.randn(g_shape, dtype=torch.float64).to(dtype).to(device)
    with pyops.backend(backend):
        _check(PF.maxout, maxout_reference, {"pieces": pieces, "dim": dim}, x, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
def test_maxout_ties_and_nan(device, backend, dtype):
    """The gradient goes to the first maximal piece; NaN wins, the first NaN of a group."""
    skip_unreliable(device, backend, dtype)
    nan, inf = math.nan, math.inf
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [nan, 5.0, nan, 1.0], [-inf, -inf, -inf, -inf], [0.0, -0.0, 0.0, 0.0],
                      [4.0, nan, 9.0, 9.0], [2.0, 2.0, 2.0, 2.0]], dtype=dtype, device=device).reshape(-1)
    g = torch.arange(1.0, 7.0, dtype=dtype, device=device)
    with pyops.backend(backend):
        _check(PF.maxout, maxout_reference, {"pieces": 4, "dim": 0}, x, g)
        xp = x.clone().requires_grad_()
        PF.maxout(xp, 4, 0).backward(g)
    expected = torch.zeros(24, dtype=dtype)
    for group, k in enumerate([1, 0, 0, 0, 1, 0]):
        expected[group * 4 + k] = group + 1
    assert torch.equal(xp.grad.cpu(), expected)


# ---- gradcheck, opcheck --------------------------------------------------------------------------
def _away_from_kinks(shape, device):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    return torch.where(x.abs() < 1e-2, x.sign() * 0.1 + x, x)


def _op_fn(name):
    if name == "maxout":
        return lambda t: PF.maxout(t, 3, 1)
    op, _, kw = OPS[name]
    return lambda t: op(t, **kw)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(OPS) + ["maxout"])
def test_gradcheck(name, device, backend):
    x = _away_from_kinks((4, 6), device).requires_grad_()
    fn = _op_fn(name)
    with pyops.backend(backend):
        assert torch.autograd.gradcheck(fn, (x,))
        if name in INPLACE:
            assert torch.autograd.gradcheck(lambda t: OPS[name][0](t * 1, inplace=True, **OPS[name][2]), (x,))


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(OPS) + ["maxout"])
def test_gradgradcheck(name, device, backend):
    """Second derivatives, as torch's ops have them (the primitives' own derivatives)."""
    x = _away_from_kinks((3, 6), device).requires_grad_()
    fn = _op_fn(name)
    with pyops.backend(backend):
        assert torch.autograd.gradgradcheck(fn, (x,))
        if name == "elu":
            assert torch.autograd.gradgradcheck(lambda t: PF.elu(t, alpha=-0.5), (x,))


def _primitive_samples(name, device):
    """Example arguments for each primitive: float64, float32, channels_last, empty, requires_grad."""
    def inputs():
        yield torch.randn(3, 5, dtype=torch.float64, device=device)
        yield torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
        yield torch.randn(0, 4, device=device)
        yield torch.randn(3, 17, dtype=torch.float64, device=device, requires_grad=True)
        yield torch.randn(7, 6, device=device).t()

    for x in inputs():
        n = x.numel()
        mask = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=device)
        g = torch.randn_like(x, requires_grad=x.requires_grad)
        y = torch.rand_like(x)
        if name in ("relu_fwd", "relu_fwd_"):
            yield (x.detach().clone() if name.endswith("_") else x,)
        elif name in ("leaky_relu_fwd", "leaky_relu_fwd_"):
            yield (x.detach().clone() if name.endswith("_") else x, 0.1)
        elif name == "elu_fwd_":
            yield (x.detach().clone(), 1.5)
        elif name == "elu_fwd":
            yield (x, 1.5)
        elif name == "relu_bwd":
            yield (g, mask)
        elif name == "leaky_relu_bwd":
            yield (g, mask, 0.1)
        elif name == "elu_bwd":
            yield (g, y, 1.5, True)
            yield (g, x, 1.5, False)
        elif name in ("sigmoid_fwd", "tanh_fwd"):
            yield (x,)
        elif name in ("sigmoid_bwd", "tanh_bwd"):
            yield (g, y)
        elif name == "maxout_fwd":
            yield (x.reshape(-1, 1) if x.dim() < 2 else x, 1, -1)
            if x.shape[-1] % 5 == 0 and x.numel():
                yield (x, 5, -1)
        elif name == "maxout_bwd":
            idx = torch.randint(0, 2, x.shape, dtype=torch.uint8, device=device)
            yield (g, idx, 2, 0)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if "torch" not in str(p)])
@pytest.mark.parametrize("name", list(PRIMITIVES["native"]))
def test_opcheck(name, device, backend):
    if backend == "torch":
        pytest.skip("the torch backend has no primitives")
    op = PRIMITIVES[backend][name]
    for args in _primitive_samples(name, device):
        torch.library.opcheck(op, args)


# ---- memory saved for backward --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPS) + ["maxout"])
def test_saved_bytes(name):
    """relu/leaky_relu save a 1-bit mask, elu its input (as torch), sigmoid/tanh their output, maxout
    uint8 indices."""
    n = 4096 + 5
    x = torch.randn(n, requires_grad=True)
    if name == "maxout":
        x = torch.randn(n - 5, requires_grad=True)
        with pyops.backend("native"):
            got = pyops.saved_bytes(lambda t: PF.maxout(t, 4, 0), x)
        assert got == x.numel() // 4
        return
    op, ref, kw = OPS[name]
    with pyops.backend("native"):
        got = pyops.saved_bytes(lambda t: op(t, **kw), x)
    torch_bytes = pyops.saved_bytes(lambda t: ref(t, **kw), x)
    if name in ("relu", "leaky_relu"):
        assert got == (n + 7) // 8
        assert torch_bytes == 4 * n  # float32: pyops saves 1/32 of torch's
    else:
        assert got == 4 * n


# ---- dtypes and bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_inputs_follow_torch(dtype):
    x = torch.arange(-5, 6).to(dtype)
    assert torch.equal(PF.relu(x), TF.relu(x))
    assert torch.equal(PF.sigmoid(x), torch.sigmoid(x))
    assert torch.equal(PF.tanh(x), torch.tanh(x))
    for name, fn in [("leaky_relu", PF.leaky_relu), ("elu", PF.elu), ("maxout", lambda t: PF.maxout(t, 1, 0))]:
        with pytest.raises(TypeError, match=f"pyops.{name}: input dtype"):
            fn(x)


def test_complex_sigmoid_follows_torch():
    x = torch.randn(6, dtype=torch.complex64)
    assert torch.equal(PF.sigmoid(x), torch.sigmoid(x))
    with pytest.raises(TypeError, match="pyops.elu"):
        PF.elu(x)


@pytest.mark.parametrize("pieces,dim,match", [(3, 1, "does not divide"), (0, 1, r"\[1, 256\]"),
                                             (300, 1, r"\[1, 256\]"), (2.0, 1, "int"), (2, 5, "out of range")])
def test_maxout_bad_arguments(pieces, dim, match):
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=f"pyops.maxout: .*{match}"):
        PF.maxout(x, pieces, dim)


def test_maxout_zero_dim_input():
    with pytest.raises(ValueError, match="pyops.maxout: input must have at least one dimension"):
        PF.maxout(torch.tensor(1.0), 1, 0)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="pyops.relu: input must be a Tensor"):
        PF.relu([1.0, 2.0])
    with pytest.raises(TypeError, match="pyops.leaky_relu: negative_slope must be a number"):
        PF.leaky_relu(torch.randn(3), "0.1")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_primitives_reject_bad_input(backend):
    """Both backends share one host side (csrc/activation.h): the same checks, the same messages."""
    if backend not in pyops.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    ops = PRIMITIVES[backend]
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="pyops::relu_fwd: self must be float64, float32, float16 or bfloat16"):
        ops["relu_fwd"](torch.arange(4))
    with pytest.raises(RuntimeError, match="pyops::relu_bwd: mask must hold"):
        ops["relu_bwd"](x, torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="pyops::relu_bwd: mask must be uint8"):
        ops["relu_bwd"](x, torch.zeros(2))
    with pytest.raises(RuntimeError, match="pyops::sigmoid_bwd: saved has dtype"):
        ops["sigmoid_bwd"](x, x.double())
    with pytest.raises(RuntimeError, match="pyops::tanh_bwd: saved has shape"):
        ops["tanh_bwd"](x, torch.randn(11))
    with pytest.raises(RuntimeError, match="pyops::maxout_bwd: indices must be uint8"):
        ops["maxout_bwd"](x, torch.zeros(10), 2, 0)
    with pytest.raises(RuntimeError, match="pieces"):
        ops["maxout_fwd"](x, 3, 0)
    with pytest.raises(RuntimeError, match="pieces"):
        ops["maxout_fwd"](x, 1000, 0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="pyops.backend: unknown backend 'cudnn'"):
        with pyops.backend("cudnn"):
            pass


def test_unavailable_backend():
    if "cuda" in pyops.available_backends("cpu"):
        pytest.skip("n/a")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    x = torch.randn(3, device="meta")
    with pyops.backend("native"), pytest.raises(RuntimeError, match="pyops.relu: backend 'native' is not available on meta"):
        PF.relu(x)


def test_auto_picks_torch_for_small_cpu_tensors():
    """auto = the fastest measured: torch eager below the measured crossover, native above."""
    from pyops.backend import resolve

    cpu = torch.device("cpu")
    assert resolve("relu", cpu, 100, 1000) == "torch"
    assert resolve("relu", cpu, 1 << 22, 1000) == "native"
    with pyops.backend("native"):
        assert resolve("relu", cpu, 100, 1000) == "native"
    small = torch.randn(100, requires_grad=True)
    assert type(PF.relu(small).grad_fn).__name__ == "ReluBackward0"
    with pyops.backend("native"):
        assert "MaskedFwdFn" in PF.relu(small).grad_fn.name()
    x = torch.randn(1 << 20, requires_grad=True)
    assert "MaskedFwdFn" in PF.relu(x).grad_fn.name()


@pytest.mark.parametrize("name", list(OPS) + ["maxout"])
def test_autocast_keeps_the_given_dtype(name):
    """Under autocast activations compute in the dtype they are given, as torch's do."""
    x = torch.randn(4, 6)
    ref = (lambda t: maxout_reference(t, 3, 1)) if name == "maxout" else (lambda t: OPS[name][1](t, **OPS[name][2]))
    with torch.autocast("cpu", dtype=torch.bfloat16), pyops.backend("native"):
        y = _op_fn(name)(x)
        assert ref(x).dtype == torch.float32
    assert y.dtype == torch.float32
    assert_close(y, ref(x.double()), torch.float32)

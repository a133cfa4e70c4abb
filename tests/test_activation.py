"""The activation family against the float64 torch oracle, on every backend that runs here. Ops, their
keyword arguments, samples (shapes, layouts, edge values) and tolerances come from the spec table
(pyops.testing.ACTIVATIONS)."""

import pytest
import torch
import torch.nn.functional as TF

import pyops
import pyops.functional as PF
from oracle import DTYPES, assert_close, device_backends, kernel_device_backends, opcheck_primitive, skip_unreliable
from pyops.ops import PRIMITIVES
from pyops.ops.activation import FAKES as ACTIVATION_FAKES
from pyops.testing import ACTIVATIONS, compare_op

INPLACE = [name for name, spec in ACTIVATIONS.items() if spec.inplace]
# (op, sample) pairs: every sample (shape and layout) of every op.
SAMPLES = [(name, sample) for name, spec in ACTIVATIONS.items() for sample in spec.samples]


def _check(op, ref, kw, x, g):
    for result in compare_op(op, ref, kw, x, g):
        assert result.ok, result.message


def _elu_saving_output(x, alpha=1.0, inplace=False):
    """torch's ELU in its output-saving form (its in-place one), the counterpart of pyops' in-place
    ELU: in float16/bfloat16 the rounded output bounds the gradient's accuracy."""
    return TF.elu(x * 1, alpha, inplace=alpha >= 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name,layout", SAMPLES)
def test_against_oracle(name, layout, device, backend, dtype):
    """Outputs and gradients over shapes, strides and layouts (empty, 0-d, one element, sizes that are
    not a multiple of the vector/mask width, several Triton programs, non-contiguous inputs), with
    torch's strides."""
    skip_unreliable(device, backend, dtype)
    spec = ACTIVATIONS[name]
    sample = spec.samples[layout]
    kw = spec.sample_kwargs(sample)
    x = sample.make(dtype, device)
    g = sample.grad(spec.output_shape(x.shape, kw), dtype, device)
    with pyops.backend(backend):
        _check(spec.fn, spec.reference, kw, x, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_edge_values(name, device, backend, dtype):
    """Exact zeros at the kinks, tiny and huge values, inf and NaN propagate as in torch."""
    skip_unreliable(device, backend, dtype)
    spec = ACTIVATIONS[name]
    kw = spec.sample_kwargs(spec.edge)
    x = spec.edge.make(dtype, device)
    g = spec.edge.grad(spec.output_shape(x.shape, kw), dtype, device)
    with pyops.backend(backend):
        _check(spec.fn, spec.reference, kw, x, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", INPLACE)
@pytest.mark.parametrize("layout", ["odd", "transposed", "sliced", "channels_last"])
def test_inplace(name, device, backend, dtype, layout):
    """inplace=True writes into the input (any layout, views included), returns it, bumps its
    version, and backpropagates through a non-leaf exactly as the out-of-place op."""
    skip_unreliable(device, backend, dtype)
    spec = ACTIVATIONS[name]
    op, ref, kw = spec.fn, spec.reference, spec.kwargs
    sample = spec.samples[layout]
    full, view = sample.draw(dtype, device), sample.view
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
def test_inplace_on_a_negative_view(name, device, backend):
    """In place on a tensor whose negative bit is set (x.conj().imag, a lazily negated view): the values
    and the base's as torch's in-place op leaves them (once an internal assert of the math-bit fallback)."""
    spec = ACTIVATIONS[name]
    z = torch.randn(11, dtype=torch.complex128, device=device)
    zt = z.clone()
    x, xt = z.conj().imag, zt.conj().imag
    assert x.is_neg()
    with pyops.backend(backend):
        out = spec.fn(x, inplace=True, **spec.kwargs)
    assert out is x
    torch.testing.assert_close(x, spec.reference(xt.clone(), **spec.kwargs), rtol=0, atol=0)
    spec.reference(xt, inplace=True, **spec.kwargs)
    torch.testing.assert_close(z, zt, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", INPLACE)
def test_inplace_leaf_errors_as_torch(name, device, backend):
    spec = ACTIVATIONS[name]
    op, ref, kw = spec.fn, spec.reference, spec.kwargs
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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", device_backends())
def test_maxout_ties_and_nan(device, backend, dtype):
    """The gradient goes to the first maximal piece; NaN wins, the first NaN of a group."""
    skip_unreliable(device, backend, dtype)
    spec = ACTIVATIONS["maxout"]
    x = spec.edge.make(dtype, device)
    assert x.shape == (24,) and spec.sample_kwargs(spec.edge) == {"pieces": 4, "dim": 0}
    g = torch.arange(1.0, 7.0, dtype=dtype, device=device)
    with pyops.backend(backend):
        _check(PF.maxout, spec.reference, {"pieces": 4, "dim": 0}, x, g)
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


def _op_fn(name, shape, reference=False):
    """The op (or its torch reference) with the table's keyword arguments, fitted to `shape`."""
    spec = ACTIVATIONS[name]
    op, kw = (spec.reference if reference else spec.fn), spec.kwargs_for(shape)
    return lambda t: op(t, **kw)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradcheck(name, device, backend):
    x = _away_from_kinks((4, 6), device).requires_grad_()
    fn = _op_fn(name, x.shape)
    spec = ACTIVATIONS[name]
    with pyops.backend(backend):
        assert torch.autograd.gradcheck(fn, (x,))
        if spec.inplace:
            assert torch.autograd.gradcheck(lambda t: spec.fn(t * 1, inplace=True, **spec.kwargs), (x,))


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradgradcheck(name, device, backend):
    """Second derivatives, as torch's ops have them (the primitives' own derivatives)."""
    x = _away_from_kinks((3, 6), device).requires_grad_()
    fn = _op_fn(name, x.shape)
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


# The activation family's primitives: those pyops.ops.activation registers fake kernels for.
ACTIVATION_PRIMITIVES = [name for name in PRIMITIVES["native"] if name in ACTIVATION_FAKES]


@pytest.mark.parametrize("device,backend", kernel_device_backends())
@pytest.mark.parametrize("name", ACTIVATION_PRIMITIVES)
def test_opcheck(name, device, backend):
    opcheck_primitive(backend, name, _primitive_samples(name, device))


# ---- memory saved for backward --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_saved_bytes(name):
    """What the table says each op saves: relu/leaky_relu a 1-bit mask, elu its input (as torch),
    sigmoid/tanh their output, maxout uint8 indices."""
    spec = ACTIVATIONS[name]
    n = 4096 + 5  # not a multiple of 8
    if spec.saves == "indices":  # maxout: 4 pieces along dim 0
        x = torch.randn(n - 5, requires_grad=True)
        kw = {**spec.kwargs, "pieces": 4, "dim": 0}
    else:
        x = torch.randn(n, requires_grad=True)
        kw = spec.kwargs
    with pyops.backend("native"):
        got = pyops.saved_bytes(lambda t: spec.fn(t, **kw), x)
    numel_out = torch.Size(spec.output_shape(x.shape, kw)).numel()
    assert got == spec.saved_bytes(x.numel(), numel_out, x.element_size())
    if name == "maxout":
        assert got == x.numel() // 4
    elif spec.saves == "mask":
        torch_bytes = pyops.saved_bytes(lambda t: spec.reference(t, **kw), x)
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


@pytest.mark.parametrize(
    "pieces,dim,match",
    [
        (3, 1, "does not divide"),
        (0, 1, r"\[1, 256\]"),
        (300, 1, r"\[1, 256\]"),
        (2.0, 1, "int"),
        (2, 5, "out of range"),
    ],
)
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
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    x = torch.randn(3, device="meta")
    with (
        pyops.backend("native"),
        pytest.raises(RuntimeError, match="pyops.relu: backend 'native' is not available on meta"),
    ):
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
        assert PF.relu(small).grad_fn.name() == "pyops::ReluBackward"
    x = torch.randn(1 << 20, requires_grad=True)
    assert PF.relu(x).grad_fn.name() == "pyops::ReluBackward"


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_autocast_keeps_the_given_dtype(name):
    """Under autocast activations compute in the dtype they are given, as torch's do."""
    x = torch.randn(4, 6)
    ref = _op_fn(name, x.shape, reference=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pyops.backend("native"):
        y = _op_fn(name, x.shape)(x)
        assert ref(x).dtype == torch.float32
    assert y.dtype == torch.float32
    assert_close(y, ref(x.double()), torch.float32)

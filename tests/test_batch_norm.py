"""The batch_norm family against the float64 torch oracle on every backend that runs here: configurations,
samples (shapes, layouts, edge cases) and tolerances from the spec table (pyops.testing.BATCH_NORMS);
gradcheck of every form, opcheck of every primitive, the modules (state_dict, running statistics,
conversion), the memory-efficient form, torch.compile, SyncBatchNorm over two gloo processes, and bad
input refused in a subprocess."""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import pyops
import pyops.functional as PF
import pyops.nn as pnn
from oracle import DTYPES, assert_close, device_backends, kernel_device_backends, opcheck_primitive, skip_unreliable
from pyops.ops import PRIMITIVES
from pyops.ops.batch_norm import FAKES as BATCH_NORM_FAKES
from pyops.ops.batch_norm import batch_norm_reference
from pyops.testing import BATCH_NORM_TRITON_SAMPLES, BATCH_NORMS, check_batch_norm


@pytest.fixture(autouse=True)
def _native():
    """The tests' small inputs run pyops' kernels (under `auto` they would go to torch below its crossover);
    a test that names a backend selects it inside."""
    with pyops.backend("native"):
        yield


# Triton runs under the interpreter here: a few configurations on tiny samples, float32/float64.
TRITON_SPECS = ("batch_norm", "bn_add_relu", "bn_add_leaky_me", "bn_elu_me", "bn_eval_leaky")


def _cases():
    for device, backend in [(p.values if hasattr(p, "values") else p) for p in device_backends()]:
        marks = [pytest.mark.cuda] if device == "cuda" else []
        if device == "cuda" and backend == "torch":
            continue
        for name, spec in BATCH_NORMS.items():
            for sample in spec.samples:
                if device == "cpu" and backend == "triton":
                    if name not in TRITON_SPECS or sample not in BATCH_NORM_TRITON_SAMPLES:
                        continue
                if device == "cpu" and backend == "torch" and sample not in ("nchw", "channels_last_grad"):
                    continue
                yield pytest.param(name, sample, device, backend, marks=marks, id=f"{name}-{sample}-{device}-{backend}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,sample,device,backend", list(_cases()))
def test_against_oracle(name, sample, device, backend, dtype):
    """Output (and its layout), running statistics and the gradients of input, weight, bias and residual."""
    skip_unreliable(device, backend, dtype)
    if backend == "triton" and device == "cpu" and dtype not in (torch.float32, torch.float64):
        pytest.skip("the interpreter runs float32/float64 only here (the kernels are the same)")
    spec = BATCH_NORMS[name]
    if dtype not in spec.dtypes:
        pytest.skip(f"{name} is checked in {spec.dtypes} here")
    with pyops.backend(backend), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        results = check_batch_norm(spec, spec.samples[sample], dtype, device, torch.Generator().manual_seed(0))
    for r in results:
        assert r.ok, r.message


def test_far_from_zero_mean_is_stable():
    """float32 input of mean 1e4 and unit variance normalizes to within 1e-2 of the float64 result."""
    x = torch.randn(8, 4, 64, 64, dtype=torch.float64) + 1e4
    y64 = TF.batch_norm(x, None, None, training=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        x32 = x.float().contiguous(memory_format=layout)
        y = PF.batch_norm(x32, None, None, training=True)
        assert (y.double() - y64).abs().max() < 1e-2


def test_deterministic_and_thread_count_free():
    """The same bits on every run and whatever the thread count (fixed split and combine order)."""
    x = torch.randn(4, 3, 150, 150).requires_grad_()
    g = torch.randn_like(x)

    def run():
        y = PF.batch_norm(x, None, None, torch.randn(3, generator=torch.Generator().manual_seed(1)), None, True)
        return [y, *torch.autograd.grad(y, x, g)]

    first = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


# ---- gradcheck -----------------------------------------------------------------------------------------
GRAD_FORMS = [
    ({}, False),
    ({"activation": "relu"}, True),
    ({"activation": "leaky_relu", "negative_slope": 0.2}, False),
    ({"activation": "elu", "alpha": 1.5}, True),
    ({"activation": "leaky_relu", "negative_slope": 0.3, "memory_efficient": True}, True),
    ({"activation": "elu", "alpha": 0.8, "memory_efficient": True}, False),
    ({"memory_efficient": True}, True),
]


# The kernels' backends (torch's is the reference); the interpreter gets the forms that cover its
# kernels' branches.
GRAD_CASES = [
    pytest.param(
        form,
        residual,
        training,
        device,
        backend,
        marks=[pytest.mark.cuda] if device == "cuda" else [],
        id=f"{i}-{'train' if training else 'eval'}-{device}-{backend}",
    )
    for device, backend in [(p.values if hasattr(p, "values") else p) for p in device_backends()]
    if backend != "torch"
    for i, (form, residual) in enumerate(GRAD_FORMS)
    for training in (True, False)
    if not (device == "cpu" and backend == "triton" and (i not in (1, 4, 5) or not training))
]


@pytest.mark.parametrize("form,residual,training,device,backend", GRAD_CASES)
def test_gradcheck(form, residual, training, device, backend):
    """Gradients of input, weight, bias and residual, every form (fused, residual, memory-efficient), in
    float64, NCHW and channels_last."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    shapes = [(2, 2, 2, 2)] if backend == "triton" else [(3, 2, 3, 2), (4, 3)]
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.float64, device=device)
        if len(shape) == 4 and backend != "triton":
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w = (torch.rand(c, dtype=torch.float64, device=device) + 0.5).requires_grad_()
        b = torch.randn(c, dtype=torch.float64, device=device).requires_grad_()
        r = torch.randn(shape, dtype=torch.float64, device=device).requires_grad_() if residual else None
        rm = torch.randn(c, dtype=torch.float64, device=device)
        rv = torch.rand(c, dtype=torch.float64, device=device) + 0.5

        def fn(x, w, b, *res, rm=rm, rv=rv):
            return PF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, residual=res[0] if res else None, **form)

        args = (x.requires_grad_(), w, b) + ((r,) if residual else ())
        with pyops.backend(backend):
            assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_double_backward():
    """create_graph=True builds the backward from differentiable ops (the first-order path is the
    kernels'): the second derivative is torch's (tests/test_autodiff.py checks every form)."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pyops.backend("native"):
        (g,) = torch.autograd.grad(PF.batch_norm(x, None, None, training=True).pow(3).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    (gt,) = torch.autograd.grad(TF.batch_norm(x, None, None, training=True).pow(3).sum(), x, create_graph=True)
    (ggt,) = torch.autograd.grad(gt.pow(2).sum(), x)
    assert_close(g, gt, torch.float64)
    assert_close(gg, ggt, torch.float64, reduced=x.numel())


# ---- opcheck: every primitive ---------------------------------------------------------------------------
def _primitive_samples(name, device):
    for shape, cl in (((3, 4, 2, 3), False), ((3, 4, 2, 3), True), ((5, 3), False), ((0, 3, 2), False)):
        x = torch.randn(shape, dtype=torch.float64, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        mean, invstd = torch.randn(c, dtype=torch.float64, device=device), torch.rand(c, dtype=torch.float64) + 0.5
        invstd = invstd.to(device)
        w, b = (
            torch.rand(c, dtype=torch.float64, device=device) + 0.5,
            torch.randn(c, dtype=torch.float64, device=device),
        )
        y = torch.rand_like(x) - 0.2
        r = torch.randn_like(x)
        g = torch.randn_like(x)
        if name == "batch_norm_stats":
            if x.numel():
                yield (x,)
                yield (x.float(),)
        elif name == "batch_norm_elemt":
            yield (x, mean, invstd, w, b, None, "none", 0.0)
            yield (x.float(), mean.float(), invstd.float(), None, None, r.float(), "relu", 0.0)
            yield (x, mean, invstd, w, b, r, "elu", 1.2)
        elif name == "batch_norm_bwd_reduce":
            yield (g, x, None, None, mean, invstd, w, b, "none", 0.0, False)
            yield (g, x, y, None, mean, invstd, w, b, "relu", 0.0, True)
            yield (g, None, y, r, mean, invstd, w, b, "leaky_relu", 0.1, True)
        elif name == "batch_norm_bwd":
            yield (g, x, None, None, mean, invstd, w, b, "none", 0.0, False)
            yield (g, x, y, None, mean, invstd, None, None, "relu", 0.0, True)
            yield (g, None, y, r, mean, invstd, w, b, "elu", 0.9, True)
        elif name == "batch_norm_bwd_elemt":
            yield (g, x, None, None, mean, invstd, w, b, mean * 0.1, invstd * 0.2, "none", 0.0)
            yield (g, x, y, None, mean, invstd, None, None, None, None, "relu", 0.0)
            yield (g, None, y, r, mean, invstd, w, b, mean * 0.1, invstd * 0.2, "elu", 0.9)


BATCH_NORM_PRIMITIVES = [name for name in PRIMITIVES["native"] if name in BATCH_NORM_FAKES]


@pytest.mark.parametrize("device,backend", kernel_device_backends())
@pytest.mark.parametrize("name", BATCH_NORM_PRIMITIVES)
def test_opcheck(name, device, backend):
    opcheck_primitive(backend, name, _primitive_samples(name, device), limit=2 if backend == "triton" else None)


def test_public_op_opcheck():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    args = (x.requires_grad_(), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), w, None)
    torch.library.opcheck(
        torch.ops.pyops.batch_norm.default,
        args,
        {"training": False, "activation": "relu"},
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_running_update_opcheck_and_composite_compliance():
    """The running-average step is one op (as in torch's batch norm kernels), so a tensor subclass's
    statistics never update plain buffers through a composite's in-place calls (torch's composite
    compliance check, which the op's callers pass)."""
    from torch.testing._internal.composite_compliance import check_all_permutations

    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyops.batch_norm_running_update.default, (rm, rv, mean, var, 0.3, 1.5))
    torch.ops.pyops.batch_norm_running_update(rm, rv, mean, var, 0.3, 1.5)
    torch.testing.assert_close(rm, 0.3 * mean)
    torch.testing.assert_close(rv, 0.7 + 0.3 * 1.5 * var)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    stats = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    # every mix of plain tensors and subclass instances among the arguments, running statistics included
    check_all_permutations(
        PF._py_batch_norm, (x, *stats), {"training": True}, lambda a, b: torch.testing.assert_close(a, b)
    )


# ---- edge cases and semantics --------------------------------------------------------------------------
def test_one_value_per_channel_in_training_raises_like_torch():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        TF.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        PF.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.ops.pyops.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        pnn.BatchNorm1d(3)(x)
    PF.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=False)  # eval takes it


def test_eval_needs_running_statistics():
    with pytest.raises(RuntimeError, match="running_mean"):
        PF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_memory_efficient_refuses_relu():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="relu's output cannot be inverted"):
        PF.batch_norm(x, None, None, training=True, activation="relu", memory_efficient=True)
    with pytest.raises(ValueError, match="invertible"):
        PF.batch_norm(x, None, None, training=True, activation="leaky_relu", negative_slope=0.0, memory_efficient=True)
    with pytest.raises(ValueError, match="relu's output cannot be inverted"):
        pnn.BatchNorm2d(3, activation="relu", memory_efficient=True)
    with pytest.raises(ValueError, match="activation"):
        PF.batch_norm(x, None, None, training=True, activation="gelu")


def test_memory_efficient_saves_one_tensor():
    """conv-BN-act keeps one activation-sized tensor a layer: the output, where the plain form keeps the
    input and the output (measured with saved-tensor hooks)."""
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    act_bytes = x.numel() * x.element_size()

    def fn(memory_efficient, activation="leaky_relu"):
        return lambda t: PF.batch_norm(
            t * 1, None, None, w, b, True, activation=activation, memory_efficient=memory_efficient
        )

    plain = pyops.saved_bytes(fn(False), x)
    efficient = pyops.saved_bytes(fn(True), x)
    # t * 1 saves nothing (a scalar product); per-channel vectors are small
    assert act_bytes * 2 <= plain < act_bytes * 2 + 4096
    assert act_bytes <= efficient < act_bytes + 4096
    torch_bn_act = pyops.saved_bytes(lambda t: TF.leaky_relu(TF.batch_norm(t * 1, None, None, w, b, True)), x)
    assert torch_bn_act >= 2 * act_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", [{"activation": "leaky_relu", "negative_slope": 0.1}, {"activation": "elu"}, {}])
def test_memory_efficient_half_precision(form, dtype):
    """float16/bfloat16, memory-efficient: xhat comes from the output rounded to the dtype, so each gradient
    is within a few roundings of the dtype of the float64 oracle, norm-wise (relative to its largest value)."""
    torch.manual_seed(0)
    x = (torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3).to(dtype)
    w = (torch.rand(4) * 0.5 + 0.5).requires_grad_()
    b = (torch.rand(4) + 1).requires_grad_()
    r = torch.randn(6, 4, 5, 5).to(dtype)
    g = torch.randn(6, 4, 5, 5).to(dtype)
    eps = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]

    def run(fn, cast, **extra):
        leaves = [cast(t).detach().clone().requires_grad_() for t in (x, w, b, r)]
        y = fn(leaves[0], None, None, leaves[1], leaves[2], True, residual=leaves[3], **form, **extra)
        return [y, *torch.autograd.grad(y, leaves, cast(g))]

    ours = run(PF.batch_norm, lambda t: t, memory_efficient=True)
    oracle = run(batch_norm_reference, lambda t: t.double())
    for a, e in zip(ours, oracle):
        assert (a.double() - e).abs().max() <= 8 * eps * e.abs().max()


def test_nan_propagates():
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    x[1, 0, 2] = float("nan")
    y = PF.batch_norm(x, None, None, training=True, activation="relu")
    t = TF.relu(TF.batch_norm(x, None, None, training=True))
    assert torch.equal(y.isnan(), t.isnan())


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_nan_channel_gives_nan_gradients_through_elu(layout, memory_efficient):
    """A channel holding NaN has NaN statistics: its output and its input and weight gradients are NaN in
    every layout; the fused elu's derivative at NaN is 1, as torch's scalar loop and CUDA kernel have it
    (its vectorized CPU loop has NaN), so the bias gradient is the sum of g."""
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    x[1, 0, 1, 1] = float("nan")
    x = x.contiguous(memory_format=layout).requires_grad_()
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    y = PF.batch_norm(x, None, None, w, b, training=True, activation="elu", memory_efficient=memory_efficient)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert y[:, 0].isnan().all() and not y[:, 1].isnan().any()
    assert gx[:, 0].isnan().all() and not gx[:, 1].isnan().any()
    assert gw[0].isnan() and not (gw[1].isnan() or gb.isnan().any())
    torch.testing.assert_close(gb[0], torch.ones_like(y[:, 0]).sum())


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
def test_empty_batch_gradients_are_zero(backend):
    """An empty batch in training: empty output, zero weight and bias gradients (its statistics are NaN and
    never reach them), running statistics untouched, as torch's."""
    for shape in ((0, 3, 4), (0, 3, 2, 2)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.rand(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        with pyops.backend(backend):
            y = PF.batch_norm(x, rm, rv, w, b, training=True, activation="relu")
            gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        assert y.shape == x.shape and gx.shape == x.shape
        assert torch.equal(gw, torch.zeros(3, dtype=torch.float64)) and torch.equal(gb, torch.zeros_like(gb))
        assert torch.equal(rm, torch.zeros(3, dtype=torch.float64)) and torch.equal(rv, torch.ones_like(rv))


def _zero_channels_as_torch():
    for backend in ("native", "triton", "torch"):
        for training in (True, False):
            x = torch.randn(4, 0, 3, requires_grad=True)
            w, b = torch.ones(0, requires_grad=True), torch.zeros(0, requires_grad=True)
            if backend == "torch":  # torch's batch_norm fails indexing a weight of zero elements
                w = b = None
            rm, rv, r = torch.zeros(0), torch.ones(0), torch.zeros(4, 0, 3)
            with pyops.backend(backend):
                y = PF.batch_norm(x, rm, rv, w, b, training=training, activation="relu", residual=r)
                leaves = [t for t in (x, w, b) if t is not None]
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
            ref = TF.batch_norm(x, rm, rv, training=training)
            assert y.shape == ref.shape == (4, 0, 3), (backend, y.shape)
            assert [g.shape for g in grads] == [t.shape for t in leaves]
    print("zero channels ok")


def test_zero_channels_as_torch():
    """Zero channels (once a division by zero: SIGFPE) give empty results as torch's, in a subprocess so
    that a signal fails the test instead of ending the run."""
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "from test_batch_norm import _zero_channels_as_torch; _zero_channels_as_torch()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "zero channels ok" in r.stdout


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_infinite_values_keep_the_running_mean_infinite(backend, layout):
    """A channel holding +inf (first, or after finite values) or -inf: its running mean is +-inf and its
    variance NaN, as torch's; the other channels' statistics are untouched by it."""
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    x[0, 0, 0, 0] = math.inf  # first value of channel 0 (the Triton kernels shift by it)
    x[2, 1, 1, 2] = math.inf  # after finite values
    x[1, 2, 0, 1] = -math.inf
    x = x.contiguous(memory_format=layout)
    stats = [(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)) for _ in range(2)]
    with pyops.backend(backend):
        y = PF.batch_norm(x, *stats[0], training=True)
    t = TF.batch_norm(x, *stats[1], training=True)
    assert torch.equal(stats[0][0][:3], torch.tensor([math.inf, math.inf, -math.inf], dtype=torch.float64))
    torch.testing.assert_close(stats[0][0], stats[1][0], equal_nan=True)
    torch.testing.assert_close(stats[0][1], stats[1][1], equal_nan=True)
    torch.testing.assert_close(y, t, equal_nan=True)


@pytest.mark.parametrize("backend", ["native", "triton", "torch", "auto"])
@pytest.mark.parametrize("operand", ["running_mean", "running_var", "weight", "bias", "residual"])
def test_operand_on_another_device_is_an_error(operand, backend):
    """A meta (or other-device) operand beside a CPU input is refused as torch refuses it, never read: the
    dispatcher would otherwise run the meta kernel and return uninitialized memory."""
    x = torch.randn(4, 3, 5)
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3), "bias": None}
    args[operand] = torch.empty_like(x if operand == "residual" else torch.zeros(3), device="meta")
    rm, rv = args.pop("running_mean"), args.pop("running_var")
    for training in (True, False):
        with pyops.backend(backend), pytest.raises(RuntimeError, match="is not on the expected device cpu"):
            PF.batch_norm(x, rm, rv, training=training, **args)


def test_empty_one_dimensional_input_as_torch():
    """torch's batch_norm takes an empty 1-d input (no channel dimension); so does pyops'."""
    for training in (False, True):
        y = PF.batch_norm(torch.zeros(0), torch.zeros(0), torch.ones(0), training=training)
        assert y.shape == (0,)


def test_residual_shape_and_dtype_are_checked():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="residual"):
        PF.batch_norm(x, None, None, training=True, residual=torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="residual"):
        PF.batch_norm(x, None, None, training=True, residual=torch.randn(4, 3, 2, dtype=torch.float64))


def test_bad_input_is_refused_in_a_subprocess():
    """Every primitive of every backend checks before it launches: a clear error naming the op, never a
    signal."""
    backends = [b for b in pyops.available_backends("cpu") if b != "torch"]
    if "triton" not in backends:
        backends.append("triton")  # the subprocess interprets Triton
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "bad_calls_batch_norm.py")
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, script, *backends], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "all refused" in r.stdout


# ---- modules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,torch_cls,shape",
    [
        (pnn.BatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 3)),
        (pnn.BatchNorm1d, nn.BatchNorm1d, (6, 5)),
        (pnn.BatchNorm1d, nn.BatchNorm1d, (3, 5, 7)),
    ],
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}, {"eps": 1e-3, "momentum": 0.5}],
    ids=["default", "cumulative", "no_affine", "untracked", "eps_momentum"],
)
def test_module_matches_torch(cls, torch_cls, shape, kwargs):
    """Training steps then eval: outputs, gradients, running statistics and num_batches_tracked as torch's."""
    torch.manual_seed(0)
    ours, ref = cls(5, **kwargs).double(), torch_cls(5, **kwargs).double()
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr)
        g = torch.randn_like(yo)
        yo.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad)
        if ref.affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    ours.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_module_interface():
    """Same constructor, buffers, state_dict keys and version, reset_running_stats and repr (plus ours)."""
    ours, ref = pnn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2), nn.BatchNorm2d(4)
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"]
    assert repr(ours) == repr(nn.BatchNorm2d(4))[:-1] + ", activation='leaky_relu', negative_slope=0.2)"
    assert repr(pnn.BatchNorm1d(3)) == repr(nn.BatchNorm1d(3))
    ours.running_mean.fill_(3)
    ours.num_batches_tracked.fill_(7)
    ours.reset_running_stats()
    assert ours.running_mean.eq(0).all() and ours.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.randn(3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        pnn.BatchNorm1d(4)(torch.randn(3, 4, 2, 2))
    # a torch state_dict loads into ours and ours into torch's
    src = nn.BatchNorm2d(4)
    src.running_mean.normal_()
    ours.load_state_dict(src.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.running_mean, src.running_mean)


def test_module_fused_activation_and_residual_channels_last():
    torch.manual_seed(0)
    m = pnn.BatchNorm2d(6, activation="relu")
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = nn.BatchNorm2d(6)
    xr, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    yr = TF.relu(ref(xr) + rr)
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.grad, rr.grad)
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_convert_maps_batch_norms():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5)
    )
    model(torch.randn(2, 3, 6, 6))
    weight = model[1].weight
    converted = pyops.convert(model, inplace=True)  # shares the parameters
    assert type(converted[1]) is pnn.BatchNorm2d and type(converted[5]) is pnn.BatchNorm1d
    assert converted[1].weight is weight
    x = torch.randn(4, 3, 6, 6)
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5)
    )
    ref.load_state_dict(converted.state_dict())
    torch.testing.assert_close(converted(x), ref(x))
    torch.testing.assert_close(converted[1].running_mean, ref[1].running_mean)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a model of these modules: no graph break, the same results,
    gradients and running statistics as eager."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = pnn.BatchNorm2d(4, activation="relu")
            self.bn2 = pnn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.1, memory_efficient=True)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return self.bn2(h, h)

    eager = Block()
    compiled_model = Block()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 3, 5, 5)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye)
        ye.sum().backward()
        yc.sum().backward()
    torch.testing.assert_close(compiled_model.conv.weight.grad, eager.conv.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_model.bn.running_var, eager.bn.running_var)
    torch.testing.assert_close(compiled_model.bn2.num_batches_tracked, eager.bn2.num_batches_tracked)


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_compile_converted_cumulative_average_with_relu(backend):
    """torch.compile(fullgraph=True) of a converted BatchNorm2d(momentum=None) + ReLU in training, under auto
    (small inputs: torch's batch norm, which saves the running statistics for backward) and native: trains,
    and the buffers follow torch's cumulative average."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    ours = pyops.convert(ref)
    assert ours[0].activation == "relu"
    f = torch.compile(ours, fullgraph=True)
    with pyops.backend(backend):
        for step in range(3):
            x = torch.randn(2, 4, 3, 3) + step
            f(x).sum().backward()
            ref(x).sum().backward()
    torch.testing.assert_close(ours[0].running_mean, ref[0].running_mean)
    torch.testing.assert_close(ours[0].running_var, ref[0].running_var)
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad)


def test_compile_dynamic_shapes_and_cumulative_average():
    """dynamic=True over three batch shapes, momentum=None (the cumulative average) included: no graph
    break, eager's results and running statistics."""
    torch.manual_seed(0)

    def model():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), pnn.BatchNorm2d(4, activation="relu"), pnn.BatchNorm2d(4, momentum=None)
        )

    compiled_model, eager = model(), model()
    eager.load_state_dict(compiled_model.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (2, 3, 5):
        x = torch.randn(n, 3, 5 + n, 5)
        yc, ye = compiled(x), eager(x)
        torch.testing.assert_close(yc, ye)
        yc.sum().backward()
        ye.sum().backward()
    for i in (1, 2):
        torch.testing.assert_close(compiled_model[i].running_var, eager[i].running_var)
        torch.testing.assert_close(compiled_model[i].running_mean, eager[i].running_mean)
    torch.testing.assert_close(compiled_model[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-5)


# ---- SyncBatchNorm ---------------------------------------------------------------------------------------
_SYNC = r"""
import os, sys, torch, torch.distributed as dist
import pyops.nn as pnn
rank, world, port, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
torch.manual_seed(0)
x = torch.randn(7, 4, 3, 3, dtype=torch.float64) * 2 + 1
r = torch.randn(7, 4, 3, 3, dtype=torch.float64)
g = torch.randn(7, 4, 3, 3, dtype=torch.float64)
lo, hi = (0, 3) if rank == 0 else (3, 7)  # different batch sizes per rank
model = torch.nn.Sequential(pnn.BatchNorm2d(4, activation="elu", alpha=0.5)).double()
model = pnn.SyncBatchNorm.convert_sync_batchnorm(model)
assert type(model[0]) is pnn.SyncBatchNorm and model[0].activation == "elu"
with torch.no_grad():
    model[0].weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
xs, rs = x[lo:hi].clone().requires_grad_(), r[lo:hi].clone().requires_grad_()
for _ in range(2):
    y = model[0](xs, rs)
    y.backward(g[lo:hi])
gw, gb = model[0].weight.grad.clone(), model[0].bias.grad.clone()
dist.all_reduce(gw)
dist.all_reduce(gb)
torch.save({"y": y.detach(), "gx": xs.grad, "gr": rs.grad, "gw": gw, "gb": gb, "rm": model[0].running_mean,
            "rv": model[0].running_var, "n": model[0].num_batches_tracked}, out)
dist.destroy_process_group()
"""


def _two_ranks(script, args_of):
    """Run `script RANK *args_of(RANK)` as ranks 0 and 1 at once; each must exit 0. Their (stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), *args_of(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return results


def test_sync_batch_norm_two_gloo_processes(tmp_path):
    """Two ranks (3 and 4 samples) give the outputs, gradients and running statistics of one process that
    sees the whole batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "sync.py"
    script.write_text(_SYNC)
    _two_ranks(script, lambda rank: [str(port), str(tmp_path / f"r{rank}.pt")])
    parts = [torch.load(tmp_path / f"r{rank}.pt") for rank in range(2)]
    torch.manual_seed(0)
    x = torch.randn(7, 4, 3, 3, dtype=torch.float64) * 2 + 1
    r = torch.randn(7, 4, 3, 3, dtype=torch.float64)
    g = torch.randn(7, 4, 3, 3, dtype=torch.float64)
    one = pnn.BatchNorm2d(4, activation="elu", alpha=0.5).double()
    with torch.no_grad():
        one.weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    for _ in range(2):
        y = one(xs, rs)
        y.backward(g)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach())
    torch.testing.assert_close(torch.cat([p["gx"] for p in parts]), xs.grad)
    torch.testing.assert_close(torch.cat([p["gr"] for p in parts]), rs.grad)
    for p in parts:
        torch.testing.assert_close(p["gw"], one.weight.grad)
        torch.testing.assert_close(p["gb"], one.bias.grad)
        torch.testing.assert_close(p["rm"], one.running_mean)
        torch.testing.assert_close(p["rv"], one.running_var)
        assert p["n"].item() == 2


_SYNC_ROUNDS = r"""
import os, sys, weakref, torch, torch.distributed as dist
import pyops.nn as pnn
rank, ports = int(sys.argv[1]), sys.argv[2].split(",")


def threads():  # the process's threads, C++ ones included (Linux)
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


torch.manual_seed(0)
x = torch.randn(4, 2, 2, 2, dtype=torch.float64)[2 * rank : 2 * rank + 2]
g = torch.randn_like(x)
model = pnn.SyncBatchNorm(2, activation="relu").double()
graphs = []  # every round's output and its graph live on past the round's group, up to the exit
for port in ports:
    before = threads()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    y = model(x.clone().requires_grad_())
    y.backward(g, retain_graph=True)
    grad = model.weight.grad.clone()
    dist.all_reduce(grad)
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    graphs.append(y)
    assert group() is None, "the process group outlived destroy_process_group()"
    assert threads() == before, f"{threads()} threads after destroy_process_group(), {before} before init"
try:
    graphs[0].backward(g)
except RuntimeError as e:
    assert "pyops.nn.SyncBatchNorm: backward needs the process group" in str(e), e
else:
    raise AssertionError("a backward after destroy_process_group() ran")
print("rounds", len(graphs))
"""


def test_sync_batch_norm_frees_its_process_group(tmp_path):
    """Ten rounds of init, forward, backward, all_reduce and destroy_process_group() in each of two gloo
    processes whose outputs outlive their groups: the graph holds no process group (the group and its
    threads go at destroy_process_group(), not at interpreter shutdown, where gloo's worker threads used
    to abort the process with "terminate called without an active exception"), and both exit cleanly."""
    import socket

    sockets = [socket.socket() for _ in range(10)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = ",".join(str(s.getsockname()[1]) for s in sockets)
    for s in sockets:
        s.close()
    script = tmp_path / "rounds.py"
    script.write_text(_SYNC_ROUNDS)
    for out, err in _two_ranks(script, lambda rank: [ports]):
        assert "terminate called" not in err, err[-3000:]
        assert out.split() == ["rounds", "10"], out


def test_sync_batch_norm_without_process_group_is_batch_norm():
    m = pnn.SyncBatchNorm(3, activation="relu")
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(m(x), TF.relu(TF.batch_norm(x, None, None, training=True)))


def test_sync_batch_norm_backward_runs_the_forward_backend(monkeypatch):
    """The backend is fixed at forward: a backward under another selection (autograd's worker thread on
    a GPU) runs the forward's backward primitives, the C++ node's, and gives pyops.batch_norm's gradient."""
    import torch.distributed as dist

    from pyops.nn.batch_norm import _SyncBatchNormFn

    calls = []
    for backend in ("native", "triton"):
        for name in ("batch_norm_bwd_reduce", "batch_norm_bwd_elemt"):
            f = PRIMITIVES[backend][name]
            monkeypatch.setitem(
                PRIMITIVES[backend], name, lambda *a, f=f, key=(backend, name): (calls.append(key), f(*a))[1]
            )
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pyops.backend("triton"):
            out = _SyncBatchNormFn.apply(x, w, b, None, None, None, 1e-5, 0.1, dist.group.WORLD, 1, ("elu", 1.0, False))
        with pyops.backend("native"):
            grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    finally:
        dist.destroy_process_group()
    assert calls == [("triton", "batch_norm_bwd_reduce"), ("triton", "batch_norm_bwd_elemt")]
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with pyops.backend("native"):
        ref = PF.batch_norm(xs, None, None, ws, bs, training=True, activation="elu")
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (xs, ws, bs), torch.ones_like(ref))):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = torch.randn(8, 16, 9, 9)
    for cl in (False, True):
        xc = x.contiguous(memory_format=torch.channels_last) if cl else x
        for backend in ("native", "triton"):
            with pyops.backend(backend):
                y = PF.batch_norm(xc.cuda(), None, None, training=True, activation="relu")
            torch.testing.assert_close(y.cpu(), batch_norm_reference(x, None, None, training=True, activation="relu"))


def test_fused_backward_equals_the_two_passes():
    """The CPU's channel-by-channel backward gives the two-kernel path's bits (same sums, coefficients
    derived with the same operations in the same order)."""
    P = PRIMITIVES["native"]
    x = torch.randn(4, 5, 6, 7)
    g, y = torch.randn_like(x), torch.rand_like(x)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    mean, var = P["batch_norm_stats"](x)
    invstd = (var + 1e-5).rsqrt()
    gi, sum_dz, sum_dz_xhat, dr = P["batch_norm_bwd"](g, x, y, None, mean, invstd, w, b, "relu", 0.0, True)
    s1, s2, dr2 = P["batch_norm_bwd_reduce"](g, x, y, None, mean, invstd, w, b, "relu", 0.0, True)
    n = x.numel() // 5
    gi2 = P["batch_norm_bwd_elemt"](g, x, y, None, mean, invstd, w, b, s1 / n, s2 / n, "relu", 0.0)
    assert torch.equal(sum_dz, s1) and torch.equal(sum_dz_xhat, s2) and torch.equal(dr, dr2)
    assert torch.equal(gi, gi2)

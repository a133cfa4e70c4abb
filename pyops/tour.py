"""`python -m pyops tour` and `python -m pyops check`: the ops and optimizers of the spec table
(pyops.testing) through every backend available here, against the float64 torch oracle.

tour: one brief pass over every family on a batch of the digits images (each activation, batch_norm plain
and fused with a residual and ReLU, conv2d, the regression losses, cross_entropy, each optimizer), with the
error against the oracle and the time of a forward + backward (of an optimizer step).
check: every entry of the spec table, on its own samples, in every dtype it lists.
"""

import dataclasses
import statistics
import time
import warnings

import torch
import torch.nn.functional as TF

from . import functional as F
from . import testing
from .backend import available_backends, backend
from .ops.conv import conv2d_reference


def default_device(device=None):
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def digits_batch(device):
    """The 1797 8x8 digits images bundled with scikit-learn, standardised, as [N, 64], and their labels;
    a random batch of the same shape where scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        source = "scikit-learn digits"
    except ImportError:
        x, labels = torch.randn(1797, 64), torch.randint(0, 10, (1797,))
        source = "random (scikit-learn not installed)"
    x = (x - x.mean()) / x.std()
    return x.to(device), labels.to(device), source


def _median_ms(fn, device, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ---- tour ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Given:
    """A given tensor as pyops.testing's samples are drawn (rounded to the dtype asked for, on the device),
    and a random incoming gradient."""

    x: torch.Tensor

    def make(self, dtype, device, generator=None):
        return self.x.to(device, dtype, copy=True)

    def grad(self, shape, dtype, device, generator=None):
        return torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype).to(device)


def _fwd_bwd(fn, args, kwargs, g=None):
    """A closure computing fn(*args, **kwargs) and the gradients of the tensor arguments that require one
    (for incoming gradient g; a scalar output's own 1 by default)."""
    leaves = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]

    def step():
        torch.autograd.grad(fn(*args, **kwargs), leaves, g)

    return step


def _activation(spec, x):
    def run(dtype, generator):
        xd, kwargs = x.to(dtype), spec.kwargs_for(x.shape)
        g = _Given(x).grad(spec.output_shape(x.shape, kwargs), dtype, x.device, generator)
        results = testing.compare_op(spec.fn, spec.reference, kwargs, xd, g)
        return results, lambda: testing.forward_backward(spec.fn, xd, kwargs, g)

    return "activation", spec.name, run


def _batch_norm(spec, x):
    """The digits' 64 pixels as the channels (BatchNorm1d after an MLP's input)."""

    def run(dtype, generator):
        sample = _Given(x)
        results = testing.check_batch_norm(spec, sample, dtype, x.device, generator)
        xd, rm, rv, w, b, r, g = testing.batch_norm_inputs(spec, sample, dtype, x.device, generator)
        args = [xd.requires_grad_(), rm, rv, w.requires_grad_(), b.requires_grad_()]
        kwargs = {**spec.kwargs, "residual": None if r is None else r.requires_grad_()}
        return results, _fwd_bwd(F.batch_norm, args, kwargs, g)

    return "batch_norm", spec.name, run


def _conv(images):
    """A 3x3 convolution of the 8x8 images to 8 channels with a fused ReLU (the CNN's first layer), its
    output and the gradients of input, weight and bias against the float64 oracle."""
    kwargs = {"padding": 1, "activation": "relu"}

    def run(dtype, generator):
        device = images.device
        w = torch.randn(8, 1, 3, 3, dtype=torch.float64, generator=generator).to(device, dtype) / 3
        b = torch.randn(8, dtype=torch.float64, generator=generator).to(device, dtype)
        x = images.to(dtype)
        g = _Given(x).grad((x.shape[0], 8, *x.shape[2:]), dtype, device, generator)

        def forward(fn, cast):
            leaves = [cast(t).detach().requires_grad_() for t in (x, w, b)]
            y = fn(*leaves, **kwargs)
            return y, torch.autograd.grad(y, leaves, cast(g))

        y, grads = forward(F.conv2d, lambda t: t)
        y64, grads64 = forward(conv2d_reference, lambda t: t.double())
        yt, gradst = forward(conv2d_reference, lambda t: t)
        # terms each result sums: an output w's taps, an input gradient every output channel's taps, the
        # weight and bias gradients every output position
        per_channel = y.numel() // w.shape[0]
        reduced = {"input": w.shape[0] * w.shape[2] * w.shape[3], "weight": per_channel, "bias": per_channel}
        results = [testing.compare(y, y64, dtype, yt, reduced=w[0].numel())]
        for (name, n), a, e, t in zip(reduced.items(), grads, grads64, gradst):
            results.append(testing.compare(a, e, dtype, t, what=f"{name} gradient", reduced=n))
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        return results, _fwd_bwd(F.conv2d, leaves, kwargs, g)

    return "conv", "conv2d", run


def _loss(spec, x, target):
    """A loss of the digits against `target` with the mean reduction, through testing.compare_loss."""

    def run(dtype, generator):
        xd = x.to(dtype)
        td = target.to(dtype) if target.is_floating_point() else target
        kwargs = {**spec.kwargs, "reduction": "mean"}
        results = testing.compare_loss(spec, xd, td, kwargs, generator)
        return results, _fwd_bwd(spec.fn, [xd.detach().requires_grad_(), td], kwargs)

    return "loss", spec.name, run


def _tour_cases(x, labels):
    """(family, name, run) per row: run(dtype, generator) gives the Comparisons and a closure to time.
    Regression losses fit each image to its class's mean image; cross_entropy scores the classes by the
    distance to their mean image (a nearest-mean classifier)."""
    means = torch.stack([x[labels == c].mean(0) if (labels == c).any() else x.mean(0) for c in range(10)])
    logits = -torch.cdist(x, means).square() / x.shape[1]
    cases = [_activation(spec, x) for spec in testing.ACTIVATIONS.values()]
    cases += [_batch_norm(testing.BATCH_NORMS[name], x) for name in ("batch_norm", "bn_add_relu")]
    cases.append(_conv(x.reshape(-1, 1, 8, 8)))
    for spec in testing.LOSSES.values():
        cases.append(_loss(spec, logits, labels) if spec.name == "cross_entropy" else _loss(spec, x, means[labels]))
    return cases


def _tour_backends(device):
    """The backends the tour runs on `device`: all available but Triton interpreted on the CPU (a test
    vehicle, minutes on a batch this size; `check` runs it on small samples)."""
    return [b for b in available_backends(device) if not (b == "triton" and device == "cpu")]


def _op_rows(x, labels, dtypes):
    """Rows (family, op, dtype, backend, output error, gradient error, ok, fwd+bwd ms): the largest error
    relative to max |oracle| among the outputs (running statistics included) and among the gradients."""
    device = x.device.type
    rows = []
    for family, name, run in _tour_cases(x, labels):
        for dtype in dtypes:
            for b in _tour_backends(device):
                with backend(b):
                    results, step = run(dtype, torch.Generator().manual_seed(0))
                    ms = _median_ms(step, device)
                grads = [r.error for r in results if "grad" in r.what]
                outs = [r.error for r in results if "grad" not in r.what]
                ok = all(r.ok for r in results)
                rows.append((family, name, _dtype_name(dtype), b, max(outs), max(grads, default=0.0), ok, ms))
    return rows


def _train(cls, config, x, labels, steps, dtype):
    """A linear classifier of x trained from zeros for `steps` steps: its parameters and the median ms
    of a step."""
    w = torch.zeros(10, x.shape[1], dtype=dtype, device=x.device, requires_grad=True)
    b = torch.zeros(10, dtype=dtype, device=x.device, requires_grad=True)
    opt = cls([w, b], **config)
    times = []
    for _ in range(steps):
        opt.zero_grad()
        TF.cross_entropy(x.to(dtype) @ w.t() + b, labels).backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return [w, b], statistics.median(times) * 1e3


def _optimizer_rows(x, labels, dtype, steps=10):
    """Rows (family, optimizer, dtype, backend, weight error, bias error, ok, step ms): each optimizer (its
    first configuration) trains a linear classifier, against torch's for-loop trained in float64."""
    device = x.device.type
    rows = []
    for spec in testing.OPTIMIZERS.values():
        config = spec.configs[0]
        oracle, _ = _train(spec.reference, {**config, "foreach": False}, x.double(), labels, steps, torch.float64)
        theirs, _ = _train(spec.reference, {**config, "foreach": False}, x, labels, steps, dtype)
        for b in _tour_backends(device):
            with backend(b):
                ours, ms = _train(spec.cls, config, x, labels, steps, dtype)
            w, bias = (testing.compare(p, e, dtype, t, scale=spec.scale) for p, e, t in zip(ours, oracle, theirs))
            rows.append(("optim", spec.name, _dtype_name(dtype), b, w.error, bias.error, w.ok and bias.ok, ms))
    return rows


def _print_rows(rows, title, columns):
    print(title)
    head = (
        f"{'family':<10} {columns[0]:<13} {'dtype':<9} {'backend':<8} {columns[1]:>12} {columns[2]:>12}  "
        f"{'ok':<4} {columns[3]:>10}"
    )
    print(head)
    print("-" * len(head))
    for family, name, dtype, b, e1, e2, ok, ms in rows:
        print(f"{family:<10} {name:<13} {dtype:<9} {b:<8} {e1:12.2e} {e2:12.2e}  {'yes' if ok else 'NO':<4} {ms:10.3f}")


def tour(device=None):
    """Every family once on the digits, on every backend available on `device`; returns whether every row
    is within tolerance of the oracle."""
    device = default_device(device)
    x, labels, source = digits_batch(device)
    torch.manual_seed(0)
    rows = _op_rows(x, labels, [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32])
    _print_rows(
        rows,
        f"pyops tour: {source}, batch {tuple(x.shape)}, on {device}; errors are relative to the float64 torch "
        "oracle (out: outputs and running statistics; grad: every gradient), time is forward + backward (median)",
        ("op", "max err out", "max err grad", "fwd+bwd ms"),
    )
    print()
    optim_rows = _optimizer_rows(x, labels, torch.float32)
    _print_rows(
        optim_rows,
        "optimizers: a linear classifier of the digits trained for 10 steps from zeros; errors are relative "
        "to torch's for-loop in float64, time is one step (median)",
        ("optimizer", "err weight", "err bias", "step ms"),
    )
    if "triton" in available_backends(device) and "triton" not in _tour_backends(device):
        print("\ntriton: interpreted on the CPU here, not toured (python -m pyops check runs it on small samples)")
    return all(r[6] for r in rows + optim_rows)


# ---- check --------------------------------------------------------------------------------------------


def check(device=None, families=None):
    """Every spec entry of every family (or of `families`), on every backend available on `device` and in
    each dtype the entry lists (spec.dtypes), against the float64 oracle: a row per (entry, dtype, backend)
    with the worst case of its samples; the failures listed after. Returns whether all passed."""
    device = default_device(device)
    print(
        f"pyops check on {device}: every op and optimizer, on every backend and dtype, against the float64 oracle; "
        "float64 rows of ops include torch.autograd.gradcheck (err: largest error relative to max |oracle|; "
        "err/tol: largest error over its bound, <= 1 passes)"
    )
    head = f"{'family':<10} {'op':<11} {'dtype':<9} {'backend':<8} {'results':>7} {'max err':>9} {'err/tol':>8}  ok"
    print(head)
    print("-" * len(head))
    rows = failures = 0
    messages = []
    for family in families or testing.FAMILIES:
        for spec in testing.SPECS[family].values():
            for dtype in spec.dtypes:
                for b in available_backends(device):
                    if testing.unreliable(device, b, dtype):
                        continue
                    with backend(b), warnings.catch_warnings():
                        # the Triton interpreter evaluates with numpy, which warns where exp overflows to inf
                        # as intended
                        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
                        results = spec.check(dtype, device)
                    bad = [r for r in results if not r.ok]
                    rows += 1
                    failures += bool(bad)
                    messages += [f"{spec.name} {_dtype_name(dtype)} {b}: {r.message}" for r in bad]
                    print(
                        f"{family:<10} {spec.name:<11} {_dtype_name(dtype):<9} {b:<8} {len(results):>7} "
                        f"{max(r.error for r in results):9.2e} {max(r.worst for r in results):8.3f}  "
                        f"{'NO' if bad else 'yes'}"
                    )
    for m in messages[:20]:
        print(m)
    if len(messages) > 20:
        print(f"... and {len(messages) - 20} more")
    print(f"{rows - failures} passed, {failures} failed")
    return not failures

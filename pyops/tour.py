"""`python -m pyops demo` and `check`: the ops and optimizers of the spec table (pyops.testing) through
every backend available here, against the float64 torch oracle."""

import statistics
import time
import warnings

import torch
import torch.nn.functional as TF

from . import testing
from .backend import available_backends, backend


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


# ---- demo ---------------------------------------------------------------------------------------------


def _demo_ops(x, dtypes):
    """Rows (op, dtype, backend, output error, gradient error, ok, fwd+bwd ms) of every activation on x."""
    device = x.device.type
    rows = []
    for spec in testing.ACTIVATIONS.values():
        for dtype in dtypes:
            xd, kwargs = x.to(dtype), spec.kwargs_for(x.shape)
            g = torch.randn(spec.output_shape(x.shape, kwargs), device=x.device).to(dtype)
            for b in available_backends(device):
                if testing.unreliable(device, b, dtype):
                    continue
                with backend(b):
                    out, grad = testing.compare_op(spec.fn, spec.reference, kwargs, xd, g)
                    ms = _median_ms(
                        lambda f=spec.fn, x=xd, kw=kwargs, g=g: testing.forward_backward(f, x, kw, g), device
                    )
                rows.append((spec.name, _dtype_name(dtype), b, out.error, grad.error, out.ok and grad.ok, ms))
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


def _demo_optimizers(x, labels, dtype, steps=10):
    """Rows (optimizer, dtype, backend, weight error, bias error, ok, step ms): each optimizer (its first
    configuration) trains a linear classifier, against torch's for-loop trained in float64."""
    device = x.device.type
    rows = []
    for spec in testing.OPTIMIZERS.values():
        config = spec.configs[0]
        oracle, _ = _train(spec.reference, {**config, "foreach": False}, x.double(), labels, steps, torch.float64)
        theirs, _ = _train(spec.reference, {**config, "foreach": False}, x, labels, steps, dtype)
        for b in available_backends(device):
            if testing.unreliable(device, b, dtype):
                continue
            with backend(b):
                ours, ms = _train(spec.cls, config, x, labels, steps, dtype)
            w, bias = (testing.compare(p, e, dtype, t, scale=spec.scale) for p, e, t in zip(ours, oracle, theirs))
            rows.append((spec.name, _dtype_name(dtype), b, w.error, bias.error, w.ok and bias.ok, ms))
    return rows


def _print_demo(rows, title, columns):
    print(title)
    head = f"{columns[0]:<11} {'dtype':<9} {'backend':<8} {columns[1]:>11} {columns[2]:>12}  {'ok':<4} {columns[3]:>10}"
    print(head)
    print("-" * len(head))
    for name, dtype, b, e1, e2, ok, ms in rows:
        print(f"{name:<11} {dtype:<9} {b:<8} {e1:11.2e} {e2:12.2e}  {'yes' if ok else 'NO':<4} {ms:10.3f}")


def demo(device=None):
    device = default_device(device)
    x, labels, source = digits_batch(device)
    torch.manual_seed(0)
    rows = _demo_ops(x, [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32])
    _print_demo(
        rows,
        f"pyops demo: {source}, batch {tuple(x.shape)}, on {device}; errors are relative to the "
        "float64 torch oracle, time is forward + backward (median)",
        ("op", "max err out", "max err grad", "fwd+bwd ms"),
    )
    print()
    optim_rows = _demo_optimizers(x, labels, torch.float32)
    _print_demo(
        optim_rows,
        "optimizers: a linear classifier of the digits trained for 10 steps from zeros; errors "
        "are relative to torch's for-loop in float64, time is one step (median)",
        ("optimizer", "err weight", "err bias", "step ms"),
    )
    return all(r[5] for r in rows + optim_rows)


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

"""`python -m pyops demo` and `check`: every op through every backend available here, against
the float64 torch oracle, with the time each backend takes (forward + backward)."""
import statistics
import time

import torch
import torch.nn.functional as TF

from . import functional as F
from .backend import available_backends, backend
from .ops.activation import maxout_reference

# name -> (pyops op, torch reference, kwargs)
OPS = {
    "relu": (F.relu, TF.relu, {}),
    "leaky_relu": (F.leaky_relu, TF.leaky_relu, {"negative_slope": 0.1}),
    "elu": (F.elu, TF.elu, {"alpha": 1.0}),
    "sigmoid": (F.sigmoid, torch.sigmoid, {}),
    "tanh": (F.tanh, torch.tanh, {}),
    "maxout": (F.maxout, maxout_reference, {"pieces": 4, "dim": 1}),
}
# The largest error each dtype may show against the float64 oracle (relative to max |oracle|).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def digits_batch(device):
    """The 1797 8x8 digits images bundled with scikit-learn, standardised, as [N, 64]; a random
    batch of the same shape where scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits

        x = torch.as_tensor(load_digits().data, dtype=torch.float32)
        source = "scikit-learn digits"
    except ImportError:
        x = torch.randn(1797, 64)
        source = "random (scikit-learn not installed)"
    x = (x - x.mean()) / x.std()
    return x.to(device), source


def _run(op, kw, x, g):
    xr = x.detach().clone().requires_grad_()
    y = op(xr, **kw)
    (gx,) = torch.autograd.grad(y, xr, g)
    return y, gx


def _rel_err(a, e):
    return float((a.detach().double() - e.detach()).abs().max() / e.detach().abs().max().clamp_min(1e-30))


def _time(fn, device, repeats=15):
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


def compare(x, dtypes, timed=True):
    """Rows: (op, dtype, backend, output error, gradient error, ok, ms)."""
    device = x.device.type
    rows = []
    for name, (op, ref, kw) in OPS.items():
        for dtype in dtypes:
            xd = x.to(dtype)
            g = torch.randn(ref(xd.double(), **kw).shape, device=x.device).to(dtype)
            y64, g64 = _run(ref, kw, xd.double(), g.double())
            for b in available_backends(device):
                if b == "triton" and device == "cpu" and dtype == torch.bfloat16:
                    continue  # bfloat16 arithmetic is unreliable in the Triton interpreter
                with backend(b):
                    y, gx = _run(op, kw, xd, g)
                    ms = _time(lambda: _run(op, kw, xd, g), device) if timed else None
                ey, eg = _rel_err(y, y64), _rel_err(gx, g64)
                rows.append((name, str(dtype).replace("torch.", ""), b, ey, eg, max(ey, eg) <= TOL[dtype], ms))
    return rows


def _print(rows, title):
    print(title)
    head = f"{'op':<11} {'dtype':<9} {'backend':<8} {'max err out':>11} {'max err grad':>12}  {'ok':<4} {'fwd+bwd ms':>10}"
    print(head)
    print("-" * len(head))
    for name, dtype, b, ey, eg, ok, ms in rows:
        t = f"{ms:10.3f}" if ms is not None else ""
        print(f"{name:<11} {dtype:<9} {b:<8} {ey:11.2e} {eg:12.2e}  {'yes' if ok else 'NO':<4} {t}")


def demo(device=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    x, source = digits_batch(device)
    torch.manual_seed(0)
    rows = compare(x, [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32])
    _print(rows, f"pyops demo: {source}, batch {tuple(x.shape)}, on {device}; errors are relative to "
                 "the float64 torch oracle, time is forward + backward (median)")
    return all(r[5] for r in rows)


def check(device=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(64, 96, device=device) * 3
    rows = compare(x, [torch.float64, torch.float32, torch.float16, torch.bfloat16], timed=False)
    _print(rows, f"pyops check on {device}: every op, backend and dtype against the float64 oracle")
    bad = [r for r in rows if not r[5]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return not bad

"""Loss benchmark cases: forward+backward (and the forward alone) of each loss of the spec table
(pyops.testing.LOSSES), mean reduction, against torch eager and torch.compile of torch's function.

CPU: the regression losses at 4M float32 elements (1M and 16M too without --quick); cross entropy at
(4096, 1000) and (256, 32000) float32 logits with class-index targets. GPU: the same, plus bfloat16.
Peak memory of one forward+backward is measured on the CPU too (the profiler's allocation events).
Minimum bytes: forward+backward reads input (and target) once and writes the input's gradient once;
the forward alone reads them once.
An overhead case: 64 elements, forward+backward, one thread, against torch eager.
"""

import torch

from pyops.testing import LOSSES

from .harness import Case
from .harness import print_table as _print_table

REGRESSION = ("mse_loss", "l1_loss", "huber_loss", "rmse_loss")
ROW = 1024
CE_SHAPES = ((4096, 1000), (256, 32000))
COMPILE_AT = {"cpu": 4 << 20, "cuda": 1 << 26}
OVERHEAD_CALLS = 100


def _targets(op, shape, device, dtype):
    if op == "cross_entropy":
        return torch.randint(0, shape[1], (shape[0],), device=device)
    return torch.randn(shape, device=device, dtype=dtype)


def _case(op, mode, shape, dtype, device, overhead=False):
    spec = LOSSES[op]
    kw = {**spec.kwargs, "reduction": "mean"}
    compiled = {}
    n = shape[0] * shape[1]
    calls = OVERHEAD_CALLS if overhead else 1

    def fn(impl):
        if impl == "pyops":
            return lambda x, t: spec.fn(x, t, **kw)
        if impl == "eager":
            return lambda x, t: spec.reference(x, t, **kw)
        if "fn" not in compiled:
            torch._dynamo.reset()
            compiled["fn"] = torch.compile(lambda x, t: spec.reference(x, t, **kw), dynamic=False)
        return compiled["fn"]

    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=mode != "fwd")
        return x, _targets(op, shape, device, dtype)

    def iteration(impl):
        f = fn(impl)
        if mode == "fwd":
            return lambda x, t: [f(x, t) for _ in range(calls)]

        def run(x, t):
            for _ in range(calls):
                torch.autograd.grad(f(x, t), x)

        return run

    es = dtype.itemsize
    target_bytes = 8 * shape[0] if op == "cross_entropy" else n * es
    min_bytes = n * es + target_bytes + (n * es if mode != "fwd" else 0)
    return Case(
        "loss",
        op + (" (overhead)" if overhead else ""),
        mode,
        shape,
        dtype,
        device,
        0 if overhead else min_bytes,
        make_inputs,
        iteration,
        forward=None if mode == "fwd" or overhead else (lambda impl: lambda x, t: fn(impl)(x, t)),
        compile_baseline=not overhead and dtype == torch.float32 and (op == "cross_entropy" or n == COMPILE_AT[device]),
        references=[("torch eager", "eager")] if overhead else None,
        calls=calls,
        threads=1 if overhead and device == "cpu" else None,
    )


def cases(device, quick=False):
    sizes = [4 << 20] if quick else [1 << 20, 4 << 20, 16 << 20]
    if device == "cuda":
        sizes = [1 << 26] if quick else [1 << 20, 1 << 24, 1 << 26]
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for n in sizes:
            for op in REGRESSION:
                for mode in ("fwd+bwd",) if quick else ("fwd", "fwd+bwd"):
                    yield _case(op, mode, (n // ROW, ROW), dtype, device)
        for shape in CE_SHAPES:
            for mode in ("fwd+bwd",) if quick else ("fwd", "fwd+bwd"):
                yield _case("cross_entropy", mode, shape, dtype, device)
    for op in ("mse_loss", "cross_entropy"):
        yield _case(op, "fwd+bwd", (1, 64), torch.float32, device, overhead=True)


def cpu_peak_mb(fn, inputs):
    """Peak bytes (MB) allocated while fn(*inputs) runs, from the CPU profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*inputs)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 1e6


def print_table(results, file=None):
    """The harness's table, with the peak memory of one forward+backward filled in on the CPU."""
    import pyops

    for r in results:
        c = r.case
        if c.device == "cpu" and c.mode == "fwd+bwd" and c.calls == 1 and r.peak_mb is None and r.backend != "compile":
            inputs = c.make_inputs()
            impl = "eager" if r.backend in ("torch eager", "torch.compile") else "pyops"
            if r.backend == "torch.compile":
                continue
            with pyops.backend(r.backend if impl == "pyops" else "torch"):
                r.peak_mb = cpu_peak_mb(c.iteration(impl), inputs)
    _print_table(results, file=file)

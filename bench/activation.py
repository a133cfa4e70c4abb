"""Activation benchmark cases: forward, and forward+backward, of each op of the spec table
(pyops.testing.ACTIVATIONS), with its keyword arguments there.

CPU: float32 at 1M, 4M and 16M elements. GPU: float32 and bfloat16 at 1M, 16M and 64M.
--quick keeps the size the targets name: 4M on CPU, 64M on GPU.
Minimum bytes: forward reads x and writes y; backward reads g and what was saved (a bit per
element for relu/leaky_relu, the output or input for the rest, uint8 indices for maxout) and writes dx.
"""

import math

import torch

from pyops.testing import ACTIVATIONS

from .harness import Case

ROW = 1024  # inputs are [n / ROW, ROW]: ops with a dim act along the rows


def _min_bytes(spec, mode, shape, kwargs, es):
    n, m = math.prod(shape), math.prod(spec.output_shape(shape, kwargs))
    fwd = (n + m) * es
    return fwd if mode == "fwd" else fwd + (m + n) * es + spec.saved_bytes(n, m, es)


# torch.compile baselines at the size the targets name, float32 (each compile costs seconds, and
# bench/gpu_check.sh has minutes).
COMPILE_AT = {"cpu": 4 << 20, "cuda": 1 << 26}


def _case(op, mode, n, dtype, device):
    spec = ACTIVATIONS[op]
    shape = (n // ROW, ROW)
    kw = spec.kwargs_for(shape)
    compiled = {}

    def fn(impl):
        if impl == "pyops":
            return lambda x: spec.fn(x, **kw)
        if impl == "eager":
            return lambda x: spec.reference(x, **kw)
        if "fn" not in compiled:
            torch._dynamo.reset()  # every case compiles afresh (one code object serves them all)
            compiled["fn"] = torch.compile(lambda x: spec.reference(x, **kw), dynamic=False)
        return compiled["fn"]

    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=mode != "fwd")
        return x, torch.randn(spec.output_shape(shape, kw), device=device, dtype=dtype)

    def iteration(impl):
        f = fn(impl)
        if mode == "fwd":
            return lambda x, g: f(x)
        return lambda x, g: torch.autograd.grad(f(x), x, g)

    def forward(impl):
        return lambda x, g: fn(impl)(x)

    return Case(
        "activation",
        op,
        mode,
        shape,
        dtype,
        device,
        _min_bytes(spec, mode, shape, kw, dtype.itemsize),
        make_inputs,
        iteration,
        forward=None if mode == "fwd" else forward,
        compile_baseline=n == COMPILE_AT.get(device) and dtype == torch.float32,
    )


def cases(device, quick=False):
    if device == "cpu":
        sizes, dtypes = ([4 << 20] if quick else [1 << 20, 4 << 20, 16 << 20]), [torch.float32]
    else:
        sizes, dtypes = ([1 << 26] if quick else [1 << 20, 1 << 24, 1 << 26]), [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for n in sizes:
            for op in ACTIVATIONS:
                for mode in ("fwd", "fwd+bwd"):
                    yield _case(op, mode, n, dtype, device)

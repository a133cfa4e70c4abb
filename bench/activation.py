"""Activation benchmark cases: forward, and forward+backward, of each op.

CPU: float32 at 1M, 4M and 16M elements. GPU: float32 and bfloat16 at 1M, 16M and 64M.
--quick keeps the size the targets name: 4M on CPU, 64M on GPU.
Minimum bytes: forward reads x and writes y; backward reads g and what was saved (a bit per
element for relu/leaky_relu, the output for the rest) and writes dx.
"""
import torch
import torch.nn.functional as TF

import pyops.functional as PF
from pyops.ops.activation import maxout_reference

from .harness import Case

PIECES = 4
OPS = {
    "relu": (PF.relu, TF.relu, {}),
    "leaky_relu": (PF.leaky_relu, TF.leaky_relu, {"negative_slope": 0.01}),
    "elu": (PF.elu, TF.elu, {}),
    "sigmoid": (PF.sigmoid, torch.sigmoid, {}),
    "tanh": (PF.tanh, torch.tanh, {}),
    "maxout": (PF.maxout, maxout_reference, {"pieces": PIECES, "dim": 1}),
}


def _min_bytes(op, mode, n, es):
    if op == "maxout":  # reads n, writes n / pieces (+ uint8 indices to save)
        fwd = n * es + n // PIECES * es
        return fwd if mode == "fwd" else fwd + n // PIECES * (1 + es) + n * es
    fwd = 2 * n * es
    saved = (n + 7) // 8 if op in ("relu", "leaky_relu") else n * es
    return fwd if mode == "fwd" else fwd + 2 * n * es + saved


# torch.compile baselines at the size the targets name, float32 (each compile costs seconds, and
# bench/gpu_check.sh has minutes).
COMPILE_AT = {"cpu": 4 << 20, "cuda": 1 << 26}


def _case(op, mode, n, dtype, device):
    pyops_fn, ref_fn, kw = OPS[op]
    shape = (n // 1024, 1024)
    compiled = {}

    def fn(impl):
        if impl == "pyops":
            return lambda x: pyops_fn(x, **kw)
        if impl == "eager":
            return lambda x: ref_fn(x, **kw)
        if "fn" not in compiled:
            torch._dynamo.reset()  # every case compiles afresh (one code object serves them all)
            compiled["fn"] = torch.compile(lambda x: ref_fn(x, **kw), dynamic=False)
        return compiled["fn"]

    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=mode != "fwd")
        out_shape = (shape[0], shape[1] // PIECES) if op == "maxout" else shape
        return x, torch.randn(out_shape, device=device, dtype=dtype)

    def iteration(impl):
        f = fn(impl)
        if mode == "fwd":
            return lambda x, g: f(x)
        return lambda x, g: torch.autograd.grad(f(x), x, g)

    return Case("activation", op, mode, shape, dtype, device, _min_bytes(op, mode, n, dtype.itemsize),
                make_inputs, iteration, forward=None if mode == "fwd" else (lambda impl: (lambda x, g: fn(impl)(x))),
                compile_baseline=n == COMPILE_AT.get(device) and dtype == torch.float32)


def cases(device, quick=False):
    if device == "cpu":
        sizes, dtypes = ([4 << 20] if quick else [1 << 20, 4 << 20, 16 << 20]), [torch.float32]
    else:
        sizes, dtypes = ([1 << 26] if quick else [1 << 20, 1 << 24, 1 << 26]), [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for n in sizes:
            for op in OPS:
                for mode in ("fwd", "fwd+bwd"):
                    yield _case(op, mode, n, dtype, device)

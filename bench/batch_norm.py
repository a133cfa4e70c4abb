"""batch_norm benchmark cases: pyops' BatchNorm2d (plain, fused with ReLU, fused with a residual add and
ReLU, channels_last) against torch's module followed by the same ops, training forward+backward (input,
weight and bias gradients) and eval forward; and an overhead case (a tiny batch, fwd+bwd and no_grad).

CPU: (16, 64, 56, 56) float32 (the targets' shape). GPU: ResNet-50 shapes, (32, 256, 56, 56) and
(32, 64, 112, 112), float32 and bfloat16 (float32 weights). --quick keeps the first of each.
Minimum bytes (the bandwidth floor): a training step reads x and writes y forward, reads g and x (and y
when an activation's derivative is read from it, r for a residual) and writes dx (and dr) backward; eval
reads x (and r) and writes y.
"""

import torch
import torch.nn.functional as TF
from torch import nn

import pyops.nn as pnn

from .harness import Case

SHAPES = {"cpu": [(16, 64, 56, 56)], "cuda": [(32, 256, 56, 56), (32, 64, 112, 112)]}
FORMS = {
    # name: (pyops keyword arguments, torch's ops after its BatchNorm2d, residual)
    "BatchNorm2d": ({}, None, False),
    "BatchNorm2d+relu": ({"activation": "relu"}, TF.relu, False),
    "BatchNorm2d+add+relu": ({"activation": "relu"}, TF.relu, True),
}
OVERHEAD_SHAPE = (2, 4, 2, 2)
OVERHEAD_CALLS = {True: 50, False: 200}


def _streams(form, mode):
    """Tensors of the input's size a step must read or write at minimum."""
    _, act, residual = FORMS[form]
    if mode == "eval":
        return 2 + residual
    return 2 + residual + 2 + (act is not None) + residual  # fwd: x, y (+r); bwd: g, x (+y) dx (+dr)


def _modules(form, c, device, dtype):
    kw, act, residual = FORMS[form]
    side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ours = pnn.BatchNorm2d(c, **kw).to(device, side)
    ref = nn.BatchNorm2d(c).to(device, side)

    def torch_form(x, r=None):
        y = ref(x)
        if r is not None:
            y = y + r
        return act(y) if act is not None else y

    return ours, ref, torch_form


def _case(form, mode, shape, dtype, device, layout, compile_baseline=True, calls=1, threads=None, family_op=None):
    _, _, residual = FORMS[form]
    ours, ref, torch_form = _modules(form, shape[1], device, dtype)
    if mode == "eval":
        ours.eval()
        ref.eval()
    compiled = {}
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def fn(impl):
        if impl == "pyops":
            return (lambda x, r: ours(x, r)) if residual else (lambda x, r: ours(x))
        if impl == "eager":
            return torch_form if residual else (lambda x, r: torch_form(x))
        if "fn" not in compiled:
            torch._dynamo.reset()
            compiled["fn"] = torch.compile(torch_form if residual else (lambda x, r: torch_form(x)), dynamic=False)
        return compiled["fn"]

    def make_inputs():
        grad = mode not in ("eval", "no_grad")
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(grad)
        r = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt) if residual else None
        g = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return x, r, g

    def iteration(impl):
        f = fn(impl)
        module = ours if impl == "pyops" else ref
        if mode in ("eval", "no_grad"):

            def run(x, r, g):
                with torch.no_grad():
                    for _ in range(calls):
                        f(x, r)

            return run

        def step(x, r, g):
            for _ in range(calls):
                torch.autograd.grad(f(x, r), [x, module.weight, module.bias], g)

        return step

    def forward(impl):
        return lambda x, r, g: fn(impl)(x, r)

    n = 1
    for s in shape:
        n *= s
    return Case(
        "batch_norm",
        family_op or (form + (" channels_last" if layout == "channels_last" else "")),
        "fwd+bwd" if mode == "train" else mode,
        shape,
        dtype,
        device,
        0 if calls > 1 else _streams(form, "eval" if mode == "eval" else "train") * n * dtype.itemsize,
        make_inputs,
        iteration,
        forward=None if mode in ("eval", "no_grad") or calls > 1 else forward,
        compile_baseline=compile_baseline,
        references=[("torch eager", "eager")] if calls > 1 else None,
        calls=calls,
        threads=threads,
        auto=calls > 1,
    )


def cases(device, quick=False):
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    shapes = SHAPES[device][:1] if quick else SHAPES[device]
    for dtype in dtypes:
        for shape in shapes:
            for form in FORMS:
                yield _case(form, "train", shape, dtype, device, "contiguous")
            yield _case("BatchNorm2d", "train", shape, dtype, device, "channels_last")
            yield _case("BatchNorm2d+relu", "train", shape, dtype, device, "channels_last")
            yield _case("BatchNorm2d", "eval", shape, dtype, device, "contiguous")
            yield _case("BatchNorm2d", "eval", shape, dtype, device, "channels_last")
    # the fixed cost of a call: a tiny batch, one thread on the CPU
    for mode in ("train", "no_grad"):
        yield _case(
            "BatchNorm2d",
            mode,
            OVERHEAD_SHAPE,
            torch.float32,
            device,
            "contiguous",
            compile_baseline=False,
            calls=OVERHEAD_CALLS[quick],
            threads=1 if device == "cpu" else None,
            family_op="BatchNorm2d overhead",
        )

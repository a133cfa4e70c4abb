"""Whole-model benchmark cases: one training step (forward, cross-entropy, backward, Adam step) of
the lectures' networks (pyops.models) on a batch of 64 digits-sized images (1x8x8) and, beside them,
of 64 CIFAR-sized images (3x32x32), pyops modules with pyops.optim.Adam against torch modules with
torch.optim.Adam, measured as a user runs them: torch eager, torch.compile of the torch model, pyops
(each backend and `auto`) and torch.compile of the pyops model under `auto` ("auto+compile").

torch.compile compiles forward and loss with fullgraph=True (pyops' ops are opaque custom ops to it, so
any graph break is an error); backward runs through the compiled graph's backward, the optimizer step
eagerly. Compiling happens in the warm-up, outside the timed rounds; first_s is each implementation's
first step, the compile included (tens of seconds a model on two cores).

On 8x8 the tensors are small, so the per-op overhead and the `auto` backend's choice of where to run
them decide the time, not the kernels' bandwidth; on 32x32 the convolutions' arithmetic starts to count.
"""

import torch

import pyops.optim as popt
from pyops import models as pmodels

from .harness import Case

MODELS = ("cnn", "resnext", "mobilenet", "densenet", "mlp3")
INPUTS = {"digits": (1, 8, 8), "cifar": (3, 32, 32)}  # one image, (C, H, W)
QUICK = (("cnn", "digits"), ("resnext", "digits"), ("cnn", "cifar"))
BATCH = 64


def _case(name, device, input_shape=INPUTS["digits"], batch=BATCH):
    def make_inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *input_shape, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        return x, y

    def _model(impl):
        lib = "pyops" if impl.startswith("pyops") else "torch"
        model = pmodels.build(name, lib, input_shape=input_shape).to(device)
        opt = (popt.Adam if lib == "pyops" else torch.optim.Adam)(model.parameters(), lr=1e-3)
        loss_fn = pmodels.loss_module(lib)

        def loss(x, y):
            return loss_fn(model(x), y)

        if "compile" in impl:
            torch._dynamo.reset()  # every case compiles the same function: start each from an empty cache
            loss = torch.compile(loss, fullgraph=True)
        return loss, opt

    def iteration(impl):
        loss, opt = _model(impl)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss(x, y).backward()
            opt.step()

        return step

    def forward_only(impl):
        return _model(impl)[0]

    return Case(
        "models",
        name,
        "train step",
        (batch, *input_shape),
        torch.float32,
        device,
        0,
        make_inputs,
        iteration,
        forward=forward_only,
        auto=True,
        variants=[("auto+compile", "pyops_compile", "auto")],
        first_call=True,
    )


def cases(device, quick=False):
    todo = QUICK if quick else [(name, size) for size in INPUTS for name in MODELS]
    for name, size in todo:
        yield _case(name, device, INPUTS[size])

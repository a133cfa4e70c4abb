"""Whole-model benchmark cases: one training step (forward, cross-entropy, backward, Adam step) of
the lectures' networks (pyops.models) on a batch of 64 digits-sized images (1x8x8), pyops modules
with pyops.optim.Adam against torch modules with torch.optim.Adam, eager and torch.compile.

This is where a call's fixed cost shows: the tensors are small, so the per-op overhead and the
`auto` backend's choice of where to run them decide the time, not the kernels' bandwidth.
"""

import torch

import pyops.optim as popt
from pyops import models as pmodels

from .harness import Case

MODELS = ("cnn", "resnext", "mobilenet", "densenet", "mlp3")
BATCH = 64


def _case(name, device, batch=BATCH):
    def make_inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 8, 8, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        return x, y

    def _model(impl):
        lib = "pyops" if impl == "pyops" else "torch"
        model = pmodels.build(name, lib).to(device)
        opt = (popt.Adam if lib == "pyops" else torch.optim.Adam)(model.parameters(), lr=1e-3)
        loss_fn = pmodels.loss_module(lib)
        forward = torch.compile(model) if impl == "compile" else model
        return forward, opt, loss_fn

    def iteration(impl):
        forward, opt, loss_fn = _model(impl)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss_fn(forward(x), y).backward()
            opt.step()

        return step

    def forward_only(impl):
        forward, _, loss_fn = _model(impl)
        return lambda x, y: loss_fn(forward(x), y)

    return Case(
        "models",
        name,
        "train step",
        (batch, 1, 8, 8),
        torch.float32,
        device,
        0,
        make_inputs,
        iteration,
        forward=forward_only,
        auto=True,
    )


def cases(device, quick=False):
    for name in MODELS[:2] if quick else MODELS:
        yield _case(name, device)

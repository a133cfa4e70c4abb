"""The fixed cost of a call: each activation of the spec table (pyops.testing.ACTIVATIONS) on a tiny
tensor, and batch_norm, mse_loss and cross_entropy on 64 elements, as users call them
(pyops.functional against torch's own function), per backend. (conv2d's is in the conv family.)

Cases: float32 tensors of 64 elements and of 1 element (activations); forward+backward
(`op(x).sum().backward()`), and the forward alone under torch.no_grad() and under
torch.inference_mode(). On the CPU one thread.
An iteration makes CALLS calls (the backend is switched and the timer read once around them); the
figure is the median over iterations, per call. On CUDA the same cases, timed with CUDA events.
Targets: native forward+backward within 1.2x torch's, forward under no_grad/inference_mode within
2.5x; auto below its crossover within 1.1x.
"""

import math

import torch
import torch.nn.functional as TF

import pyops.functional as PF
from pyops.testing import ACTIVATIONS

from .harness import Case

SIZES = (64, 1)
MODES = ("fwd+bwd", "no_grad", "inference_mode")
CALLS = {True: 100, False: 400}  # calls per iteration, by --quick
REFERENCE = "torch"


def _timed_case(op, mode, shape, device, calls, make_inputs, function):
    """A case that calls f(*inputs, *extra, **kw) `calls` times an iteration, where
    function(impl) -> (f, extra, kw) for impl "pyops" (pyops.functional) or torch's."""

    def iteration(impl):
        f, extra, kw = function(impl)
        if mode == "fwd+bwd":

            def run(*args):
                for _ in range(calls):
                    f(*args, *extra, **kw).sum().backward()

            return run
        grad_mode = torch.no_grad if mode == "no_grad" else torch.inference_mode

        def run(*args):
            with grad_mode():
                for _ in range(calls):
                    f(*args, *extra, **kw)

        return run

    return Case(
        "overhead",
        op,
        mode,
        shape,
        torch.float32,
        device,
        0,
        make_inputs,
        iteration,
        compile_baseline=False,
        references=[(REFERENCE, "eager")],
        calls=calls,
        threads=1 if device == "cpu" else None,
        auto=True,
    )


def _case(op, mode, n, device, calls):
    spec = ACTIVATIONS[op]
    shape = (1, n)  # ops with a dim act along dim 1
    kw = spec.kwargs_for(shape)

    def make_inputs():
        return (torch.randn(shape, device=device, requires_grad=mode == "fwd+bwd"),)

    return _timed_case(
        op,
        mode,
        shape,
        device,
        calls,
        make_inputs,
        lambda impl: (spec.fn if impl == "pyops" else spec.reference, (), kw),
    )


# The other families at 64 elements: op -> (shape, inputs(device, grad) -> tuple, the function's name,
# extra positional arguments after the inputs).
def _bn_inputs(device, grad):
    c = 4
    x = torch.randn(1, c, 4, 4, device=device, requires_grad=grad)
    w, b = (torch.rand(c, device=device, requires_grad=grad), torch.randn(c, device=device, requires_grad=grad))
    return x, torch.zeros(c, device=device), torch.ones(c, device=device), w, b


def _pair_inputs(device, grad):
    return torch.randn(1, 64, device=device, requires_grad=grad), torch.randn(1, 64, device=device)


def _ce_inputs(device, grad):
    return torch.randn(8, 8, device=device, requires_grad=grad), torch.randint(0, 8, (8,), device=device)


FAMILY_OPS = {
    "batch_norm": ((1, 4, 4, 4), _bn_inputs, "batch_norm", (True,)),  # training
    "mse_loss": ((1, 64), _pair_inputs, "mse_loss", ()),
    "cross_entropy": ((8, 8), _ce_inputs, "cross_entropy", ()),
}


def _family_case(op, mode, device, calls):
    shape, inputs, name, extra = FAMILY_OPS[op]
    return _timed_case(
        op,
        mode,
        shape,
        device,
        calls,
        lambda: inputs(device, mode == "fwd+bwd"),
        lambda impl: (getattr(PF if impl == "pyops" else TF, name), extra, {}),
    )


def cases(device, quick=False):
    for n in SIZES:
        for mode in MODES:
            for op in ACTIVATIONS:
                yield _case(op, mode, n, device, CALLS[quick])
    for mode in MODES:
        for op in FAMILY_OPS:
            yield _family_case(op, mode, device, CALLS[quick])


def print_table(results, file=None):
    """One row per case: torch's microseconds per call, then each backend's and its ratio to torch's."""
    cases, rows = [], {}
    for r in results:
        if id(r.case) not in rows:
            cases.append(r.case)
            rows[id(r.case)] = {}
        rows[id(r.case)][r.backend] = r
    backends = list(dict.fromkeys(r.backend for r in results if r.backend != REFERENCE))
    threads = "one thread, " if cases and cases[0].threads == 1 else ""
    print(f"# {threads}median us per call (x torch: the backend's time over torch's, lower is better)", file=file)
    head = f"{'op':<13} {'elements':>8}  {'mode':<15} {'torch us':>9}"
    head += "".join(f"  {b + ' us':>10} {'x torch':>7}" for b in backends)
    print(head, file=file)
    for case in cases:
        by_backend = rows[id(case)]
        torch_us = by_backend[REFERENCE].ms * 1e3
        line = f"{case.op:<13} {math.prod(case.shape):>8}  {case.mode:<15} {torch_us:9.2f}"
        for b in backends:
            r = by_backend.get(b)
            line += f"  {r.ms * 1e3:10.2f} {r.ms * 1e3 / torch_us:7.2f}" if r else f"  {'':>10} {'':>7}"
        print(line, file=file)

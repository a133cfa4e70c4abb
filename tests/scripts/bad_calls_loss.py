"""Bad input to the loss family's primitives: on each backend named on the command line, every call
raises an error naming the op, never a signal. tests/test_loss.py runs it in a subprocess, where a crash
shows as one: `python tests/scripts/bad_calls_loss.py BACKEND...` prints "all refused"."""

import sys

import torch

from pyops.ops import PRIMITIVES

x = torch.randn(40)
BAD = {
    "pointwise_loss_fwd: target shape": lambda o: o["pointwise_loss_fwd"](x, torch.randn(41), 1, 1, 1.0, True),
    "pointwise_loss_fwd: target dtype": lambda o: o["pointwise_loss_fwd"](x, x.double(), 1, 1, 1.0, True),
    "pointwise_loss_fwd: target device": lambda o: o["pointwise_loss_fwd"](x, x.to("meta"), 1, 1, 1.0, True),
    "pointwise_loss_fwd: kind": lambda o: o["pointwise_loss_fwd"](x, x, 7, 1, 1.0, True),
    "pointwise_loss_fwd: reduction": lambda o: o["pointwise_loss_fwd"](x, x, 1, 5, 1.0, True),
    "pointwise_loss_fwd: delta": lambda o: o["pointwise_loss_fwd"](x, x, 2, 1, -1.0, True),
    "pointwise_loss_fwd: integers": lambda o: o["pointwise_loss_fwd"](
        torch.arange(4), torch.arange(4), 1, 1, 1.0, True
    ),
    "pointwise_loss_bwd: grad shape": lambda o: o["pointwise_loss_bwd"](torch.randn(400), x, x, 1, 1.0),
    "cross_entropy_fwd: target out of range": lambda o: o["cross_entropy_fwd"](
        torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), None, -100, 1, 0.0, True
    ),
    "cross_entropy_fwd: huge target": lambda o: o["cross_entropy_fwd"](
        torch.randn(4, 3), torch.tensor([0, 1, 2, 1 << 40]), None, -100, 0, 0.0, True
    ),
    "cross_entropy_fwd: probabilities shape": lambda o: o["cross_entropy_fwd"](
        torch.randn(4, 3), torch.rand(4, 2), None, -100, 1, 0.0, True
    ),
    "cross_entropy_fwd: weight dtype": lambda o: o["cross_entropy_fwd"](
        torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(3, dtype=torch.float64), -100, 1, 0.0, True
    ),
    "cross_entropy_fwd: 0-d input": lambda o: o["cross_entropy_fwd"](
        torch.tensor(1.0), torch.tensor(0), None, -100, 1, 0.0, True
    ),
}


def main(backends):
    for backend in backends:
        for what, call in BAD.items():
            try:
                call(PRIMITIVES[backend])
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                assert "pyops" in str(e), (backend, what, str(e)[:200])
            else:
                raise AssertionError(f"{backend}: {what}: no error")
    print("all refused")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Bad input to the activation family's primitives: on each backend named on the command line, every
call raises an error naming the op, never a signal. tests/test_semantics.py runs it in a subprocess,
where a crash shows as one: `python tests/scripts/bad_calls_activation.py BACKEND...` prints
"all refused"."""

import sys

import torch

from pyops.ops import PRIMITIVES

x = torch.randn(40)
mask = torch.zeros(5, dtype=torch.uint8)
BAD = {
    "sigmoid_bwd: grad larger than the saved output": lambda o: o["sigmoid_bwd"](torch.randn(400), x),
    "tanh_bwd: saved of another dtype": lambda o: o["tanh_bwd"](x, x.double()),
    "elu_bwd: saved on another device": lambda o: o["elu_bwd"](x, x.to("meta"), 1.0, True),
    "relu_bwd: empty mask": lambda o: o["relu_bwd"](x, torch.zeros(0, dtype=torch.uint8)),
    "relu_bwd: short mask": lambda o: o["relu_bwd"](x, mask[:2]),
    "relu_bwd: mask of another dtype": lambda o: o["relu_bwd"](x, torch.zeros(5)),
    "relu_bwd: non-contiguous mask": lambda o: o["relu_bwd"](x, torch.zeros(10, dtype=torch.uint8)[::2]),
    "leaky_relu_bwd: long mask": lambda o: o["leaky_relu_bwd"](x, torch.zeros(50, dtype=torch.uint8), 0.1),
    "maxout_bwd: short indices": lambda o: o["maxout_bwd"](x, torch.zeros(3, dtype=torch.uint8), 2, 0),
    "maxout_bwd: indices of another dtype": lambda o: o["maxout_bwd"](x, torch.zeros(40), 2, 0),
    "maxout_fwd: pieces not dividing": lambda o: o["maxout_fwd"](x, 3, 0),
    "maxout_fwd: pieces out of range": lambda o: o["maxout_fwd"](x, 0, 0),
    "maxout_fwd: dim out of range": lambda o: o["maxout_fwd"](x, 2, 4),
    "maxout_fwd: 0-d input": lambda o: o["maxout_fwd"](torch.tensor(1.0), 1, 0),
    "relu_fwd: integer input": lambda o: o["relu_fwd"](torch.arange(4)),
    "relu_fwd_: integer input in place": lambda o: o["relu_fwd_"](torch.arange(4)),
    "elu_fwd_: complex input": lambda o: o["elu_fwd_"](torch.zeros(3, dtype=torch.complex64), 1.0),
}


def main(backends):
    for backend in backends:
        for what, call in BAD.items():
            try:
                call(PRIMITIVES[backend])
            except (RuntimeError, ValueError, TypeError) as e:
                assert "pyops" in str(e), (backend, what, str(e)[:200])
            else:
                raise AssertionError(f"{backend}: {what}: no error")
    print("all refused")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Bad input to the conv family: on each backend named on the command line, every bad argument through
the public function and each primitive raises an error naming the op (torch's own on the torch
backend), never a signal. tests/test_conv.py runs it in a subprocess, where a crash shows as one:
`python tests/scripts/bad_calls_conv.py BACKEND...` prints "all refused"."""

import sys

import torch

import pyops
import pyops.functional as PF
from pyops.ops import PRIMITIVES

x = torch.randn(2, 4, 6, 6)
w = torch.randn(4, 2, 3, 3)
g = torch.randn(2, 4, 4, 4)
geo = ([1, 1], [0, 0], [1, 1], 2)
ws = [4, 2, 3, 3]
PUBLIC = {
    "groups not dividing the channels": lambda: PF.conv2d(x, torch.randn(4, 3, 3, 3), groups=3),
    "groups not dividing out_channels": lambda: PF.conv2d(x, torch.randn(5, 2, 3, 3), groups=2),
    "weight of the wrong channels": lambda: PF.conv2d(x, torch.randn(4, 3, 3, 3), groups=2),
    "3-d weight": lambda: PF.conv2d(x, torch.randn(4, 4, 3)),
    "5-d input": lambda: PF.conv2d(x[None], w, groups=2),
    "kernel larger than the padded input": lambda: PF.conv2d(x, torch.randn(4, 2, 9, 9), groups=2, padding=1),
    "dtype mismatch": lambda: PF.conv2d(x.double(), w, groups=2),
    "bias dtype mismatch": lambda: PF.conv2d(x, w, torch.randn(4).double(), groups=2),
    "bias of the wrong size": lambda: PF.conv2d(x, w, torch.randn(3), groups=2),
    "device mismatch": lambda: PF.conv2d(x, w.to("meta"), groups=2),
    "zero stride": lambda: PF.conv2d(x, w, stride=0, groups=2),
    "negative padding": lambda: PF.conv2d(x, w, padding=-1, groups=2),
    "zero dilation": lambda: PF.conv2d(x, w, dilation=0, groups=2),
    "three strides": lambda: PF.conv2d(x, w, stride=(1, 1, 1), groups=2),
    "zero groups": lambda: PF.conv2d(x, w, groups=0),
    "bad padding string": lambda: PF.conv2d(x, w, padding="full", groups=2),
    "same with strides": lambda: PF.conv2d(x, w, stride=2, padding="same", groups=2),
    "bad activation": lambda: PF.conv2d(x, w, groups=2, activation="gelu"),
}
PRIMITIVE = {
    "fwd: integer input": lambda o: o["conv2d_fwd"](x.long(), w.long(), None, *geo, 0, 0.0),
    "fwd_stats: integer input": lambda o: o["conv2d_fwd_stats"](x.long(), w.long(), None, *geo),
    "fwd_stats: bias of the wrong size": lambda o: o["conv2d_fwd_stats"](x, w, torch.randn(3), *geo),
    "fwd: bad activation code": lambda o: o["conv2d_fwd"](x, w, None, *geo, 7, 0.0),
    "fwd: negative scalar": lambda o: o["conv2d_fwd"](x, w, None, *geo, 2, -1.0),
    "fwd: groups not dividing": lambda o: o["conv2d_fwd"](x, w, None, [1, 1], [0, 0], [1, 1], 3, 0, 0.0),
    "bwd_input: grad_out of the wrong size": lambda o: o["conv2d_bwd_input"](g[:, :3], w, [2, 4, 6, 6], *geo),
    "bwd_input: input_size not 4-d": lambda o: o["conv2d_bwd_input"](g, w, [2, 4, 6], *geo),
    "bwd_weight: grad_out of a wrong size": lambda o: o["conv2d_bwd_weight"](g[:, :, 1:], x, ws, *geo, True),
    "bwd_weight: dtype mismatch": lambda o: o["conv2d_bwd_weight"](g, x.double(), ws, *geo, True),
    "bwd_weight: weight_size inconsistent": lambda o: o["conv2d_bwd_weight"](g, x, [4, 3, 3, 3], *geo, False),
}


def main(backends):
    for backend in backends:
        for what, call in PUBLIC.items():
            try:
                with pyops.backend(backend):
                    call()
            except (RuntimeError, ValueError, TypeError) as e:
                assert backend == "torch" or "pyops" in str(e), (backend, what, str(e)[:300])
            else:
                raise AssertionError(f"{backend}: {what}: no error")
        if backend == "torch":
            continue
        for what, call in PRIMITIVE.items():
            try:
                call(PRIMITIVES[backend])
            except (RuntimeError, ValueError, TypeError) as e:
                assert "pyops" in str(e), (backend, what, str(e)[:300])
            else:
                raise AssertionError(f"{backend}: {what}: no error")
    print("all refused")


if __name__ == "__main__":
    main(sys.argv[1:])

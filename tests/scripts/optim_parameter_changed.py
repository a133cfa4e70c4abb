"""A parameter changed under its optimizer state, on the backend named on the command line: after a step,
`p.data = p.data.double()` leaves float32 state (prints "dtype: raised <the error's first line>" or
"dtype: ACCEPTED"); a parameter moved to channels_last under its state steps on (prints "memory format:
max difference <d>" from torch's for-loop). tests/test_optim.py runs it in a subprocess (a mismatch used
to be a segfault): `python tests/scripts/optim_parameter_changed.py BACKEND`."""

import sys

import torch

import pyops
import pyops.optim as popt


def main(backend):
    p = torch.randn(4, 3, requires_grad=True)
    opt = popt.Adam([p])
    with pyops.backend(backend):
        p.grad = torch.randn_like(p)
        opt.step()
        p.data = p.data.double()
        p.grad = torch.randn_like(p)
        try:
            opt.step()
            print("dtype: ACCEPTED")
        except RuntimeError as e:
            print("dtype: raised", str(e).splitlines()[0])
    ours = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    ref = [ours[0].detach().clone().requires_grad_()]
    opts = popt.Adam(ours, weight_decay=0.1), torch.optim.Adam(ref, weight_decay=0.1, foreach=False)
    for k in range(4):
        if k == 2:
            for q in ours + ref:
                q.data = q.data.contiguous(memory_format=torch.channels_last)
        g = torch.randn(2, 3, 4, 4)
        for q in ours + ref:
            q.grad = torch.empty_like(q).copy_(g)
        with pyops.backend(backend):
            opts[0].step()
        opts[1].step()
    print("memory format: max difference", float((ours[0] - ref[0]).abs().max()))


if __name__ == "__main__":
    main(sys.argv[1])

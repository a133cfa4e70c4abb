"""Bad input to the batch_norm family's primitives: on each backend named on the command line, every
call raises an error naming the op, never a signal. tests/test_batch_norm.py runs it in a subprocess,
where a crash shows as one: `python tests/scripts/bad_calls_batch_norm.py BACKEND...` prints
"all refused"."""

import sys

import torch

from pyops.ops import PRIMITIVES

x = torch.randn(4, 3, 5)
c3 = torch.randn(3)
BAD = [
    ("batch_norm_stats", (torch.randn(4),)),
    ("batch_norm_stats", (torch.randint(0, 3, (4, 3)),)),
    ("batch_norm_elemt", (x, torch.randn(2), c3, None, None, None, "none", 0.0)),
    ("batch_norm_elemt", (x, c3, c3, torch.randn(4), None, None, "none", 0.0)),
    ("batch_norm_elemt", (x, c3, c3, None, None, torch.randn(4, 3), "none", 0.0)),
    ("batch_norm_elemt", (x, c3, c3, None, None, None, "gelu", 0.0)),
    ("batch_norm_bwd_reduce", (torch.randn(4, 3), x, None, None, c3, c3, None, None, "none", 0.0, False)),
    ("batch_norm_bwd_reduce", (x, None, None, None, c3, c3, None, None, "none", 0.0, False)),
    ("batch_norm_bwd_reduce", (x, None, x, None, c3, c3, None, None, "relu", 0.0, False)),
    ("batch_norm_bwd_reduce", (x, x, None, None, c3, c3, None, None, "relu", 0.0, False)),
    ("batch_norm_bwd_elemt", (x, x, None, None, c3, c3, None, None, c3, None, "none", 0.0)),
    ("batch_norm_bwd_elemt", (x.half(), x, None, None, c3, c3, None, None, None, None, "none", 0.0)),
]


def main(backends):
    for backend in backends:
        for name, args in BAD:
            try:
                PRIMITIVES[backend][name](*args)
            except (RuntimeError, ValueError, TypeError) as e:
                assert "pyops::" in str(e) or "pyops." in str(e), (backend, name, str(e)[:300])
            else:
                raise AssertionError(f"{backend} {name} accepted bad input")
    print("all refused")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Bad arguments to the optimizer steps' primitives on the backend named on the command line: prints one
line a case, "<case>: raised <the error's first line>" or "<case>: ACCEPTED". tests/test_optim.py runs
it in a subprocess (an unchecked pointer would be a signal, not an exception) and wants every case
refused with an error naming the primitive: `python tests/scripts/bad_calls_optim.py BACKEND`."""

import sys

import torch

from pyops.ops import PRIMITIVES


def adam_args():
    params = [torch.randn(3, 4), torch.randn(5)]

    def like():
        return [torch.zeros_like(p) for p in params]

    return [
        params,
        like(),
        like(),
        like(),
        like(),
        [torch.tensor(1.0) for _ in params],
        torch.tensor(0.1),
        0.9,
        0.999,
        0.0,
        1e-8,
        True,
        False,
        False,
        None,
        None,
    ]


def sgd_args():
    params = [torch.randn(3, 4), torch.randn(5)]
    return [
        params,
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
        torch.tensor(0.1),
        0.9,
        0.1,
        0.0,
        False,
        False,
        [torch.ones(1, dtype=torch.uint8) for _ in params],
        None,
        None,
    ]


def edit(args, i, f):
    args = list(args)
    args[i] = f(args[i])
    return args


CASES = {
    "short state list": ("adam_step_", edit(adam_args(), 2, lambda ts: ts[:1])),
    "state with fewer elements": ("adam_step_", edit(adam_args(), 3, lambda ts: [ts[0][:2], ts[1]])),
    "state of another dtype": ("adam_step_", edit(adam_args(), 2, lambda ts: [ts[0].double(), ts[1]])),
    "state in another layout": ("adam_step_", edit(adam_args(), 2, lambda ts: [torch.zeros(4, 3).t(), ts[1]])),
    "amsgrad without max_exp_avg_sqs": ("adam_step_", edit(adam_args(), 4, lambda ts: [])),
    "no step counts": ("adam_step_", edit(adam_args(), 5, lambda ts: [])),
    "int64 step counts": ("adam_step_", edit(adam_args(), 5, lambda ts: [torch.tensor(1) for _ in ts])),
    "step counts of two elements": ("adam_step_", edit(adam_args(), 5, lambda ts: [torch.ones(2) for _ in ts])),
    "lr of two elements": ("adam_step_", edit(adam_args(), 6, lambda t: torch.ones(2))),
    "float16 lr": ("adam_step_", edit(adam_args(), 6, lambda t: t.half())),
    "int grad_scale": ("adam_step_", edit(adam_args(), 14, lambda t: torch.tensor(2))),
    "float16 found_inf": ("adam_step_", edit(adam_args(), 15, lambda t: torch.tensor(0.0).half())),
    "params of two dtypes": ("adam_step_", edit(adam_args(), 0, lambda ts: [ts[0], ts[1].double()])),
    "int params": (
        "adam_step_",
        [[torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)]]
        + [[torch.ones(3, dtype=torch.int64)]] * 3
        + [[torch.tensor(1.0)]]
        + adam_args()[6:],
    ),
    "non-dense params": (
        "adam_step_",
        [[torch.randn(4, 6)[:, ::2]], [torch.zeros(4, 3)]]
        + [[torch.zeros(4, 3)]] * 3
        + [[torch.tensor(1.0)]]
        + adam_args()[6:],
    ),
    "momentum without buffers": ("sgd_step_", edit(sgd_args(), 2, lambda ts: [])),
    "short new-buffer flags": ("sgd_step_", edit(sgd_args(), 9, lambda ts: ts[:1])),
    "float new-buffer flags": ("sgd_step_", edit(sgd_args(), 9, lambda ts: [torch.ones(1) for _ in ts])),
}


def main(backend):
    for label, (name, args) in CASES.items():
        try:
            PRIMITIVES[backend][name](*args)
            print(f"{label}: ACCEPTED")
        except RuntimeError as e:
            print(f"{label}: raised {str(e).splitlines()[0]}")


if __name__ == "__main__":
    main(sys.argv[1])

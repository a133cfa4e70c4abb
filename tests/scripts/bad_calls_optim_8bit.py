"""Bad arguments to pyops::adam_step_8bit_ (native): prints one line a case, "<case>: raised <the error's
first line>" or "<case>: ACCEPTED". tests/test_optim_8bit.py runs it in a subprocess (an unchecked pointer
would be a signal, not an exception) and wants every case refused with an error naming the primitive."""

import torch

from pyops.ops import PRIMITIVES
from pyops.optim.quantized import dynamic_map


def good():
    params = [torch.randn(300), torch.randn(20, 30)]
    return [
        params,
        [torch.randn_like(p) for p in params],
        [torch.zeros(p.shape, dtype=torch.uint8) for p in params],
        [torch.zeros(p.shape, dtype=torch.uint8) for p in params],
        [torch.zeros(2), torch.zeros(3)],
        [torch.zeros(2), torch.zeros(3)],
        [torch.tensor(1.0) for _ in params],
        dynamic_map(True),
        dynamic_map(False),
        256,
        torch.tensor(1e-3),
        0.9,
        0.999,
        0.0,
        1e-8,
        False,
        False,
        None,
        None,
    ]


def with_(k, f):
    args = good()
    args[k] = f(args[k])
    return args


CASES = {
    "block size 128": lambda: with_(9, lambda _: 128),
    "block size 0": lambda: with_(9, lambda _: 0),
    "float codes": lambda: with_(2, lambda s: [t.float() for t in s]),
    "int8 codes": lambda: with_(3, lambda s: [t.to(torch.int8) for t in s]),
    "short codes": lambda: with_(2, lambda s: [s[0], torch.zeros(10, dtype=torch.uint8)]),
    "transposed codes": lambda: with_(2, lambda s: [s[0], torch.zeros(30, 20, dtype=torch.uint8).t()]),
    "short absmax": lambda: with_(4, lambda s: [torch.zeros(1), s[1]]),
    "long absmax": lambda: with_(5, lambda s: [s[0], torch.zeros(300)]),
    "double absmax": lambda: with_(5, lambda s: [t.double() for t in s]),
    "2-d absmax": lambda: with_(4, lambda s: [s[0], torch.zeros(3, 1)]),
    "short map": lambda: with_(7, lambda m: m[:255].clone()),
    "double map": lambda: with_(8, lambda m: m.double()),
    "strided map": lambda: with_(7, lambda m: torch.stack([m, m], 1)[:, 0]),
    "unsorted map": lambda: with_(7, lambda m: m.flip(0).contiguous()),
    "nan map": lambda: with_(8, lambda m: torch.where(torch.arange(256) == 5, float("nan"), m)),
    "missing absmax list": lambda: with_(5, lambda s: []),
    "missing steps": lambda: with_(6, lambda s: []),
    "bad lr": lambda: with_(10, lambda _: torch.tensor([1e-3, 1e-3])),
    "grads too few": lambda: with_(1, lambda s: s[:1]),
}

for name, make in CASES.items():
    try:
        PRIMITIVES["native"]["adam_step_8bit_"](*make())
        print(f"{name}: ACCEPTED")
    except Exception as e:
        print(f"{name}: raised {str(e).splitlines()[0]}")

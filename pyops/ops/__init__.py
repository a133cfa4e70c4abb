"""The primitive ops of every family, per backend, and their fake kernels (pyops/ops/<family>.py).

PRIMITIVES[backend][name] is the op that runs primitive `name` on `backend` ("native" or "triton"):
pyops::<name> and its Triton twin, both defined in C++ from one schema (csrc/primitives.h) and listed
in pyops._C.PRIMITIVES. Their derivatives are C++ Autograd kernels (csrc/autograd/<family>.cpp).
"""

import torch

from .. import _C

PRIMITIVES = {
    "native": {native: getattr(torch.ops.pyops, native).default for native, _ in _C.PRIMITIVES},
    "triton": {native: getattr(torch.ops.pyops, triton).default for native, triton in _C.PRIMITIVES},
}


def register_fake(name, fake):
    """The fake (meta) kernel of primitive `name` on both backends."""
    for ops in PRIMITIVES.values():
        torch.library.register_fake(ops[name]._name)(fake)


# One library fragment for the Triton launch ops of every family (pyops::_triton_*).
LAUNCH_LIBRARY = torch.library.Library("pyops", "FRAGMENT")


def define_launch(schema, launcher):
    """Define pyops::<schema> as a Triton launch op: C++'s host side (csrc/common/triton.h) calls it
    with checked, allocated tensors on CPU (Triton's interpreter) or CUDA; `launcher()` returns the
    pyops.kernels function, imported on first use so that TRITON_INTERPRET is read then."""
    name = schema.split("(", 1)[0]
    LAUNCH_LIBRARY.define(schema)

    def launch(*args):
        return launcher()(*args)

    for key in ("CPU", "CUDA"):
        LAUNCH_LIBRARY.impl(name, launch, key)


# Every family registers its fake kernels and Triton launch ops on import.
from . import activation, batch_norm, conv, loss, optim  # noqa: E402,F401

"""The optim family's primitive ops: `pyops::<optimizer>_step_` (schemas in csrc/ops.cpp), each
updating a group's tensors in place, and their fake kernels (they return nothing, so the fakes only
check the lists match). The update math is in pyops/optim/fused.py."""
import torch

from .. import _C  # noqa: F401  (registers the native pyops:: ops)

NAMES = ("sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_")


def _fake(params, grads, *rest, **kwargs):
    torch._check(len(grads) == len(params), lambda: "pyops optim step: grads and params differ in length")
    return None


for _name in NAMES:
    torch.library.register_fake(f"pyops::{_name}")(_fake)

PRIMITIVES = {name: getattr(torch.ops.pyops, name).default for name in NAMES}

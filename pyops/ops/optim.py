"""The optim family's primitives: fake kernels and the Triton launch ops.

Each primitive (`pyops::<optimizer>_step_` and its Triton twin `pyops::<optimizer>_step_triton_`,
schemas in csrc/primitives.h) updates a group's tensors in place and returns nothing; its host side
(argument checks, version counters) is csrc/optim.h for every backend. The Triton twin's C++ host
side calls `pyops::_triton_<optimizer>_step`, defined here with the primitive's own schema, which
runs the launcher of pyops.kernels.optim. The update math is in pyops/optim/fused.py.
"""

import torch

from . import PRIMITIVES, define_launch, register_fake

# primitive -> (its Triton launch op, the launcher's name in pyops.kernels.optim)
LAUNCHES = {
    "sgd_step_": ("_triton_sgd_step", "sgd_step"),
    "adam_step_": ("_triton_adam_step", "adam_step"),
    "adam_step_8bit_": ("_triton_adam_step_8bit", "adam_step_8bit"),
    "adagrad_step_": ("_triton_adagrad_step", "adagrad_step"),
    "rmsprop_step_": ("_triton_rmsprop_step", "rmsprop_step"),
}


def _fake(params, grads, *rest):
    """The steps return nothing; under tracing only the lists' agreement is checked (the C++ checks
    run on real tensors)."""
    torch._check(
        len(grads) == len(params),
        lambda: f"pyops optim step: grads has {len(grads)} tensors but params has {len(params)}",
    )


for _name in LAUNCHES:
    register_fake(_name, _fake)


def _kernels():
    from ..kernels import optim  # imported on first use, so that TRITON_INTERPRET is read then

    return optim


def _launch_schema(primitive, launch_name):
    """The launch op's schema: the primitive's own arguments under the launch op's name."""
    schema = str(PRIMITIVES["native"][primitive]._schema)  # "pyops::sgd_step_(Tensor(a!)[] params, ...) -> ()"
    return launch_name + schema[schema.index("(") :]


for _name, (_launch_name, _launcher) in LAUNCHES.items():
    define_launch(_launch_schema(_name, _launch_name), lambda launcher=_launcher: getattr(_kernels(), launcher))

"""pyops: hand-written Triton, CUDA and C++ kernels for the building blocks of convolutional
networks, as drop-in replacements for their torch counterparts.

    import pyops
    y = pyops.functional.relu(x)               # backend picked per op and device ("auto")
    with pyops.backend("triton"): ...          # or chosen for a block
    with pyops.autotune(): ...                 # or "auto" measured on this machine
    model = pyops.convert(model)               # swap torch modules for pyops ones
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch before pyops._C)

from . import (
    _C,  # noqa: F401
    functional,
    nn,
    optim,
)
from .autotune import autotune
from .backend import BACKENDS, available_backends, backend
from .backend import current as current_backend
from .convert import convert
from .info import info, saved_bytes

__all__ = [
    "backend",
    "autotune",
    "current_backend",
    "available_backends",
    "BACKENDS",
    "functional",
    "nn",
    "optim",
    "convert",
    "info",
    "saved_bytes",
]

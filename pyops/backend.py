"""Backend registry and selection.

Backends: ``native`` (pyops._C: C++ on CPU, CUDA C++ on GPU), ``triton`` (pyops.kernels; on CPU only
under TRITON_INTERPRET=1), ``torch`` (plain torch ops, the reference) and ``auto`` (per op, device and
shape by a written rule, csrc/common/backend.h: on the CPU torch below each op's measured crossover
and native above it; on CUDA a pyops kernel only where its design moves fewer bytes than torch's or
fuses what torch runs apart, torch elsewhere: see the README; under ``pyops.autotune()`` measured
instead). ``with pyops.backend("triton"): ...`` selects one for a block.

The selection is a thread-local that the C++ ops read (csrc/common/backend.h): per thread, as
torch.no_grad is, and invisible to torch.compile, which traces the ops' choice at trace time.
Used as a decorator, ``@pyops.backend(name)`` also holds for each resumption of a generator.
"""

import functools
import importlib.util
import os

import torch
from torch.utils._contextlib import _DecoratorContextManager

from . import _C

BACKENDS = ("native", "triton", "torch", "auto")
_IDS = {name: i for i, name in enumerate(_C.BACKENDS)}
# The dtypes every pyops kernel takes (csrc/common/checks.h has the C++ twin).
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_importable():
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_interpreted():
    """Whether Triton runs interpreted (read once: triton.jit reads the variable when it decorates
    a kernel, so changing it later changes nothing anyway)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tell_cxx():
    """What can run here, told once to the C++ rule (csrc/common/backend.h) that every op and
    available_backends() read."""
    gpu = torch.cuda.is_available()
    _C._set_available(_triton_importable() and triton_interpreted(), _triton_importable() and gpu, gpu)


_tell_cxx()


def available_backends(device="cpu"):
    """The backends that can run on `device` here, in order of preference (`auto` excluded)."""
    return [_C.BACKENDS[i] for i in _C._available(torch.device(device).type)]


class backend(_DecoratorContextManager):
    """Run the block (or the decorated function) with backend `name` (native, triton, torch, auto),
    on this thread; on exit the thread's previous selection comes back."""

    def __init__(self, name):
        if name not in BACKENDS:
            raise ValueError(f"pyops.backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
        self.name = name
        self._prev = []

    def __enter__(self):
        self._prev.append(_C._get_backend())
        _C._set_backend(_IDS[self.name])

    def __exit__(self, *exc):
        _C._set_backend(self._prev.pop())

    def clone(self):
        return self.__class__(self.name)


def current():
    """This thread's selected backend name."""
    return _C.BACKENDS[_C._get_backend()]


def resolve(op, device, numel=-1, auto_min_numel=0):
    """The concrete backend ("native", "triton" or "torch") that runs `op` on `device` now, by the
    rule the C++ ops use: `auto` takes torch for CPU inputs of fewer than auto_min_numel elements."""
    return _C.BACKENDS[_C._resolve(op, torch.device(device).type, numel, auto_min_numel)]


def auto_rule(op, device, numel=-1, **facts):
    """What `auto`'s static rule runs for `op` on a `device` kind ("cpu", "cuda"), whatever is
    installed here: "pyops" (native, else triton) or "torch". numel: the input's elements (-1:
    unknown, as a symbolic size, counted as large). facts, where the op's row reads them:
    batch_norm's training, fused (an activation in its epilogue or a residual) and
    memory_efficient; conv2d's groups, in_per_group (input channels per group), kh, kw, sh, sw
    (strides), out_plane (OH * OW) and channels_last."""
    return "pyops" if _C._auto_rule(op, torch.device(device).type, numel, **facts) else "torch"


def auto_table(device="cuda"):
    """`auto`'s table for a device kind, {op: rule} (with the reason on CUDA: {op: (rule, reason)})."""
    if torch.device(device).type == "cuda":
        return {op: (rule.lower(), why) for op, (rule, why) in _C.AUTO_CUDA.items()}
    return dict(_C.AUTO_MIN_NUMEL)

"""Backend registry and selection.

Backends: ``native`` (pyops._C: C++ on CPU, CUDA C++ on GPU), ``triton`` (pyops.kernels; on CPU only
under TRITON_INTERPRET=1), ``torch`` (plain torch ops, the reference) and ``auto`` (per op and device,
the fastest measured backend). ``with pyops.backend("triton"): ...`` selects one for a block.
"""
import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("native", "triton", "torch", "auto")
# The dtypes every pyops kernel takes (csrc/common/checks.h has the C++ twin).
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# The selection stack: a plain module global, so that torch.compile traces through it (it guards on
# the value) instead of breaking the graph on a ContextVar or thread-local.
_stack = ["auto"]

# `auto`'s order of preference per device, fastest measured first; per-op exceptions go in
# _AUTO_OVERRIDES[(op, device_type)]. CUDA: no GPU measurement has been recorded yet, so the
# native CUDA kernels (no launch-time compilation) come first.
_AUTO_ORDER = {"cpu": ("native", "torch"), "cuda": ("native", "triton", "torch")}
_AUTO_OVERRIDES = {}
# Below these sizes (input elements) torch eager is faster on CPU: a pyops call costs ~20 us more
# (Python autograd.Function and op dispatch), which only the kernels' gains on larger tensors
# repay. Measured fwd+bwd crossovers, float32, 2-core EPYC (AVX512): relu, leaky_relu and
# sigmoid ~1M, tanh ~64K, elu and maxout under 16K.
_AUTO_MIN_NUMEL = {("relu", "cpu"): 1 << 20, ("leaky_relu", "cpu"): 1 << 20, ("sigmoid", "cpu"): 1 << 20,
                   ("tanh", "cpu"): 1 << 16, ("elu", "cpu"): 1 << 14, ("maxout", "cpu"): 1 << 14}


@functools.lru_cache(maxsize=None)
def native_devices():
    """Device types pyops._C has kernels for."""
    from . import _C

    return ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)


@functools.lru_cache(maxsize=None)
def _triton_importable():
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def triton_interpreted():
    """Whether Triton runs interpreted (read once: triton.jit reads the variable when it decorates
    a kernel, so changing it later changes nothing anyway)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device="cpu"):
    """The backends that can run on `device` here, in order of preference (`auto` excluded)."""
    dev = torch.device(device).type
    found = []
    if dev in native_devices() and (dev != "cuda" or torch.cuda.is_available()):
        found.append("native")
    if _triton_importable() and ((dev == "cuda" and torch.cuda.is_available()) or (dev == "cpu" and triton_interpreted())):
        found.append("triton")
    found.append("torch")
    return found


@contextlib.contextmanager
def backend(name):
    """Run the block with backend `name` (one of native, triton, torch, auto)."""
    if name not in BACKENDS:
        raise ValueError(f"pyops.backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    _stack.append(name)
    try:
        yield
    finally:
        _stack.pop()


def current():
    return _stack[-1]


_resolved = {}


def resolve(op, device, numel=None):
    """The concrete backend that runs `op` on `device` now, for an input of `numel` elements
    (memoised: this is on every call's path)."""
    name = _stack[-1]
    small = name == "auto" and numel is not None and numel < _AUTO_MIN_NUMEL.get((op, device.type), 0)
    key = (op, device.type, name, small)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(op, device.type, name, small)
    return found


def _resolve(op, dev, name, small):
    if name == "auto":
        if small:
            return "torch"
        order = _AUTO_OVERRIDES.get((op, dev)) or _AUTO_ORDER.get(dev, ("torch",))
        usable = available_backends(dev)
        return next(b for b in order + ("torch",) if b in usable)
    if name == "torch":
        return name
    if name not in available_backends(dev):
        raise RuntimeError(f"pyops.{op}: backend {name!r} is not available on {dev} here "
                           f"(available: {', '.join(available_backends(dev))})")
    return name

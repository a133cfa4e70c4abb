"""Autotuning: `auto` measured on this machine instead of decided by the written rule.

    with pyops.autotune():                 # or @pyops.autotune(), or PYOPS_AUTOTUNE=1 for every thread
        loss = model(x).sum(); loss.backward()

Under `auto` (an explicit ``pyops.backend`` is never second-guessed), the first call of an op with
a new key — op, device, dtype, layout, shape bucket (sizes rounded up to powers of two), whether a
graph is recorded, and what picks another kernel (batch norm's training flag and fusion, conv2d's
groups, channels per group, kernel size and stride, a loss's reduction) — runs the op once per
usable backend (native, triton on a GPU, torch): a warm-up, then REPEATS timed runs, the device
synchronised around each, forward and, where a graph is recorded, backward (``torch.autograd.grad``
with respect to the op's inputs; nothing accumulates into ``.grad``). The median decides; the
winner is kept for the key, in memory and in a JSON file, and used from then on without timing.

Where the timing runs: the public C++ op (csrc/autograd/<family>.cpp) resolves its backend with
``choose`` (csrc/common/backend.h). With autotuning off that is the static rule and costs what it
did (the thread-local selection, read once). With it on, ``tuned`` (csrc/backend.cpp) builds the key
and looks it up; on a miss it calls ``_tune`` below with a runner that runs the op on a given
backend, so the clock, the repetitions, the synchronisation and the file live here, and the C++ side
only knows how to run its op. An in-place op (``relu_``) is timed as its out-of-place form on the
same input, which it leaves untouched; batch norm in training is timed on clones of the running
statistics. Nothing is timed on fake or functional tensors or under a dispatch mode (``torch.compile``
tracing, FakeTensorMode), on torch.func's wrapped tensors (``grad``, ``jvp``), or during CUDA graph
capture: such calls take the cached choice, else the static rule. (Under ``vmap`` a batching rule
runs the op on the whole batch, a plain tensor, which is timed as any other.)

The cache file is ``$PYOPS_AUTOTUNE_CACHE``, else ``$XDG_CACHE_HOME/pyops/autotune.json`` (``~/.cache``
without XDG_CACHE_HOME); its entries are grouped by device name and the torch, triton and pyops
versions, so that another GPU or release tunes afresh. A file that cannot be read is ignored with a
warning (and replaced on the next write). Optimizers keep the static rule (see the README).
"""

import functools
import json
import os
import platform
import statistics
import threading
import time
import warnings

import torch
from torch.utils._contextlib import _DecoratorContextManager

from . import _C

__all__ = ["autotune", "enabled", "cache_path", "cache_entries", "clear"]

WARMUP = 1
REPEATS = 5
_FORMAT = 1
_clock = time.perf_counter  # tests swap in a fake clock, which may read _timing
_timing = None  # the backend being timed (its name), while _tune runs
_lock = threading.Lock()
_file = None  # the file's sections, read once
_pushed = set()  # the devices whose section is in the C++ cache


class autotune(_DecoratorContextManager):
    """Autotune `auto`'s choices in the block (or the decorated function), on this thread; on exit
    the thread's previous setting comes back. ``autotune(False)`` turns it off for a block."""

    def __init__(self, enabled=True):
        self.enabled = bool(enabled)
        self._prev = []

    def __enter__(self):
        self._prev.append(_C._autotune_get())
        _C._autotune_set(1 if self.enabled else 0)

    def __exit__(self, *exc):
        _C._autotune_set(self._prev.pop())

    def clone(self):
        return self.__class__(self.enabled)


def enabled():
    """Whether this thread autotunes now."""
    return _C._autotune_enabled()


def cache_path():
    """The cache file: $PYOPS_AUTOTUNE_CACHE, else <XDG_CACHE_HOME or ~/.cache>/pyops/autotune.json."""
    path = os.environ.get("PYOPS_AUTOTUNE_CACHE")
    if path:
        return path
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pyops", "autotune.json")


@functools.cache
def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def _device_name(device):
    """The name a device's entries are filed under: its model, not its index."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_name(index)
    return _cpu_name()


@functools.cache
def _versions():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch {torch.__version__}, triton {triton_version}, pyops {__import__('pyops').__version__}"


def _section(device):
    """The file's section for a device: its name and the versions that made the kernels."""
    return f"{_device_name(device)} | {_versions()}"


def _devices():
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]


def _read(path):
    """The file's sections ({section: {key: backend}}); {} when absent; {} with a warning when it
    cannot be read."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"pyops.autotune: ignoring the unreadable cache file {path} ({e})", stacklevel=3)
        return {}
    sections = data.get("sections") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    if not isinstance(sections, dict) or not all(
        isinstance(v, dict) and all(b in _C.BACKENDS[1:] for b in v.values()) for v in sections.values()
    ):
        warnings.warn(f"pyops.autotune: ignoring the corrupted cache file {path} (unexpected content)", stacklevel=3)
        return {}
    return sections


def _load(device):
    """Put the file's entries for `device` into the C++ cache, once: on its first tuning call (so that
    importing with PYOPS_AUTOTUNE=1 initialises no GPU)."""
    global _file
    with _lock:
        if device in _pushed:
            return
        _pushed.add(device)
        if _file is None:
            _file = _read(cache_path())
        for key, backend in _file.get(_section(device), {}).items():
            _C._autotune_store(f"{device}|{key}", _C.BACKENDS.index(backend))


def _save(full_key, backend):
    """Add one entry to the file (read again first: another process may have written it)."""
    device, key = full_key.split("|", 1)
    path = cache_path()
    global _file
    with _lock:
        sections = _read(path)
        sections.setdefault(_section(device), {})[key] = backend
        _file = sections
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"format": _FORMAT, "sections": sections}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"pyops.autotune: cannot write the cache file {path} ({e})", stacklevel=3)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _tune(key, candidates, run):
    """Time run(b) for each candidate backend id; return the fastest id (0: time nothing)."""
    global _timing
    device = key.split("|", 1)[0]
    _load(device)
    known = _C._autotune_entries().get(key)
    if known is not None:  # from the file
        return known
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        return 0
    if torch.compiler.is_compiling():
        return 0
    times = {}
    for b in candidates:
        _timing = _C.BACKENDS[b]
        try:
            for _ in range(WARMUP):
                run(b)
            _sync(device)
            samples = []
            for _ in range(REPEATS):
                start = _clock()
                run(b)
                _sync(device)
                samples.append(_clock() - start)
        except Exception:  # a backend that cannot take this input is no candidate
            continue
        finally:
            _timing = None
        times[b] = statistics.median(samples)
    if not times:
        return 0
    best = min(times, key=times.get)  # ties: the first in order of preference (native, triton, torch)
    _save(key, _C.BACKENDS[best])
    return best


def cache_entries():
    """The choices for this machine's devices, from the file and this process, {key: backend name}
    (keys: device|op|dtype|layout|shape|grad|facts)."""
    for device in _devices():
        _load(device)
    return {k: _C.BACKENDS[b] for k, b in sorted(_C._autotune_entries().items())}


def clear(file=False):
    """Forget the choices in memory (and delete the cache file when file=True)."""
    global _file
    with _lock:
        _C._autotune_clear()
        _file = None
        _pushed.clear()
        if file:
            try:
                os.remove(cache_path())
            except FileNotFoundError:
                pass


_C._autotune_set_tuner(_tune)
if os.environ.get("PYOPS_AUTOTUNE", "0") == "1":
    _C._autotune_set_default(True)

"""pyops.info(): what this installation is and can run."""

import importlib.util

import torch

from .autotune import cache_entries, cache_path
from .autotune import enabled as autotune_enabled
from .backend import available_backends, triton_interpreted


def info_dict():
    from . import _C

    try:
        from ._build import CUDA_ARCHS
    except ImportError:
        CUDA_ARCHS = ""
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "pyops": __import__("pyops").__version__,
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "triton": triton_version,
        "triton interpreter (TRITON_INTERPRET=1)": triton_interpreted(),
        "CPU kernels": f"compiled ({_C.CPU_CAPABILITY})",
        "CUDA kernels": f"compiled for sm {CUDA_ARCHS}" if _C.WITH_CUDA else "not compiled",
        "GPUs": ", ".join(gpus) or "none visible",
        "backends": {d: available_backends(d) for d in devices},
        "optimizer steps on torch's path (tensor-steps, by reason)": _fallbacks(),
        "autotune": "on" if autotune_enabled() else "off (pyops.autotune() or PYOPS_AUTOTUNE=1)",
        "autotune cache": {"path": cache_path(), "entries": cache_entries()},
    }


def _fallbacks():
    from .optim import fallback_counts

    counts = fallback_counts()
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) or "none"


def info(file=None):
    """Print (and return) versions, the compiled kernels and the backends available per device."""
    d = info_dict()
    width = max(len(k) for k in d)
    for k, v in d.items():
        if k == "autotune cache":
            entries = v["entries"]
            print(f"{k:<{width}}  {v['path']} ({len(entries)} entries for this machine)", file=file)
            for key, b in entries.items():
                print(f"{'':<{width}}    {key} -> {b}", file=file)
            continue
        if isinstance(v, dict):
            v = "; ".join(f"{dev}: {', '.join(b)}" for dev, b in v.items())
        print(f"{k:<{width}}  {v}", file=file)
    return d


def saved_bytes(fn, *args):
    """Bytes that fn(*args) saves for backward: the distinct storages autograd packs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())

"""The microbenchmark harness: time each case on each backend against torch eager and
torch.compile of the reference; print a table, write CSV and a PNG plot.

CPU: time.perf_counter around synchronous calls, warm-up first, median of many repeats, inputs
rotated between several copies when they exceed the caches. CUDA: triton.testing.do_bench (CUDA
events), median. Effective GB/s counts the bytes each case must move at minimum.

The roofline: each row's GB/s as a share of the device's copy bandwidth (pct_copy_bw) and, where a
case counts flops on the CPU, its GFLOP/s as a share of the measured FMA peak (pct_peak): register-only
vector FMAs on as many threads as torch uses (pyops._C._fma_peak), not a datasheet figure. Both are
measured once per process and thread count.
"""

import csv
import dataclasses
import functools
import os
import statistics
import time
from typing import Callable, Optional

import torch

import pyops


@dataclasses.dataclass
class Case:
    """One benchmark case. `iteration(impl)` returns the function one timed iteration calls, over
    the inputs of `make_inputs()`: impl is "pyops" (the current backend), "eager" (the torch
    reference) or "compile" (torch.compile of the reference). For training cases, `forward(impl)`
    is the forward alone, to count the bytes it saves for backward."""

    family: str
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: tuple
    dtype: torch.dtype
    device: str
    min_bytes: int  # bytes the operation must move at minimum
    make_inputs: Callable[[], tuple]
    iteration: Callable[[str], Callable]
    forward: Optional[Callable[[str], Callable]] = None
    flops: Optional[int] = None
    compile_baseline: bool = True  # time torch.compile of the reference too (compiles cost minutes)
    # (label, impl) of the torch implementations to time and compare against; by default torch eager
    # ("eager") and torch.compile of it ("compile"). The first is the baseline of the plot.
    references: Optional[list] = None
    # Calls one iteration makes (tiny cases make many, so that neither the timer nor the backend switch
    # around an iteration counts); times are reported per call.
    calls: int = 1
    threads: Optional[int] = None  # torch.set_num_threads for the case (None: leave it)
    auto: bool = False  # time the "auto" selection beside the concrete backends
    # (label, impl, backend) timed beside the backends, as pyops rows compared with the references:
    # e.g. ("auto+compile", "pyops_compile", "auto"), torch.compile of the pyops side under `auto`
    variants: Optional[list] = None
    first_call: bool = False  # report each implementation's first call (its compile, if any), in s


@dataclasses.dataclass
class Result:
    case: Case
    backend: str
    ms: float
    saved_mb: Optional[float] = None
    peak_mb: Optional[float] = None
    speedups: dict = dataclasses.field(default_factory=dict)  # reference impl -> its time / ours
    copy_gbps: Optional[float] = None  # the device's copy bandwidth, measured in the same run
    peak_gflops: Optional[float] = None  # the CPU's measured FMA peak at the case's threads
    first_s: Optional[float] = None  # the first call's seconds (torch.compile compiles there)

    @property
    def gbps(self):
        return self.case.min_bytes / (self.ms * 1e-3) / 1e9

    @property
    def gflops(self):
        return self.case.flops / (self.ms * 1e-3) / 1e9 if self.case.flops else None

    def row(self):
        c = self.case
        return {
            "family": c.family,
            "op": c.op,
            "mode": c.mode,
            "shape": "x".join(map(str, c.shape)) or "()",
            "dtype": str(c.dtype).replace("torch.", ""),
            "device": c.device,
            "backend": self.backend,
            "median_ms": f"{self.ms:.4f}",
            "GB/s": f"{self.gbps:.1f}" if c.min_bytes else "",
            "median_us": f"{self.ms * 1e3:.2f}" if c.calls > 1 else "",
            "GFLOP/s": f"{self.gflops:.1f}" if c.flops else "",
            **{f"vs_{impl}": f"{x:.2f}" for impl, x in self.speedups.items()},
            "saved_MB": f"{self.saved_mb:.2f}" if self.saved_mb is not None else "",
            "peak_MB": f"{self.peak_mb:.1f}" if self.peak_mb is not None else "",
            "pct_copy_bw": _pct(self.gbps, self.copy_gbps) if c.min_bytes else "",
            "pct_peak": _pct(self.gflops, self.peak_gflops) if c.flops else "",
            "copy_GB/s": f"{self.copy_gbps:.1f}" if self.copy_gbps and c.min_bytes else "",
            "peak_GFLOP/s": f"{self.peak_gflops:.1f}" if self.peak_gflops and c.flops else "",
            "first_s": f"{self.first_s:.2f}" if self.first_s is not None else "",
        }


def _pct(value, ceiling):
    """value as a percentage of ceiling: whole percents, one decimal below 10%, two below 1%."""
    if not value or not ceiling:
        return ""
    pct = 100 * value / ceiling
    return f"{pct:.0f}" if pct >= 10 else f"{pct:.1f}" if pct >= 1 else f"{pct:.2f}"


def _rotations(case):
    """Enough input copies that consecutive iterations do not find theirs in cache (~64 MB apart)."""
    per_set = case.min_bytes
    return max(1, min(4, (64 << 20) // max(per_set, 1) + 1)) if case.device == "cpu" else 1


def time_cpu(fns, input_sets, repeats, warmup=3, first=None):
    """Median ms of each function. Timings on a shared CPU drift, so the functions take turns,
    one iteration each per round, and every ratio compares iterations run side by side. The warm-up
    (where torch.compile compiles) is outside the timed rounds; `first`, a list, receives the
    seconds of each function's first call."""
    for fn in fns:
        t0 = time.perf_counter()
        for i in range(warmup):
            fn(*input_sets[i % len(input_sets)])
            if i == 0 and first is not None:
                first.append(time.perf_counter() - t0)
    times = [[] for _ in fns]
    for i in range(repeats):
        args = input_sets[i % len(input_sets)]
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(*args)
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def time_cuda(fns, input_sets, repeats):
    """Median ms of each function, with CUDA events (triton.testing.do_bench)."""
    import triton.testing

    def bench(fn):
        state = {"i": 0}

        def step():
            fn(*input_sets[state["i"] % len(input_sets)])
            state["i"] += 1

        return triton.testing.do_bench(step, warmup=25, rep=max(50, repeats * 2), return_mode="median")

    return [bench(fn) for fn in fns]


def saved_megabytes(fn, inputs):
    """Bytes saved for backward by one forward (distinct storages), in MB."""
    return pyops.saved_bytes(fn, *inputs) / 1e6


def _in_backend(fn, backend):
    if backend is None:
        return fn

    def run(*args):
        with pyops.backend(backend):
            return fn(*args)

    return run


def copy_bandwidth(device):
    """GB/s of a large device-to-device copy (bytes read + written): the ceiling of memory-bound ops.
    On the CPU, dst.copy_(src) of 128 MB (4x a 32 MB L3) at torch's thread count, median of 10."""
    if device == "cuda":
        x = torch.empty(1 << 26, device="cuda")
        (ms,) = time_cuda([lambda t: t.clone()], [(x,)], 50)
        return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9
    if device == "cpu":
        return _cpu_copy_bandwidth(torch.get_num_threads())
    return None


@functools.cache
def _cpu_copy_bandwidth(threads, numel=1 << 25):
    src = torch.ones(numel)  # written once, so that every page is mapped before the timing
    dst = torch.zeros(numel)
    (ms,) = time_cpu([lambda s, d: d.copy_(s)], [(src, dst)], repeats=10, warmup=2)
    return 2 * numel * src.element_size() / (ms * 1e-3) / 1e9


def fma_peak(device):
    """GFLOP/s of register-only vector FMAs on one core (pyops._C._fma_peak: 12 independent accumulators,
    the vector width the CPU kernels are built for), the best of three 0.1 s runs, times torch's thread
    count: the ceiling of compute-bound ops. One core times the threads, not all threads at once, so that
    another process on a shared machine lowers the achieved figures, not the ceiling. None off the CPU."""
    return _cpu_fma_peak_1() * torch.get_num_threads() if device == "cpu" else None


@functools.cache
def _cpu_fma_peak_1():
    return max(pyops._C._fma_peak(1, 0.1) for _ in range(3))


def measure(case, backends, repeats, with_compile=True, copy_gbps=None, roofline=False):
    """Results for the torch references (eager and torch.compile unless the case names others) and
    each pyops backend, timed side by side. With `roofline`, on the CPU, the copy bandwidth and FMA
    peak at the case's thread count (measured once per process and thread count)."""
    refs = case.references or [("torch eager", "eager"), ("torch.compile", "compile")]
    refs = [(label, impl) for label, impl in refs if impl != "compile" or (with_compile and case.compile_baseline)]
    threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        peak = None
        if roofline and case.device == "cpu":
            copy_gbps = copy_bandwidth("cpu") if case.min_bytes else None
            peak = fma_peak("cpu") if case.flops else None
        variants = [v for v in case.variants or [] if with_compile or "compile" not in v[1]]
        backends = list(backends) + (["auto"] if case.auto else [])
        results = _measure(case, refs, backends, variants, repeats, copy_gbps)
        for r in results:
            r.peak_gflops = peak
        return results
    finally:
        torch.set_num_threads(threads)


def _measure(case, refs, backends, variants, repeats, copy_gbps):
    sets = [case.make_inputs() for _ in range(_rotations(case))]
    impls = [(label, impl, None) for label, impl in refs] + [(b, "pyops", b) for b in backends]
    impls += variants
    fns = [_in_backend(case.iteration(impl), b) for _, impl, b in impls]
    first = [] if case.first_call and case.device == "cpu" else None
    times = time_cuda(fns, sets, repeats) if case.device == "cuda" else time_cpu(fns, sets, repeats, first=first)
    results = [Result(case, label, ms / case.calls) for (label, _, _), ms in zip(impls, times)]
    for k, (r, (_, impl, b)) in enumerate(zip(results, impls)):
        r.copy_gbps = copy_gbps
        r.first_s = first[k] if first else None
        if case.forward is not None and "compile" not in impl:
            r.saved_mb = saved_megabytes(_in_backend(case.forward(impl), b), sets[0])
        if case.device == "cuda":  # peak memory of one more iteration
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _in_backend(case.iteration(impl), b)(*sets[0])
            r.peak_mb = torch.cuda.max_memory_allocated() / 1e6
    for r in results[len(refs) :]:
        r.speedups = {impl: ref.ms / r.ms for (_, impl), ref in zip(refs, results)}
    return results


COLUMNS = [
    "op",
    "mode",
    "shape",
    "dtype",
    "backend",
    "median_ms",
    "first_s",
    "GB/s",
    "pct_copy_bw",
    "vs_eager",
    "vs_compile",
    "saved_MB",
    "peak_MB",
]


def _columns(rows, columns=COLUMNS):
    """columns, with any other vs_<reference> columns the rows carry, in first-seen order."""
    extra = [k for row in rows for k in row if k.startswith("vs_") and k not in columns]
    cols = columns[: columns.index("saved_MB")] + list(dict.fromkeys(extra)) + columns[columns.index("saved_MB") :]
    return [c for c in cols if any(row.get(c) for row in rows)]


def print_table(results, file=None, columns=COLUMNS, headers=None):
    """The rows' non-empty `columns` (which must include saved_MB), each headed by its name or
    headers[name]."""
    rows = [r.row() for r in results]
    cols = _columns(rows, columns)
    headers = {c: (headers or {}).get(c, c) for c in cols}
    widths = {c: max(len(headers[c]), *(len(row.get(c, "")) for row in rows)) for c in cols}
    print("  ".join(headers[c].ljust(widths[c]) for c in cols), file=file)
    for row in rows:
        print("  ".join(row.get(c, "").ljust(widths[c]) for c in cols), file=file)


def write_csv(results, path, machine):
    rows = [dict(r.row(), machine=machine) for r in results]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def write_plot(results, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pyops_results = [r for r in results if r.speedups]
    labels = sorted(
        {f"{r.case.op} {r.case.mode}\n{r.row()['shape']} {r.row()['dtype']}" for r in pyops_results}, key=lambda s: s
    )
    backends = sorted({r.backend for r in pyops_results})
    fig, ax = plt.subplots(figsize=(min(18, max(6, len(labels) * 0.45)), 5))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        vals = []
        for lab in labels:
            match = [
                next(iter(r.speedups.values()))
                for r in pyops_results
                if r.backend == b and f"{r.case.op} {r.case.mode}\n{r.row()['shape']} {r.row()['dtype']}" == lab
            ]
            vals.append(match[0] if match else 0)
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=b)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over the first torch reference")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def steady_malloc():
    """Stop glibc from trimming and re-growing its heap between iterations (mallopt). Otherwise a
    case's time swings by the page faults of re-growing it, which depend on the order and total of
    unrelated allocations (measured: a 0.5 MB mask next to two 16 MB tensors pushed the heap past
    the trim threshold, ~290 faults per iteration, 10-40% of a 4M-element fwd+bwd). Applies to torch
    and pyops alike; returns whether it took effect."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1
    return ok and (libc.mallopt(m_mmap_threshold, 1 << 30) == 1 or libc.mallopt(m_mmap_threshold, 32 << 20) == 1)


def run(families, device, quick, out_dir, with_compile=True, backends=None, file=None, keep_malloc=False):
    import importlib

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    steady = device == "cpu" and not keep_malloc and steady_malloc()
    if backends is None:
        backends = [b for b in pyops.available_backends(device) if b != "torch"]
        if device == "cpu":  # the Triton interpreter is a test vehicle, not something to time
            backends = [b for b in backends if b != "triton"]
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_name(device)
    copy_gbps = copy_bandwidth(device) if families else None
    if copy_gbps:
        print(f"# device copy bandwidth: {copy_gbps:.0f} GB/s", file=file)
    all_results = []
    for family in families:
        module = importlib.import_module(f"bench.{family}")
        results = []
        stem = os.path.join(out_dir, f"{family}_{device}")
        for case in module.cases(device, quick):
            results += measure(
                case,
                backends,
                repeats=10 if quick else 50,
                with_compile=with_compile,
                copy_gbps=copy_gbps,
                roofline=True,
            )
            write_csv(results, stem + ".csv", machine)  # after every case: a cut-off run keeps its rows
        print(
            f"# {family} on {device}: {machine}, torch {torch.__version__}"
            + (", glibc heap trimming off" if steady else ""),
            file=file,
        )
        getattr(module, "print_table", print_table)(results, file=file)  # a family may print its own
        write_plot(results, stem + ".png", f"pyops {family} on {machine}")
        all_results += results
    return all_results

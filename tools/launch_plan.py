"""The launch plan: every kernel launch of the README's benchmark shapes, forward and backward, with its
grid, threads, registers and shared memory, and the occupancy and waves it gets on an H100 SXM. No GPU
is needed: nothing runs.

Triton rows: the ops run through pyops (`pyops.backend("triton")`, so the C++ host side decides every
launch) on tensors of the real shapes while tests/launches.py intercepts each `kernel[grid](...)`, so no
kernel runs (on the CPU under TRITON_INTERPRET=1, which this script sets when no GPU is visible). Each
distinct launch (kernel, argument types, constexprs, num_warps, num_stages) is compiled ahead of time
for sm_90 (tools/triton_aot.py's source builder) in a subprocess without TRITON_INTERPRET; registers
come from ptxas' report, shared memory from the compiled kernel's metadata. Results are cached under
build/launch_plan/, keyed by the kernel files' text, the launch and the Triton version.

CUDA rows: `pyops._C._cuda_launch_plan(op, sizes)` (csrc/common/launch_plan.h), the host functions the
CUDA launchers take their configuration from, called once a case with the op's sizes; it returns every
kernel the op launches, forward and backward: [{"kernel", "grid": (x, y, z), "block": (x, y, z),
"smem": dynamic bytes, "elements": elements the launch reads or writes, "why": why it may stay under
two waves, or ""}]. Registers and static shared memory come from
`cuobjdump --dump-resource-usage` of the built extension's sm_90 code, matched by the kernel's name
(its template instantiation for the case's dtype); with an extension built without CUDA code, from
compiling csrc/cuda/*.cu to sm_90 cubins with nvcc (`--nvcc`: ~30 s a file; cached like the Triton
compiles). Without `_cuda_launch_plan` the CUDA rows are left out, with a note.

Occupancy follows CUDA's occupancy calculator for compute capability 9.0: blocks per SM limited by
threads (2048), warps (64) and blocks (32) per SM, registers (65536 per SM in 4 sub-partitions,
allocated per warp in units of 256) and shared memory (228 KB per SM, 1 KB reserved per block,
allocated in 128-byte units). Waves = blocks / (132 SMs x blocks per SM). A launch touching >= 1M
elements (the most of any tensor argument; an optimizer's update kernel, which reads its tensors
through a table, counts the parameters) must make at least 2 waves, unless its kernels module lists
it in `LAUNCH_EXEMPTIONS = {"kernel name": "why"}` (Triton) or its plan entry says "exempt" (CUDA).
A CUDA launch whose registers are unknown is judged at the occupancy threads and shared memory allow
(its most blocks per SM, so its fewest waves).

    python tools/launch_plan.py [--dtype float32] [--nvcc] [--json FILE]

prints the table in Markdown and exits 1 if a large launch is under 2 waves (tests/test_launch_plan.py
checks the same).
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "launch_plan"
LARGE = 1 << 20  # elements a launch touches from which it must fill the GPU
MIN_WAVES = 2.0


# ---- the H100 SXM and the occupancy model ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM (sm_90)"
    sms: int = 132
    threads_per_sm: int = 2048
    warps_per_sm: int = 64
    blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of this
    sub_partitions: int = 4
    max_regs_per_thread: int = 255
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved: int = 1024  # per block, by the system
    smem_unit: int = 128


H100 = Gpu()


def _round_up(x, unit):
    return -(-x // unit) * unit


def occupancy(threads, regs, smem, gpu=H100):
    """(blocks per SM, what limits it) for a block of `threads` threads using `regs` registers a
    thread (None: unknown, not a limit) and `smem` bytes of shared memory (static + dynamic), as CUDA's
    occupancy calculator computes it for compute capability 9.0. 0 blocks: the block cannot launch."""
    warps = -(-threads // 32)
    limits = {
        "blocks": gpu.blocks_per_sm,
        "threads": min(gpu.threads_per_sm // (warps * 32), gpu.warps_per_sm // warps),
    }
    if regs is not None and regs > 0:
        per_warp = _round_up(regs * 32, gpu.reg_unit)
        # the hardware checks a block against the per-block limit as if every sub-partition held it
        assumed = per_warp * _round_up(warps, gpu.sub_partitions)
        if regs > gpu.max_regs_per_thread or assumed > gpu.regs_per_block:
            limits["registers"] = 0
        else:
            per_partition = (gpu.regs_per_sm // gpu.sub_partitions) // per_warp
            limits["registers"] = per_partition * gpu.sub_partitions // warps
    used = _round_up(smem + gpu.smem_reserved, gpu.smem_unit)
    limits["shared memory"] = 0 if smem > gpu.smem_per_block else gpu.smem_per_sm // used
    limiter = min(limits, key=lambda k: (limits[k], k != "threads"))
    return limits[limiter], limiter


# ---- the cases: the README's benchmark shapes ------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One op at one shape: forward(F, tensors) -> output, then backward on it (a step for optimizers)."""

    name: str
    family: str
    elements: int
    setup: object  # (device, dtype) -> state
    forward: object  # (pyops.functional, state) -> output or None
    backward: object  # (state, output) -> None
    cuda: list  # [(op, sizes)] for _C._cuda_launch_plan


def _empty(shape, device, dtype, channels_last=False, grad=False):
    import torch

    t = torch.empty(shape, device=device, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _grad_of(y):
    import torch

    y.backward(torch.empty_like(y))


def _bn_case(shape, channels_last):
    n, c, h, w = shape

    def setup(device, dtype):
        import torch

        side = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        return {
            "x": _empty(shape, device, dtype, channels_last, grad=True),
            "w": _empty(c, device, side, grad=True),
            "b": _empty(c, device, side, grad=True),
            "rm": torch.zeros(c, device=device, dtype=side),
            "rv": torch.ones(c, device=device, dtype=side),
        }

    def forward(F, s):
        return F.batch_norm(s["x"], s["rm"], s["rv"], s["w"], s["b"], True, activation="relu")

    sizes = {"shape": shape, "channels_last": int(channels_last), "training": 1}
    layout = "channels_last" if channels_last else "NCHW"
    return Case(
        f"batch_norm {shape} {layout}",
        "batch_norm",
        math.prod(shape),
        setup,
        forward,
        lambda s, y: _grad_of(y),
        [("batch_norm", sizes)],
    )


def _conv_case(label, shape, k, groups):
    n, c, h, w = shape

    def setup(device, dtype):
        return {
            "x": _empty(shape, device, dtype, grad=True),
            "w": _empty((k, c // groups, 3, 3), device, dtype, grad=True),
            "b": _empty(k, device, dtype, grad=True),
        }

    def forward(F, s):
        return F.conv2d(s["x"], s["w"], s["b"], padding=1, groups=groups)

    sizes = {"shape": shape, "weight": (k, c // groups, 3, 3), "groups": groups, "stride": 1, "padding": 1}
    sizes |= {"dilation": 1, "training": 1}
    return Case(
        f"conv2d {label} {shape} k={k} g={groups}",
        "conv",
        math.prod(shape),
        setup,
        forward,
        lambda s, y: _grad_of(y),
        [("conv2d", sizes)],
    )


ACT_SHAPE = (4096, 1024)


def _activation_case(op, kwargs):
    def setup(device, dtype):
        return {"x": _empty(ACT_SHAPE, device, dtype, grad=True)}

    def forward(F, s):
        return getattr(F, op)(s["x"], **kwargs)

    n = math.prod(ACT_SHAPE)
    sizes = {"numel": n, "pieces": kwargs["pieces"]} if op == "maxout" else {"numel": n}
    return Case(
        f"{op} {ACT_SHAPE}",
        "activation",
        n,
        setup,
        forward,
        lambda s, y: _grad_of(y),
        [(op, sizes)],
    )


def _loss_case(op):
    def setup(device, dtype):
        return {"x": _empty(ACT_SHAPE, device, dtype, grad=True), "t": _empty(ACT_SHAPE, device, dtype)}

    def forward(F, s):
        return getattr(F, op)(s["x"], s["t"], reduction="mean")

    n = math.prod(ACT_SHAPE)
    sizes = {"numel": n, "reduction": "mean"}
    return Case(
        f"{op} {ACT_SHAPE} mean",
        "loss",
        n,
        setup,
        forward,
        lambda s, y: y.backward(),
        [(op, sizes)],
    )


def _cross_entropy_case(shape):
    rows, classes = shape

    def setup(device, dtype):
        import torch

        return {"x": _empty(shape, device, dtype, grad=True), "t": torch.zeros(rows, device=device, dtype=torch.int64)}

    def forward(F, s):
        return F.cross_entropy(s["x"], s["t"])

    sizes = {"rows": rows, "classes": classes}
    return Case(
        f"cross_entropy {shape} mean",
        "loss",
        rows * classes,
        setup,
        forward,
        lambda s, y: y.backward(),
        [("cross_entropy", sizes)],
    )


def _resnet18_shapes():
    """ResNet-18's parameter shapes, the set the optim bench steps (bench/optim.py; it imports pyops, so
    this runs only once the Triton interpreter's setting is in place: cases() comes after it)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.optim import resnet18_shapes

    return resnet18_shapes()


def _optim_case(name, kwargs, prim):
    shapes = _resnet18_shapes()

    def setup(device, dtype):
        import torch

        params = [torch.empty(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        return {"params": params}

    def step(s, _):
        import pyops.optim

        getattr(pyops.optim, name)(s["params"], lr=1e-3, **kwargs).step()

    numels = [math.prod(s) for s in shapes]
    sizes = {"numels": numels}
    return Case(
        f"{name} ResNet-18 ({sum(numels) / 1e6:.1f}M, {len(shapes)} tensors)",
        "optim",
        sum(numels),
        setup,
        lambda F, s: None,
        step,
        [(name.lower(), sizes)],
    )


def cases():
    """The README's benchmark shapes, each op forward and backward (optimizers: one step)."""
    return [
        _bn_case((32, 64, 56, 56), False),
        _bn_case((32, 64, 56, 56), True),
        _bn_case((256, 256, 14, 14), False),
        _conv_case("depthwise", (16, 64, 56, 56), 64, 64),
        _conv_case("grouped", (16, 128, 28, 28), 128, 32),
        _conv_case("dense", (32, 64, 56, 56), 64, 1),
        _activation_case("relu", {}),
        _activation_case("leaky_relu", {"negative_slope": 0.01}),
        _activation_case("elu", {}),
        _activation_case("sigmoid", {}),
        _activation_case("tanh", {}),
        _activation_case("maxout", {"pieces": 4, "dim": 1}),
        _loss_case("l1_loss"),
        _loss_case("mse_loss"),
        _loss_case("huber_loss"),
        _loss_case("rmse_loss"),
        _cross_entropy_case((4096, 1000)),
        _cross_entropy_case((256, 32000)),
        _optim_case("SGD", {"momentum": 0.9}, "sgd_step_"),
        _optim_case("Adam", {}, "adam_step_"),
        _optim_case("AdamW", {}, "adam_step_"),
        _optim_case("Adagrad", {}, "adagrad_step_"),
        _optim_case("RMSprop", {}, "rmsprop_step_"),
    ]


# ---- rows ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    case: str
    phase: str  # fwd, bwd, step
    backend: str  # triton, cuda
    kernel: str
    grid: tuple
    threads: int
    regs: object  # int, or None where unknown
    smem: object  # bytes (static + dynamic), None where unknown
    elements: int
    exempt: str = ""
    note: str = ""
    blocks_per_sm: int = 0
    limiter: str = ""
    waves: float = 0.0

    @property
    def blocks(self):
        return math.prod(self.grid)

    @property
    def large(self):
        return self.elements >= LARGE

    def judge(self, gpu=H100):
        self.blocks_per_sm, self.limiter = occupancy(self.threads, self.regs, self.smem or 0, gpu)
        self.waves = self.blocks / (gpu.sms * self.blocks_per_sm) if self.blocks_per_sm else 0.0
        return self

    @property
    def under(self):
        """A large launch under MIN_WAVES with no exemption (or one that cannot launch)."""
        return self.blocks_per_sm == 0 or (self.large and not self.exempt and self.waves < MIN_WAVES)

    def verdict(self):
        if self.blocks_per_sm == 0:
            return f"CANNOT LAUNCH ({self.limiter})"
        if not self.large:
            return "small"
        if self.waves >= MIN_WAVES:
            return "ok"
        return f"exempt: {self.exempt}" if self.exempt else f"UNDER {MIN_WAVES:g} WAVES"


def _elements_text(n):
    return f"{n / 1e6:.1f}M" if n >= 100_000 else str(n)


def markdown(rows, gpu=H100):
    """The table in Markdown, one line per launch."""
    head = (
        "| case | pass | backend | kernel | grid | blocks | threads | regs | smem B | elements "
        "| blocks/SM (limit) | waves | verdict |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        grid = "x".join(str(g) for g in r.grid)
        regs = "?" if r.regs is None else str(r.regs)
        smem = "?" if r.smem is None else str(r.smem)
        note = f" ({r.note})" if r.note else ""
        lines.append(
            f"| {r.case} | {r.phase} | {r.backend} | `{r.kernel}` | {grid} | {r.blocks} | {r.threads} | {regs} "
            f"| {smem} | {_elements_text(r.elements)} | {r.blocks_per_sm} ({r.limiter}) | {r.waves:.2f} "
            f"| {r.verdict()}{note} |"
        )
    return "\n".join(lines)


# ---- Triton: record the launches, compile them ahead of time --------------------------------------
def _load_by_path(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _launches_module():
    return _load_by_path("launches", ROOT / "tests" / "launches.py")


def _aot_module():
    return _load_by_path("_pyops_triton_aot", ROOT / "tools" / "triton_aot.py")


def _prepare_triton_cpu():
    """Triton launches on CPU tensors need TRITON_INTERPRET=1 read before pyops imports its kernels."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if "pyops" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "tools/launch_plan.py: without a GPU, Triton's launches are recorded under TRITON_INTERPRET=1, "
            "which must be set before pyops is imported"
        )
    return "cpu"


def _jsonable(v):
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        v = v.value
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"tools/launch_plan.py: no rule to carry the constexpr value {v!r}")


def _fromjson(v):
    import triton.language as tl

    return tl.dtype(v["dtype"]) if isinstance(v, dict) else v


def _module_file(module_name):
    return Path(sys.modules[module_name].__file__).resolve()


def _kernel_sources_hash(module_name):
    """The text of the kernel's family file and every shared kernels/_*.py it may import."""
    path = _module_file(module_name)
    h = hashlib.sha256()
    for p in [path] + sorted(path.parent.glob("_*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _triton_launch(case, phase, launch, exemptions_of):
    """(Row, compile job) of one recorded launch."""
    import torch

    fn = launch.fn
    params = list(inspect.signature(fn).parameters)
    values = dict(zip(params, launch.args)) | launch.kwargs
    grid = launch.grid(values) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in (tuple(grid) + (1, 1, 1))[:3])
    signature, constexprs = launch.specialisation()
    options = {k: v for k, v in launch.kwargs.items() if k not in params}
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    tensors = [a for a in values.values() if isinstance(a, torch.Tensor)]
    elements = max((t.numel() for t in tensors), default=0)
    module = sys.modules[fn.__module__]
    if fn.__name__ in _indirect_kernels(module):
        elements = case.elements
    family = fn.__module__.rsplit(".", 1)[-1]
    import triton

    job = {
        "family": family,
        "kernel": fn.__name__,
        "signature": signature,
        "constexprs": {k: _jsonable(v) for k, v in constexprs.items()},
        "options": options,
        "target": 90,
        "triton": triton.__version__,
    }
    job["key"] = hashlib.sha256(
        (json.dumps(job, sort_keys=True) + _kernel_sources_hash(fn.__module__)).encode()
    ).hexdigest()[:32]
    row = Row(
        case.name,
        phase,
        "triton",
        fn.__name__,
        grid,
        options["num_warps"] * 32,
        None,
        None,
        elements,
        exempt=exemptions_of(module).get(fn.__name__, ""),
    )
    return row, job


def _indirect_kernels(module):
    """Kernels that reach their tensors through a pointer table (the optimizers' update kernels):
    they touch the case's elements, which their arguments do not show."""
    table = getattr(module, "UPDATE_KERNELS", None)
    if isinstance(table, dict):
        return {getattr(getattr(k, "fn", k), "__name__", "") for k in table.values()}
    return set()


def _exemptions(module):
    return dict(getattr(module, "LAUNCH_EXEMPTIONS", {}) or {})


def record_triton(selected=None, dtype_name="float32"):
    """[(Row, compile job)] of every Triton launch of the cases (forward, then backward)."""
    device = _prepare_triton_cpu()
    import torch

    import pyops
    import pyops.functional as F

    record_launches = _launches_module().record_launches
    dtype = getattr(torch, dtype_name)
    out = []
    for case in selected or cases():
        state = case.setup(device, dtype)
        with pyops.backend("triton"):
            with record_launches(run=False) as fwd:
                y = case.forward(F, state)
            with record_launches(run=False) as bwd:
                case.backward(state, y)
        if not fwd and not bwd:
            raise RuntimeError(f"tools/launch_plan.py: {case.name}: no Triton launch recorded")
        for phase, launches in (("fwd", fwd), ("step" if case.family == "optim" else "bwd", bwd)):
            out += [_triton_launch(case, phase, la, _exemptions) for la in launches]
        del state, y
    return out


def _write_atomic(path, text):
    """Write by renaming a finished file into place: a test run beside another never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cached(key):
    path = CACHE / f"triton-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


def compile_triton(jobs, timeout=900):
    """{key: {"registers", "shared", "spills"} or {"error"}} for the jobs, compiling those not cached in
    a subprocess (TRITON_INTERPRET unset there) and caching what it returns."""
    results, todo = {}, {}
    for job in jobs:
        got = _cached(job["key"])
        if got is not None:
            results[job["key"]] = got
        else:
            todo[job["key"]] = job
    if todo:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
        proc = subprocess.run(
            [sys.executable, __file__, "--compile-jobs"],
            input=json.dumps(list(todo.values())),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"tools/launch_plan.py: the Triton compile failed:\n{proc.stderr[-4000:]}")
        CACHE.mkdir(parents=True, exist_ok=True)
        for key, result in json.loads(proc.stdout.splitlines()[-1]).items():
            results[key] = result
            if "error" not in result:
                _write_atomic(CACHE / f"triton-{key}.json", json.dumps(result))
    return results


def _compile_one(job):
    """Compile one launch for sm_90 (in the compile subprocess)."""
    import io
    from contextlib import redirect_stdout

    import triton
    from triton.backends.compiler import GPUTarget

    aot = _aot_module()
    try:
        fn = getattr(aot.load_kernels(job["family"]), job["kernel"])
        constexprs = {k: _fromjson(v) for k, v in job["constexprs"].items()}
        source = aot._source(fn, job["signature"], constexprs)
        log = io.StringIO()
        with redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", job["target"], 32), options=job["options"])
        regs, spills = aot._ptxas_stats(log.getvalue())
        if regs is None:
            regs = _cubin_registers(compiled.asm["cubin"], job["kernel"])
        return {"registers": regs, "shared": compiled.metadata.shared, "spills": spills}
    except Exception as e:  # reported per launch
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


def _compile_main():
    jobs = json.loads(sys.stdin.read())
    n = min(len(jobs), int(os.environ.get("PYOPS_AOT_JOBS", min(4, os.cpu_count() or 1))))
    if n > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _aot_module()  # loaded before the fork
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, jobs))
    else:
        results = [_compile_one(j) for j in jobs]
    print(json.dumps({j["key"]: r for j, r in zip(jobs, results)}))


def triton_rows(selected=None, dtype_name="float32"):
    """The Triton rows, judged."""
    recorded = record_triton(selected, dtype_name)
    unique = {job["key"]: job for _, job in recorded}
    compiled = compile_triton(list(unique.values()))
    rows = []
    for row, job in recorded:
        c = compiled.get(job["key"], {"error": "not compiled"})
        if "error" in c:
            row.note = "compile failed: " + c["error"].splitlines()[-1][:200]
        else:
            row.regs, row.smem = c["registers"], c["shared"]
            if c.get("spills"):
                row.note = f"spills {c['spills']} B"
        rows.append(row.judge())
    return rows


# ---- CUDA: the launchers' plan, registers from ptxas ------------------------------------------------
CUDA_TYPES = {"float64": "double", "float32": "float", "float16": "c10::Half", "bfloat16": "c10::BFloat16"}


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text):
    """{demangled kernel: {"registers", "shared", "stack", "local"}} from cuobjdump --dump-resource-usage."""
    found = RESOURCE.findall(text)
    names = _demangle([f[0] for f in found])
    return {
        name: {"registers": int(r), "stack": int(st), "shared": int(sh), "local": int(lo)}
        for name, (_, r, st, sh, lo) in zip(names, found)
    }


def _cubin_registers(cubin, kernel):
    tool = _cuobjdump()
    if tool is None:
        return None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = [v["registers"] for k, v in parse_resource_usage(text).items() if kernel in k]
    return max(usage) if usage else None


def extension_resources(so_path):
    """The sm_90 kernels' resource usage in the built extension ({} when it has no CUDA code)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    proc = subprocess.run(
        [tool, "--dump-resource-usage", "-arch", "sm_90", str(so_path)], capture_output=True, text=True
    )
    return parse_resource_usage(proc.stdout) if proc.returncode == 0 else {}


def _nvcc_flags():
    import sysconfig

    from torch.utils import cpp_extension

    includes = [str(ROOT / "csrc")] + cpp_extension.include_paths(device_type="cuda")
    for sp in sys.path:
        includes += sorted(str(p) for p in Path(sp).glob("nvidia/*/include")) if sp and Path(sp).is_dir() else []
    includes.append(sysconfig.get_paths()["include"])
    flags = ["-cubin", "-arch=sm_90", "-O3", "-std=c++20", "-DPYOPS_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += ["-DTORCH_EXTENSION_NAME=_C"] + list(cpp_extension.COMMON_NVCC_FLAGS)
    return flags + [f"-I{p}" for p in dict.fromkeys(includes)]


def nvcc_resources(compile_missing=False):
    """Resource usage of csrc/cuda/*.cu compiled for sm_90 with nvcc, cached per file (keyed by the
    file, every csrc header and the nvcc version). Files not cached compile only with compile_missing."""
    nvcc = shutil.which("nvcc")
    headers = hashlib.sha256()
    for p in sorted((ROOT / "csrc").rglob("*.h")):
        headers.update(p.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    usage, missing = {}, []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        key = hashlib.sha256(cu.read_bytes() + headers.digest() + version.encode()).hexdigest()[:32]
        path = CACHE / f"cuda-{cu.stem}-{key}.json"
        if path.exists():
            usage |= json.loads(path.read_text())
            continue
        if not (compile_missing and nvcc):
            missing.append(cu.name)
            continue
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{cu.stem}.cubin"
            proc = subprocess.run([nvcc, *_nvcc_flags(), "-o", str(out), str(cu)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"tools/launch_plan.py: nvcc {cu.name} failed:\n{proc.stderr[-4000:]}")
            tool = _cuobjdump()
            text = subprocess.run([tool, "--dump-resource-usage", str(out)], capture_output=True, text=True).stdout
        found = parse_resource_usage(text)
        CACHE.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(found))
        usage |= found
    return usage, missing


def _base_name(demangled):
    """`stats_partial_kernel` of `void pyops::(anonymous namespace)::stats_partial_kernel<float>(...)`."""
    head = demangled.replace("(anonymous namespace)", "anon").split("(", 1)[0].split("<", 1)[0]
    return head.rsplit("::", 1)[-1].split()[-1]


def match_resources(kernel, dtype_name, usage):
    """The resource usage of the plan's `kernel` (a name, perhaps with template arguments) for the dtype:
    the instantiations of that name whose first template argument is the dtype's C type (and whose
    text holds the plan's template arguments); (fewest registers, their static shared memory, how many
    matched) over them, or None."""
    base = kernel.split("<", 1)[0].strip()
    args = kernel[len(base) :].strip("<> ")
    ctype = CUDA_TYPES.get(dtype_name)
    same = [(name, u) for name, u in usage.items() if _base_name(name) == base]
    if ctype:
        typed = [(n, u) for n, u in same if re.search(rf"{re.escape(base)}<{re.escape(ctype)}\b", n)]
        same = typed or same
    if args:
        same = [(n, u) for n, u in same if all(a.strip() in n for a in args.split(","))] or same
    if not same:
        return None
    best = min(same, key=lambda nu: nu[1]["registers"])[1]
    return best["registers"], best["shared"], len(same)


def cuda_plan_function():
    try:
        from pyops import _C
    except ImportError:
        return None
    return getattr(_C, "_cuda_launch_plan", None)


def cuda_rows(selected=None, dtype_name="float32", compile_missing=False):
    """(rows, notes) of the native CUDA launches from _C._cuda_launch_plan; rows empty, with a note,
    when the extension has no such function."""
    plan = cuda_plan_function()
    if plan is None:
        return [], ["pyops._C has no _cuda_launch_plan: the CUDA launchers' plan is not available, CUDA rows left out"]
    from pyops import _C

    notes = []
    usage = extension_resources(_C.__file__)
    if usage:
        notes.append("CUDA registers: cuobjdump of the built extension's sm_90 code")
    else:
        usage, missing = nvcc_resources(compile_missing)
        if usage:
            notes.append("CUDA registers: nvcc's sm_90 compile of csrc/cuda/*.cu (cached under build/launch_plan/)")
        if missing:
            notes.append(
                f"CUDA registers unknown for {', '.join(missing)} (the extension has no sm_90 code; "
                "`python tools/launch_plan.py --nvcc` compiles them): judged at the occupancy threads and "
                "shared memory allow"
            )
    rows = []
    for case in selected or cases():
        for prim, sizes in case.cuda:
            query = dict(sizes, dtype=dtype_name, element_size=_element_size(dtype_name))
            try:
                entries = list(plan(prim, query))
            except Exception as e:  # the plan and this table disagree on an op's name or sizes: say which
                raise RuntimeError(
                    f"tools/launch_plan.py: _C._cuda_launch_plan({prim!r}, {query}) for {case.name} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
            for e in entries:
                grid = tuple(int(g) for g in (tuple(e["grid"]) + (1, 1, 1))[:3])
                block = tuple(int(b) for b in (tuple(e["block"]) + (1, 1, 1))[:3])
                found = match_resources(str(e["kernel"]), dtype_name, usage)
                regs, static = (found[0], found[1]) if found else (None, 0)
                row = Row(
                    case.name,
                    _phase(case, str(e["kernel"])),
                    "cuda",
                    str(e["kernel"]),
                    grid,
                    math.prod(block),
                    regs,
                    int(e.get("smem", 0)) + static,
                    int(e.get("elements", case.elements)),
                    exempt=str(e.get("why", "") or ""),
                    note="" if found or not usage else "no resource usage found for this name",
                )
                rows.append(row.judge())
    return rows, notes


def _element_size(dtype_name):
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype_name]


def _phase(case, kernel):
    """A CUDA launch's phase, from its case and kernel name (the plan lists forward and backward)."""
    if case.family == "optim":
        return "step"
    return "bwd" if "bwd" in kernel or "grad" in kernel else "fwd"


# ---- the command line --------------------------------------------------------------------------------
def build(dtype_name="float32", compile_missing=False):
    """(rows, notes): every Triton launch, then every CUDA one."""
    rows = triton_rows(dtype_name=dtype_name)
    more, notes = cuda_rows(dtype_name=dtype_name, compile_missing=compile_missing)
    return rows + more, notes


def report(rows, notes, dtype_name="float32", gpu=H100):
    """The table with its heading lines and the launches under the bar."""
    import triton

    lines = [
        f"Launch plan on an {gpu.name}, {gpu.sms} SMs, {dtype_name} (`python tools/launch_plan.py`, "
        f"triton {triton.__version__}; Triton kernels compiled for sm_90 ahead of time). A launch touching "
        f">= {LARGE // (1 << 20)}M elements must make >= {MIN_WAVES:g} waves.",
        "",
        markdown(rows, gpu),
        "",
    ]
    lines += [f"- {n}" for n in notes]
    under = [r for r in rows if r.under]
    lines.append(
        f"- {len(under)} of {sum(r.large for r in rows)} large launches under {MIN_WAVES:g} waves"
        + (": " + "; ".join(f"{r.case} {r.phase} `{r.kernel}` {r.waves:.2f}" for r in under) if under else "")
    )
    return "\n".join(lines)


def main(argv):
    if argv == ["--compile-jobs"]:
        _compile_main()
        return 0
    parser = argparse.ArgumentParser(prog="python tools/launch_plan.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=sorted(CUDA_TYPES))
    parser.add_argument("--nvcc", action="store_true", help="compile csrc/cuda/*.cu for the CUDA registers if needed")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows, notes = build(args.dtype, args.nvcc)
    print(report(rows, notes, args.dtype))
    if args.json:
        Path(args.json).write_text(
            json.dumps([dataclasses.asdict(r) | {"blocks": r.blocks, "verdict": r.verdict()} for r in rows], indent=1)
        )
    return 1 if any(r.under for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

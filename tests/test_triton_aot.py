"""Every Triton kernel compiled ahead of time for the GPU, with no GPU needed; the Triton launchers
of the activation family and the scalar transport under the interpreter (or on the GPU).

The interpreter accepts code that compiled Triton rejects (plain module globals, float64 literals,
libdevice-free fallbacks), so each kernels module lists the launches its launchers make in
`aot_variants()` -> [(label, jit function, {argument: Triton type}, {constexpr: value})], and every
one is compiled down to a cubin for sm_90 (and sm_80 with PYOPS_AOT_ARCHS=90,80). The compile runs in
a subprocess without TRITON_INTERPRET (triton.jit reads it when it decorates, and conftest sets it on
machines without a GPU), importing the kernel files by path: importing pyops would load its C++
extension.

Run as a script, this file is that subprocess: `python tests/test_triton_aot.py OUT.json`.
"""

import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"
KERNEL_MODULES = ("activation", "optim", "batch_norm", "conv", "loss")
# Hopper (sm_90) by default; PYOPS_AOT_ARCHS=90,80 adds Ampere (twice the compile time: ~4 min of CPU
# for every family's variants on both).
TARGETS = tuple(("cuda", int(a), 32) for a in os.environ.get("PYOPS_AOT_ARCHS", "90").split(","))
# The package name kernels/ is loaded under here (never `kernels`: a PyPI package has that name).
PACKAGE = "_pyops_aot_kernels"
# Compiling activation's 180 variants for both targets takes ~75 s of CPU (~40 s on 2 cores); the
# limit is for hangs.
COMPILE_TIMEOUT_S = 600
# Triton hints pointers 16-byte aligned (as torch allocates) and ints that 16 divides.
DIVISIBILITY = 16
MAX_JOBS = 8  # compile processes (PYOPS_AOT_JOBS overrides)
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


# ---- the compile subprocess -------------------------------------------------------------------
def _load_kernels(name):
    """pyops' kernels/<name>.py as a submodule of PACKAGE (relative imports work), loaded by path."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")


def _source(fn, signature, constexprs):
    """triton.compiler.ASTSource for fn: the full signature in argument order (constexprs typed
    "constexpr"). Pointers are hinted 16-byte aligned, as Triton hints launches of torch tensors; an
    int typed "i32:16" (tools/compile.py's spelling) is hinted divisible by 16."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    unknown = (set(signature) | set(constexprs)) - set(names)
    missing = [a for a in names if a not in signature and a not in constexprs]
    if unknown or missing:
        raise ValueError(
            f"{fn.__name__}: variant names unknown arguments {sorted(unknown)}, "
            f"leaves {missing} without a type or value"
        )
    full, hinted = {}, []
    for i, a in enumerate(names):
        ty, _, hint = ("constexpr" if a in constexprs else signature[a]).partition(":")
        full[a] = ty
        if ty.startswith("*") or hint:
            if hint not in ("", str(DIVISIBILITY)):
                raise ValueError(f"{fn.__name__}: argument {a}: only :{DIVISIBILITY} hints, got {signature[a]!r}")
            hinted.append(i)
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3 (3.6, 3.8)
        attrs = {(i,): [["tt.divisibility", DIVISIBILITY]] for i in hinted}
        return ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    # older triton: constants=, and hints as an AttrsDescriptor (compiled here without hints)
    return ASTSource(fn=fn, signature=full, constants=constexprs)


def _ptxas_stats(log):
    """(registers, spilled bytes) from ptxas -v output, None where the log is not there."""
    spills = [int(s) + int(lo) for s, lo in SPILLS.findall(log)]
    regs = [int(r) for r in REGISTERS.findall(log)]
    return (max(regs) if regs else None), (max(spills) if spills else None)


_JOBS = {}


def _compile_job(key):
    import triton
    from triton.backends.compiler import GPUTarget

    module, index, target = key
    label, fn, signature, constexprs = _JOBS[(module, index)]
    result = {"module": module, "label": label, "kernel": fn.__name__, "target": f"sm_{target[1]}"}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(_source(fn, signature, constexprs), target=GPUTarget(*target))
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        regs, spills = _ptxas_stats(log.getvalue())
        if spills is None:  # no ptxas log (older triton): set once a GPU loads the kernel, if at all
            try:
                spills = getattr(compiled, "n_spills", None)
            except Exception:
                spills = None
        result.update(
            ok=True,
            shared=compiled.metadata.shared,
            registers=regs,
            spills=spills,
            cubin_bytes=len(compiled.asm["cubin"]),
        )
    except Exception as e:  # reported per variant by the test, with the errors it chains
        chain = []
        while e is not None and len(chain) < 4:
            text = f"{type(e).__name__}: {e}"
            if not any(text.splitlines()[-1] in c for c in chain):
                chain.append(text)
            e = e.__cause__ or e.__context__
        result.update(ok=False, error="\n".join(reversed(chain)))
    result["seconds"] = time.perf_counter() - start
    return result


def compile_all(jobs):
    """Compile every aot_variants() of KERNEL_MODULES for TARGETS in `jobs` processes; JSON-able."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    report = {"modules": {}, "results": []}
    keys = []
    for name in KERNEL_MODULES:
        try:
            module = _load_kernels(name)
            if not hasattr(module, "aot_variants"):
                report["modules"][name] = {"skip": f"kernels/{name}.py defines no aot_variants()"}
                continue
            variants = list(module.aot_variants())
        except Exception:  # one module's error fails that module's test only
            report["modules"][name] = {"error": traceback.format_exc()}
            continue
        report["modules"][name] = {"variants": len(variants)}
        for i, variant in enumerate(variants):
            _JOBS[(name, i)] = variant
            keys += [(name, i, t) for t in TARGETS]
    if jobs > 1 and len(keys) > 1:
        # forked workers inherit the loaded modules (jit functions do not pickle); nothing has run
        # an MLIR context or a thread pool yet, so fork is safe here
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            report["results"] = list(pool.map(_compile_job, keys, chunksize=4))
    else:
        report["results"] = [_compile_job(k) for k in keys]
    import triton

    report.update(seconds=time.perf_counter() - start, jobs=jobs, triton=triton.__version__)
    return report


def _main(out):
    jobs = int(os.environ.get("PYOPS_AOT_JOBS", min(MAX_JOBS, os.cpu_count() or 1)))
    Path(out).write_text(json.dumps(compile_all(jobs)))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("test_triton_aot.py: compiling needs TRITON_INTERPRET unset")
    _main(sys.argv[1])
    sys.exit(0)


# ---- the tests ------------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a fresh cache, so every variant really compiles and ptxas reports on it
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    out = tmp / "report.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"the ahead-of-time compile failed to run (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text())


def _summary(results):
    """One line per kernel and target: variants, the most shared memory, registers and spilled bytes
    of any variant, and the seconds their compiles took."""
    rows = {}
    for r in results:
        if r["ok"]:
            rows.setdefault((r["kernel"], r["target"]), []).append(r)
    lines = [
        f"{'kernel':<24} {'target':<6} {'variants':>8} {'shared B':>9} {'regs':>5} {'spills B':>9} {'compile s':>9}"
    ]

    def most(rs, key):
        values = [r[key] for r in rs if r[key] is not None]
        return max(values) if values else "n/a"

    for (kernel, target), rs in sorted(rows.items()):
        lines.append(
            f"{kernel:<24} {target:<6} {len(rs):>8} {most(rs, 'shared'):>9} {most(rs, 'registers'):>5} "
            f"{most(rs, 'spills'):>9} {sum(r['seconds'] for r in rs):>9.2f}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_compile_for_gpu(aot_report, module):
    info = aot_report["modules"][module]
    if "skip" in info:
        pytest.skip(info["skip"])
    assert "error" not in info, f"kernels/{module}.py: loading it or its aot_variants() failed:\n{info.get('error')}"
    results = [r for r in aot_report["results"] if r["module"] == module]
    assert info["variants"] > 0 and len(results) == info["variants"] * len(TARGETS)
    print(
        f"\nkernels/{module}.py: {info['variants']} variants x {len(TARGETS)} targets compiled to cubin "
        f"(triton {aot_report['triton']}; all modules {aot_report['seconds']:.1f} s on {aot_report['jobs']} "
        f"processes)\n{_summary(results)}"
    )
    spilling = [r for r in results if r["ok"] and r["spills"]]
    for r in spilling:
        print(f"  spills: {r['label']} {r['target']}: {r['spills']} bytes")
    if spilling:
        warnings.warn(
            stacklevel=2,
            message=f"kernels/{module}.py: {len(spilling)} compiled variants spill registers "
            f"(e.g. {spilling[0]['label']} on {spilling[0]['target']})",
        )
    failed = [r for r in results if not r["ok"]]
    first = {}  # one report per kernel and error
    for r in failed:
        first.setdefault((r["kernel"], r["error"]), r)
    assert not failed, f"{len(failed)} of {len(results)} variants do not compile:\n" + "\n".join(
        f"--- {r['label']} on {r['target']} (and others like it):\n{r['error'][-2000:]}"
        for r in list(first.values())[:4]
    )


# ---- the variants are the launches ----------------------------------------------------------------
TRITON_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
}
BIG = 2**31 + 16  # past int32: Triton passes it as i64
# Triton's own typing of an argument (mangle_type(arg, specialize), triton >= 3.3), to check ours by
MANGLE = getattr(triton.runtime.jit, "mangle_type", None)
if MANGLE is not None and "specialize" not in inspect.signature(MANGLE).parameters:
    MANGLE = None


def _specialisation(kernel, args, kwargs):
    """(signature, constexprs) of a launch as Triton derives them: tensors as typed pointers, ints as
    i32 or i64 by value and as the constant 1 unless never specialised, constexprs by value."""
    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters
    values = dict(zip(params, args)) | kwargs
    fixed = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
    signature, constexprs = {}, {}
    for i, (name, p) in enumerate(params.items()):
        v = values[name]
        if p.annotation is tl.constexpr or "constexpr" in str(p.annotation):
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[v.dtype]
        elif isinstance(v, int):
            specialise = name not in fixed and i not in fixed
            ty = "constexpr" if v == 1 and specialise else "i32" if -(2**31) <= v < 2**31 else "i64"
            if MANGLE is not None:  # Triton's own rule, where this version exposes it
                assert MANGLE(v, specialise) == ty, (name, v, MANGLE(v, specialise), ty)
            if ty == "constexpr":
                constexprs[name] = v
            else:
                signature[name] = ty
        else:
            raise TypeError(f"{fn.__name__}: no rule for argument {name}={v!r}")
    return signature, constexprs


def test_variants_cover_every_launch(monkeypatch):
    """Each launch the launchers make (every op, dtype and size form, on meta tensors) is one of
    aot_variants(), so the ahead-of-time compile checks what runs."""
    variants = K.aot_variants()
    kernels = {id(v[1]): v[1] for v in variants}
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for name, value in list(vars(K).items()):
        if id(value) in kernels:
            monkeypatch.setattr(K, name, Recorder(value))

    def meta(n, dtype):
        return torch.empty(n, dtype=dtype, device="meta")

    for dtype in K.DTYPES:
        for n in (1, 100, BIG):
            x, mask = meta(n, dtype), meta(math.ceil(n / 8), torch.uint8)
            for op in K.MASKED_OPS:
                K.masked_fwd(x, x, mask, op, -1e300)
                K.masked_bwd(x, mask, x, op, float("nan"))
            for op in K.UNARY_OPS:
                K.unary(x, x, op, float("inf"))
            for op in K.BINARY_BWD_OPS:
                K.binary_bwd(x, x, x, op, 0.5)
        for count, inner, pieces in [(1, 1, 3), (60, 5, 3), (8, 1, 1), (BIG, 8, 2), (BIG, BIG, 2), (BIG, 1, 256)]:
            out, idx = meta(count, dtype), meta(count, torch.uint8)
            K.maxout_fwd(meta(count * pieces, dtype), out, idx, inner, pieces)
            K.maxout_bwd(out, idx, meta(count * pieces, dtype), inner, pieces)

    def key(fn, sig, consts):  # divisibility hints aside: they change code, not what compiles
        sig = {a: ty.partition(":")[0] for a, ty in sig.items()}
        return id(fn), json.dumps(sig, sort_keys=True), repr(sorted(consts.items()))

    compiled = {key(fn, sig, consts) for _, fn, sig, consts in variants}
    missing = set()
    for kernel, args, kwargs in launches:
        sig, consts = _specialisation(kernel, args, kwargs)
        if key(kernel, sig, consts) not in compiled:
            missing.add(f"{getattr(kernel, 'fn', kernel).__name__} {sig} {consts}")
    per_dtype = 3 * (2 * len(K.MASKED_OPS) + len(K.UNARY_OPS) + len(K.BINARY_BWD_OPS)) + 6 * 2
    assert len(launches) == len(K.DTYPES) * per_dtype
    assert not missing, "launches no variant compiles:\n" + "\n".join(sorted(missing))


# ---- the launchers, under the interpreter on CPU (on the GPU where there is one) -----------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not RUNS_HERE, reason="Triton needs a GPU or TRITON_INTERPRET=1")
K = _load_kernels("activation")
K_F64 = K._f64  # a global of the probe kernel below, as jit functions need


@triton.jit(do_not_specialize=["hi", "lo"])
def _scalar_probe(out_ptr, i, hi, lo):
    tl.store(out_ptr + i, K_F64(hi, lo))


SCALARS = [
    float("inf"),
    -float("inf"),
    float("nan"),
    1e300,
    -1e300,
    -0.0,
    0.0,
    5e-324,
    -5e-324,
    0.2,
    1.7976931348623157e308,
    2.2250738585072014e-308,
    3.4028235677973366e38,
    -1.5,
]


@needs_triton
def test_scalar_transport_is_exact():
    """Any float64 crosses into a kernel bit for bit, as two never-specialised int32 halves."""
    out = torch.empty(len(SCALARS), dtype=torch.float64, device=DEVICE)
    for i, v in enumerate(SCALARS):
        hi, lo = K.f64_halves(v)
        assert -(2**31) <= hi < 2**31 and -(2**31) <= lo < 2**31
        _scalar_probe[(1,)](out, i, hi, lo)
    want = torch.tensor(SCALARS, dtype=torch.float64)
    assert torch.equal(out.cpu().view(torch.int64), want.view(torch.int64)), (out, want)


def _edge(shape, dtype, layout):
    x = torch.randn(shape, dtype=torch.float64) * 3
    x.view(-1)[:10] = torch.tensor(
        [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 0.1], dtype=torch.float64
    )
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.flatten(1).t()
    return x.to(DEVICE)


def _memory_order(t):
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(perm).reshape(-1)


def _bits(pos):
    flat = torch.zeros(math.ceil(pos.numel() / 8) * 8, dtype=torch.uint8, device=pos.device)
    flat[: pos.numel()] = _memory_order(pos).to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=pos.device)
    return (flat.view(-1, 8).int() * weights).sum(1).to(torch.uint8)


def _close(got, want, dtype, what=""):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    zeros = want == 0
    assert torch.equal(got[zeros].signbit(), want[zeros].signbit()), "sign of zero"


LAYOUTS = ["contiguous", "channels_last", "transposed"]
LAUNCH_DTYPES = [torch.float64, torch.float32, torch.float16]


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
def test_masked_launchers(dtype, layout):
    import torch.nn.functional as F

    x = _edge((2, 3, 4, 5), dtype, layout)
    g = torch.randn(x.shape, dtype=dtype).to(DEVICE)
    g = torch.empty_like(x).copy_(g)
    for op, slope in [("relu", 0.0), ("leaky_relu", 0.01), ("leaky_relu", -2.5)]:
        want = torch.relu(x) if op == "relu" else F.leaky_relu(x, slope)
        pos = ~(x <= 0) if op == "relu" else x > 0
        for inplace in (False, True):
            xi = x.clone()
            out = xi if inplace else torch.empty_like(xi)
            mask = torch.empty(math.ceil(x.numel() / 8), dtype=torch.uint8, device=DEVICE)
            K.masked_fwd(xi, out, mask, op, slope)
            _close(out, want, dtype)
            assert torch.equal(mask, _bits(pos))
        gi = torch.empty_like(g)
        K.masked_bwd(g, mask, gi, op, slope)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        neg = torch.zeros_like(g) if op == "relu" else (g.to(wide) * slope).to(dtype)  # threshold_backward: +0
        _close(gi, torch.where(pos, g, neg), dtype)


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
def test_unary_and_binary_bwd_launchers(dtype, layout):
    import torch.nn.functional as F

    x = _edge((2, 3, 4, 5), dtype, layout)
    g = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=dtype))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for op, alpha, ref in [
        ("elu", 1.0, lambda t: F.elu(t, 1.0)),
        ("elu", 0.3, lambda t: F.elu(t, 0.3)),
        ("sigmoid", 0.0, torch.sigmoid),
        ("tanh", 0.0, torch.tanh),
    ]:
        want = ref(x.double()).to(dtype)
        for inplace in (False, True):
            xi = x.clone()
            out = xi if inplace else torch.empty_like(xi)
            K.unary(xi, out, op, alpha)
            _close(out, want, dtype, op)
        saved_cases = [("elu_result", out), ("elu_input", x)] if op == "elu" else [(op, out)]
        for bop, saved in saved_cases:
            gi = torch.empty_like(g)
            K.binary_bwd(g, saved, gi, bop, alpha)
            s, gw = saved.to(wide), g.to(wide)
            # as torch's scalar and CUDA elu_backward (its CPU vector path gives NaN for a NaN s)
            if bop == "elu_result":
                want_g = torch.where(s <= 0, gw * (s + alpha), gw)
            elif bop == "elu_input":
                want_g = torch.where(s <= 0, gw * alpha * torch.exp(s), gw)
            elif bop == "sigmoid":
                want_g = gw * (1 - s) * s
            else:
                want_g = gw * (1 - s * s)
            _close(gi, want_g.to(dtype), dtype, bop)


@needs_triton
@pytest.mark.parametrize("dtype", LAUNCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,pieces", [((4, 12, 5), 1, 3), ((6, 8), 1, 4), ((3, 5, 4), 2, 1)])
def test_maxout_launchers(dtype, shape, dim, pieces):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    x.view(-1)[3] = float("nan")
    x.view(-1)[1] = x.view(-1)[0]  # a tie: the first piece wins
    x = x.to(DEVICE)
    inner = math.prod(shape[dim + 1 :])
    oshape = list(shape)
    oshape[dim] //= pieces
    out = torch.empty(oshape, dtype=dtype, device=DEVICE)
    idx = torch.empty(oshape, dtype=torch.uint8, device=DEVICE)
    K.maxout_fwd(x, out, idx, inner, pieces)
    want, want_idx = x.reshape(*shape[:dim], oshape[dim], pieces, *shape[dim + 1 :]).max(dim=dim + 1)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.long(), want_idx)
    g = torch.randn(oshape, dtype=dtype).to(DEVICE)
    gi = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
    K.maxout_bwd(g, idx, gi, inner, pieces)
    want_gi = torch.zeros(*shape[:dim], oshape[dim], pieces, *shape[dim + 1 :], dtype=dtype, device=DEVICE)
    want_gi.scatter_(dim + 1, want_idx.unsqueeze(dim + 1), g.unsqueeze(dim + 1))
    assert torch.equal(gi, want_gi.reshape(shape))


def test_unknown_op_names_the_op():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="'gelu'"):
        K.masked_fwd(x, x, x, "gelu", 0.0)
    with pytest.raises(ValueError, match="'relu'"):
        K.unary(x, x, "relu", 1.0)
    with pytest.raises(ValueError, match="'elu'"):
        K.binary_bwd(x, x, x, "elu", 1.0)

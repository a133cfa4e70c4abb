"""Compile every Triton kernel ahead of time for the GPU, with no GPU needed.

The interpreter accepts code that compiled Triton rejects (plain module globals, float64 literals,
libdevice-free fallbacks), so each kernels/<family>.py lists the launches its launchers make in
`aot_variants()` -> [(label, jit function, {argument: Triton type}, {constexpr: value})], and this
script compiles every one down to a cubin for sm_90 (and sm_80 with PYOPS_AOT_ARCHS=90,80), in
PYOPS_AOT_JOBS processes (default: the CPU count, at most 8). It imports the kernel files by path:
importing pyops would load its C++ extension. TRITON_INTERPRET must be unset (triton.jit reads it
when it decorates).

    python tools/triton_aot.py [REPORT.json]

prints, per family, one line per kernel and target (variants, the most shared memory, registers
and spilled bytes of any variant, compile seconds) and the first errors, writes the whole report as
JSON where asked, and exits 1 if a variant does not compile. tests/test_triton_aot.py runs it.
"""

import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import sys
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"
# Every family: kernels/<family>.py (kernels/_*.py are shared helpers, not families).
FAMILIES = tuple(sorted(p.stem for p in KERNELS_DIR.glob("*.py") if not p.stem.startswith("_")))
# Hopper (sm_90) by default; PYOPS_AOT_ARCHS=90,80 adds Ampere (twice the compile time: ~4 min of CPU
# for every family's variants on both).
TARGETS = tuple(("cuda", int(a), 32) for a in os.environ.get("PYOPS_AOT_ARCHS", "90").split(","))
# The package name kernels/ is loaded under here (never `kernels`: a PyPI package has that name).
PACKAGE = "_pyops_aot_kernels"
# Triton hints pointers 16-byte aligned (as torch allocates) and ints that 16 divides.
DIVISIBILITY = 16
MAX_JOBS = 8  # compile processes (PYOPS_AOT_JOBS overrides)
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def load_kernels(name):
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
    int typed "i32:16" is hinted divisible by 16."""
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
    except Exception as e:  # reported per variant, with the errors it chains
        chain = []
        while e is not None and len(chain) < 4:
            text = f"{type(e).__name__}: {e}"
            if not any(text.splitlines()[-1] in c for c in chain):
                chain.append(text)
            e = e.__cause__ or e.__context__
        result.update(ok=False, error="\n".join(reversed(chain)))
    result["seconds"] = time.perf_counter() - start
    return result


def compile_all(jobs, families=FAMILIES):
    """Compile every aot_variants() of `families` for TARGETS in `jobs` processes; a JSON-able report:
    {"modules": {family: {"variants": n} | {"error": traceback}}, "results": [one per
    variant and target], "targets", "seconds", "jobs", "triton"}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    report = {"modules": {}, "results": [], "targets": [f"sm_{t[1]}" for t in TARGETS]}
    keys = []
    for name in families:
        try:  # (a family without aot_variants() is an error too)
            variants = list(load_kernels(name).aot_variants())
        except Exception:  # one module's error fails that module only
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


def summary(results):
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


def failures(results, limit=4):
    """The variants that did not compile, one report per kernel and error (at most `limit`)."""
    first = {}
    for r in results:
        if not r["ok"]:
            first.setdefault((r["kernel"], r["error"]), r)
    return "\n".join(
        f"--- {r['label']} on {r['target']} (and others like it):\n{r['error'][-2000:]}"
        for r in list(first.values())[:limit]
    )


def main(argv):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("tools/triton_aot.py: compiling needs TRITON_INTERPRET unset")
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        sys.exit(__doc__)
    jobs = int(os.environ.get("PYOPS_AOT_JOBS", min(MAX_JOBS, os.cpu_count() or 1)))
    report = compile_all(jobs)
    if argv:
        Path(argv[0]).write_text(json.dumps(report))
    ok = True
    for name, info in report["modules"].items():
        results = [r for r in report["results"] if r["module"] == name]
        failed = [r for r in results if not r["ok"]]
        ok = ok and "error" not in info and not failed
        print(f"kernels/{name}.py: {info.get('variants', 0)} variants x {len(TARGETS)} targets")
        if "error" in info:
            print(info["error"])
            continue
        print(summary(results))
        if failed:
            print(f"{len(failed)} of {len(results)} variants do not compile:\n{failures(results)}")
    print(f"triton {report['triton']}: {report['seconds']:.1f} s on {report['jobs']} processes")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

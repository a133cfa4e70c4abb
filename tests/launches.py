"""Triton launches as the launchers make them, typed as Triton types them, and the check that each is
one of its family's `aot_variants()` (the list tools/triton_aot.py compiles ahead of time): the one
launch recorder of the tests (tests/test_triton_aot.py, tests/test_optim.py)."""

import contextlib
import dataclasses
import inspect
import json

import torch
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface

TRITON_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}
# Triton's own typing of an argument (mangle_type(arg, specialize), triton >= 3.3), to check ours by
MANGLE = getattr(triton.runtime.jit, "mangle_type", None)
if MANGLE is not None and "specialize" not in inspect.signature(MANGLE).parameters:
    MANGLE = None


@dataclasses.dataclass
class Launch:
    """One `kernel[grid](*args, **kwargs)`."""

    kernel: object
    grid: object
    args: tuple
    kwargs: dict

    @property
    def fn(self):
        return getattr(self.kernel, "fn", self.kernel)

    def specialisation(self):
        """(signature, constexprs) as Triton derives them: tensors as typed pointers, ints as i32 or
        i64 by value and as the constant 1 unless never specialised, constexprs by value."""
        params = inspect.signature(self.fn).parameters
        values = dict(zip(params, self.args)) | self.kwargs
        kernel = self.kernel
        fixed = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
        signature, constexprs = {}, {}
        for i, (name, p) in enumerate(params.items()):
            v = values[name]
            if p.annotation is tl.constexpr or "constexpr" in str(p.annotation):
                constexprs[name] = v
            elif isinstance(v, torch.Tensor):
                signature[name] = "*" + TRITON_TYPES[v.dtype]
            elif isinstance(v, int) and not isinstance(v, bool):
                specialise = name not in fixed and i not in fixed
                ty = "constexpr" if v == 1 and specialise else "i32" if -(2**31) <= v < 2**31 else "i64"
                if MANGLE is not None:  # Triton's own rule, where this version exposes it
                    assert MANGLE(v, specialise) == ty, (name, v, MANGLE(v, specialise), ty)
                if ty == "constexpr":
                    constexprs[name] = v
                else:
                    signature[name] = ty
            else:
                raise TypeError(f"{self.fn.__name__}: no rule for argument {name}={v!r}")
        return signature, constexprs

    def __str__(self):
        signature, constexprs = self.specialisation()
        return f"{self.fn.__module__}.{self.fn.__name__} {signature} {constexprs}"


@contextlib.contextmanager
def record_launches(run=True):
    """Every Triton launch `kernel[grid](...)` made in the block, as Launch objects appended to the
    list it yields. With run=False nothing runs (meta tensors, sizes past what a test can allocate)."""
    launches = []
    launch_of = KernelInterface.__getitem__

    def recording(kernel, grid):
        def launch(*args, **kwargs):
            launches.append(Launch(kernel, grid, args, kwargs))
            if run:
                return launch_of(kernel, grid)(*args, **kwargs)

        return launch

    KernelInterface.__getitem__ = recording
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = launch_of


def variant_key(fn, signature, constexprs):
    """What identifies a compiled variant (divisibility hints aside: they change code, not what
    compiles): the jit function, the argument types, the constexprs' values."""
    signature = {a: ty.partition(":")[0] for a, ty in signature.items()}
    constexprs = {k: v.value if isinstance(v, tl.constexpr) else v for k, v in constexprs.items()}
    return id(fn), json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items()))


def uncovered(launches, variants):
    """The launches (as text, sorted) that none of `variants` (aot_variants() entries) compiles."""
    compiled = {variant_key(getattr(fn, "fn", fn), sig, consts) for _, fn, sig, consts in variants}
    return sorted({str(la) for la in launches if variant_key(la.fn, *la.specialisation()) not in compiled})

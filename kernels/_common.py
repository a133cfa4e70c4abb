"""What every Triton family shares, written once: each kernels/<family>.py imports its shared helpers
from here and from no other family.

- dtypes: the pointer type and compute dtype of each tensor dtype (half types compute in float32);
- scalars: any float64 as two int32 halves (f64_halves, rebuilt in a kernel by f64), exact;
- expm1 without libdevice (everything here also runs under TRITON_INTERPRET=1);
- device_table: launch tables uploaded to the device once per value set (kernels/_upload.py);
- the forms of a size argument in aot_variants().

Every global a kernel reads is a tl.constexpr (compiled Triton refuses plain module globals).
Compiled Triton materialises Python float literals as float32, so the series below use only integers
exact in float32 and divide in the compute dtype (float64 keeps its precision).
"""

import struct
import threading

import torch
import triton
import triton.language as tl

from ._upload import upload

# ---- dtypes -------------------------------------------------------------------------------------
# torch dtype -> (Triton pointer element type name, compute dtype)
DTYPES = {
    torch.float64: ("fp64", tl.float64),
    torch.float32: ("fp32", tl.float32),
    torch.float16: ("fp16", tl.float32),
    torch.bfloat16: ("bf16", tl.float32),
}


def compute_dtype(dtype):
    """The dtype a kernel computes a tensor of torch dtype `dtype` in: float64 for float64, else float32."""
    return DTYPES[dtype][1]


# ---- float64 scalars ----------------------------------------------------------------------------
def f64_bits(v):
    """v's float64 bit pattern as a signed 64-bit integer."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def f64_halves(v):
    """v's float64 bit pattern as (high, low) signed 32-bit integers. Compiled Triton passes Python
    floats as float32, which rounds and turns |v| > 3.4e38 into inf; two int32 halves (never
    specialised, so one compiled kernel serves every value) carry any float64 exactly, inf, NaN,
    -0.0 and denormals included. `f64` rebuilds it in the kernel."""
    bits = f64_bits(v)
    low = bits & 0xFFFFFFFF
    return bits >> 32, low - (1 << 32) if low >= 1 << 31 else low


@triton.jit
def f64(hi, lo):
    """The float64 whose bit pattern f64_halves split into hi and lo."""
    bits = (tl.cast(hi, tl.int64) << 32) | tl.cast(tl.cast(lo, tl.uint32, bitcast=True), tl.int64)
    return tl.cast(bits, tl.float64, bitcast=True)


# ---- expm1 --------------------------------------------------------------------------------------
# Below this |x|, expm1 (and kernels/activation.py's tanh) use their Taylor series: the truncation
# error there is under 1e-12 relative, and above it exp-based formulas lose at most ~3 bits to
# cancellation.
SERIES_BELOW: tl.constexpr = tl.constexpr(0.15)


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation near 0: a Taylor series below SERIES_BELOW."""
    # x (1 + x/2 + x^2/6 + ... + x^7/40320), Horner from the inside
    p = x / 40320.0
    p = x * (1.0 + 5040.0 * p) / 5040.0
    p = x * (1.0 + 720.0 * p) / 720.0
    p = x * (1.0 + 120.0 * p) / 120.0
    p = x * (1.0 + 24.0 * p) / 24.0
    p = x * (1.0 + 6.0 * p) / 6.0
    p = x * (1.0 + 2.0 * p) / 2.0
    series = x * (1.0 + p)
    return tl.where(tl.abs(x) < SERIES_BELOW, series, tl.exp(x) - 1.0)


# ---- launch tables on the device --------------------------------------------------------------------
MAX_CACHED_TABLES = 64  # tensor lists, shapes and hyper-parameters change rarely
_TABLES = {}  # (dtype, values) per device and stream: kernels/_upload.py's entries
# Guards _TABLES's misses, evictions and capture marks (threads stepping their own optimizers share the
# cache); a hit takes no lock.
_TABLES_LOCK = threading.Lock()


def device_table(values, dtype, device):
    """values as a 1-d tensor of dtype on device, cached: a launch over unchanged shapes, tensors and
    hyper-parameters uploads nothing. Uploaded from pinned memory without a host synchronisation, per
    stream, and kept for good once a CUDA graph capture used it (kernels/_upload.py)."""
    values = tuple(values)
    return upload(
        _TABLES, _TABLES_LOCK, MAX_CACHED_TABLES, (dtype, values), lambda: torch.tensor(values, dtype=dtype), device
    )


# ---- ahead-of-time variants -------------------------------------------------------------------------
# How Triton types a launch's size argument: i32 below 2^31, i64 above, the constant 1 folded in.
# ":16" hints it divisible by 16 (vector loads and stores), the common case and the harder code.
INT_FORMS = ("i32:16", "i64:16", 1)


def int_args(sig, consts, **forms):
    """Adds each size argument's form to a variant's signature (or, the constant 1, to its constexprs)
    and returns them as a label suffix."""
    for name, form in forms.items():
        if form == 1:
            consts[name] = 1
        else:
            sig[name] = form
    return "".join(f",{name}:{form}" for name, form in forms.items())

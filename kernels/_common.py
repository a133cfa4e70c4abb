"""What every Triton family shares, written once: each kernels/<family>.py imports its shared helpers
from here and from no other family.

- dtypes: the pointer type and compute dtype of each tensor dtype (half types compute in float32);
- scalars: any float64 as two int32 halves (f64_halves, rebuilt in a kernel by f64), exact;
- expm1 without libdevice (everything here also runs under TRITON_INTERPRET=1);
- the fused activation: its codes (as the C++ side numbers them: Act in csrc/common/act.h) and its
  math, forward, gradient read from the output and inverse, as torch computes relu, leaky_relu and
  elu and as act.h does; kernels/activation.py's relu, leaky_relu and elu kernels run the same
  functions;
- device_table: launch tables uploaded to the device once per value set (kernels/_upload.py);
- two_waves: how many programs fill an H100 twice at a kernel's occupancy (the launch plans' target);
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


def i64_halves(v):
    """A signed 64-bit integer as (high, low) signed 32-bit integers: never specialised, they give one
    argument type (i32) whatever the value, where an int would be i32 or i64 by value. `i64` rebuilds
    it in the kernel."""
    low = v & 0xFFFFFFFF
    return v >> 32, low - (1 << 32) if low >= 1 << 31 else low


def f64_halves(v):
    """v's float64 bit pattern as (high, low) signed 32-bit integers. Compiled Triton passes Python
    floats as float32, which rounds and turns |v| > 3.4e38 into inf; two int32 halves (never
    specialised, so one compiled kernel serves every value) carry any float64 exactly, inf, NaN,
    -0.0 and denormals included. `f64` rebuilds it in the kernel."""
    return i64_halves(f64_bits(v))


@triton.jit
def i64(hi, lo):
    """The int64 that i64_halves split into hi and lo."""
    return (tl.cast(hi, tl.int64) << 32) | tl.cast(tl.cast(lo, tl.uint32, bitcast=True), tl.int64)


@triton.jit
def f64(hi, lo):
    """The float64 whose bit pattern f64_halves split into hi and lo."""
    return tl.cast(i64(hi, lo), tl.float64, bitcast=True)


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


# ---- the fused activation -------------------------------------------------------------------------
# Codes, as the C++ side numbers them; p is leaky_relu's slope or elu's alpha.
ACT_NONE: tl.constexpr = tl.constexpr(0)
ACT_RELU: tl.constexpr = tl.constexpr(1)
ACT_LEAKY_RELU: tl.constexpr = tl.constexpr(2)
ACT_ELU: tl.constexpr = tl.constexpr(3)
ACTIVATIONS = {"none": ACT_NONE.value, "relu": ACT_RELU.value, "leaky_relu": ACT_LEAKY_RELU.value, "elu": ACT_ELU.value}
# Below 1 + this, elu's inverse clamps y / alpha (a saturated output maps to a finite input).


@triton.jit
def relu(x):
    """torch's relu: x where x is not negative, so -0.0 stays -0.0 and NaN stays NaN."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def leaky_relu(x, slope):
    """torch's leaky_relu: x where x > 0, else x * slope (NaN stays NaN)."""
    return tl.where(x > 0, x, x * slope)


@triton.jit
def elu(x, alpha):
    """torch's elu: x where x is not negative (±0 and NaN pass unchanged whatever alpha is), else
    alpha * expm1(x)."""
    return tl.where(x < 0, alpha * expm1(x), x)


# Where the gradient flows unchanged, as torch decides it, read from the input or the output (the
# same: relu and leaky_relu keep the sign of what they pass): relu's backward tests the output, so
# NaN passes (and stays NaN); leaky_relu's tests the input, so NaN takes the slope.
@triton.jit
def relu_passes(y):
    return (y <= 0) == 0


@triton.jit
def leaky_relu_passes(y):
    return y > 0


@triton.jit
def elu_grad(g, y, alpha):
    """g * elu'(x), read from the output y = elu(x, alpha): y + alpha = alpha exp(x) where y <= 0."""
    return tl.where(y <= 0, g * (y + alpha), g)


@triton.jit
def act_fwd(z, act, p):
    """act(z) for an activation code `act` (a runtime value or a constexpr)."""
    if act == ACT_RELU:
        z = relu(z)
    elif act == ACT_LEAKY_RELU:
        z = leaky_relu(z, p)
    elif act == ACT_ELU:
        z = elu(z, p)
    return z


@triton.jit
def act_grad(g, y, act, p):
    """g * act'(z), read from y = act(z) (leaky_relu and elu: for p >= 0, where y's sign is z's)."""
    if act == ACT_RELU:
        g = tl.where(relu_passes(y), g, 0.0)
    elif act == ACT_LEAKY_RELU:
        g = tl.where(leaky_relu_passes(y), g, g * p)
    elif act == ACT_ELU:
        g = elu_grad(g, y, p)
    return g


@triton.jit
def act_inv(y, act, p):
    """z from y = act(z) for the invertible forms (none; leaky_relu and elu with p > 0); y itself for
    the others."""
    ps = tl.where(p == 0, 1.0, p)  # (p is never 0 where an inverse is used)
    if act == ACT_LEAKY_RELU:
        y = tl.where(y > 0, y, y / ps)
    elif act == ACT_ELU:
        # t >= -1 + eps (eps the compute dtype's epsilon), as csrc/common/act.h: a saturated output maps to
        # a finite z. Clamped as u = 1 + t >= eps, in tensor arithmetic (a float literal is float32 here,
        # and -1 + 2^-52 would round to -1): eps is a power of two, exact in either dtype.
        if y.dtype == tl.float64:
            u = tl.maximum(1.0 + y / ps, 2.220446049250313e-16)
        else:
            u = tl.maximum(1.0 + y / ps, 1.1920928955078125e-07)
        t = tl.where(u > 1.0 + y / ps, u - 1.0, y / ps)  # NaN stays NaN
        # log1p(t) = log(u) * t / (u - 1) (exact where u rounds to 1: then t)
        log1p = tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))
        y = tl.where(y > 0, y, log1p)
    return y


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


# ---- stochastic rounding to bfloat16 (the optimizers' bf16_stochastic_round) -------------------------
# The twin of csrc/common/stochastic_round.h: the same hash and rounding, bit for bit (keep them alike).
MIX_MUL1 = tl.constexpr(0x7FEB352D)
MIX_MUL2 = tl.constexpr(0x846CA68B)
INDEX_HIGH_SALT = tl.constexpr(0x9E3779B9)
FLOAT_EXPONENT_MASK = tl.constexpr(0x7F800000)
FLOAT_MANTISSA_MASK = tl.constexpr(0x007FFFFF)
BELOW_BFLOAT16_MASK = tl.constexpr(0xFFFF)
BFLOAT16_NAN = tl.constexpr(0x7FC0)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values (mix32 in csrc/common/stochastic_round.h)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], MIX_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], MIX_MUL2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def stochastic_round_key(seed_lo, seed_hi, tensor):
    """The key of a tensor's random bits (uint32 halves of the seed, the tensor's index as uint32)."""
    return mix32(seed_lo ^ mix32(seed_hi ^ mix32(tensor)))


@triton.jit
def bfloat16_round_stochastic(v, key, index):
    """The bfloat16 bit patterns (uint16) of float32 v rounded stochastically with the random bits of
    `index` (int64) under `key`: random low 16 bits added below bfloat16's mantissa, then truncated; inf
    stays inf, NaN gives c10's NaN."""
    lo = index.to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    r = mix32(mix32(key ^ lo) ^ hi ^ tl.full([], INDEX_HIGH_SALT, tl.uint32))
    bits = v.to(tl.uint32, bitcast=True)
    special = (bits & tl.full([], FLOAT_EXPONENT_MASK, tl.uint32)) == tl.full([], FLOAT_EXPONENT_MASK, tl.uint32)
    nan = special & ((bits & tl.full([], FLOAT_MANTISSA_MASK, tl.uint32)) != 0)
    up = tl.where(special, bits, bits + (r & tl.full([], BELOW_BFLOAT16_MASK, tl.uint32)))
    return tl.where(nan, tl.full([], BFLOAT16_NAN, tl.uint32), up >> 16).to(tl.uint16)


# ---- launch sizes for a GPU ---------------------------------------------------------------------------
# An H100 (SXM): what bounds the programs resident on one SM.
H100_SMS = 132
SM_REGISTERS = 65536
SM_WARPS = 64
SM_BLOCKS = 32
SM_SHARED = 228 * 1024


def resident(registers, num_warps=4, shared=0):
    """Programs of `num_warps` warps, `registers` registers per thread and `shared` bytes of shared memory
    resident on one H100 SM at once (registers are allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (SM_REGISTERS // per_warp) // num_warps
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_BLOCKS  # (1 KB per block reserved)
    return max(1, min(by_registers, SM_WARPS // num_warps, SM_BLOCKS, by_shared))


def two_waves(registers, num_warps=4, shared=0, sms=H100_SMS):
    """The programs that fill an H100 twice over at the occupancy those resources allow: a launch over a
    large tensor gets at least this many where its shape allows, so that no SM idles through the tail."""
    return 2 * sms * resident(registers, num_warps, shared)


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

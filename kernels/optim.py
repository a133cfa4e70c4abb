"""Triton kernels of the optim family: one launch updates every tensor of a (device, dtype) group.

Each launch reads one int64 table (cached on the device: kernels/_common.py's device_table) that
says everything but the hyper-parameters: a header (where lr, grad_scale and found_inf live and in
which dtype, the options), one row per tensor (its size, the addresses of its parameter, gradient,
state, step count and SGD new-buffer flag) and the chunk list (tensor, start) whose BLOCK-element
pieces the programs take.
Hyper-parameters travel in a float64 table, so they are runtime values (no recompiles, exact in
float64). Options (maximize, nesterov, amsgrad...) are runtime flags too: a uniform branch costs
nothing in a memory-bound kernel, and the only compile-time parameter left is the dtype, so each
update kernel has four variants (aot_variants()). lr, grad_scale, found_inf and the step counts are
read on the device in their own dtype (float32 or float64). The host side (argument checks) is the
C++ one every backend shares (csrc/optim.h); these launchers get checked tensors. Math as
pyops/optim/fused.py.
"""

import torch
import triton
import triton.language as tl

from ._common import bfloat16_round_stochastic, compute_dtype, device_table, stochastic_round_key

BLOCK = 1024  # elements per program of an update kernel
FINISH_BLOCK = 128  # tensors per program of the step-count kernel

# ---- the launch table (int64): header slots ------------------------------------------------------
LR_ADDRESS = tl.constexpr(0)
LR_IS_F64 = tl.constexpr(1)
GRAD_SCALE_ADDRESS = tl.constexpr(2)  # 0: no grad scaler factor
GRAD_SCALE_IS_F64 = tl.constexpr(3)
FOUND_INF_ADDRESS = tl.constexpr(4)  # 0: no found_inf
FOUND_INF_IS_F64 = tl.constexpr(5)
MAXIMIZE = tl.constexpr(6)
OPTION_SLOTS = tl.constexpr(7)  # each algorithm's boolean options, named below
TENSOR_COUNT = tl.constexpr(9)
CHUNKS_AT = tl.constexpr(10)  # where the (tensor, start) pairs begin
STOCHASTIC_ROUND = tl.constexpr(11)  # bf16_stochastic_round on a bfloat16 group (seed: the hyper table)
HEADER_SIZE = tl.constexpr(12)
SGD_NESTEROV = OPTION_SLOTS
ADAM_AMSGRAD = OPTION_SLOTS
ADAM_DECOUPLED = OPTION_SLOTS + 1
RMSPROP_CENTERED = OPTION_SLOTS

# ---- a tensor's row: its size and addresses --------------------------------------------------------
ROW_NUMEL = tl.constexpr(0)
ROW_PARAM = tl.constexpr(1)
ROW_GRAD = tl.constexpr(2)
ROW_STATE = tl.constexpr(3)  # up to three state tensors, named per algorithm below
ROW_STEP = tl.constexpr(6)  # 0: no step count
ROW_STEP_IS_F64 = tl.constexpr(7)
ROW_NEW_BUFFER = tl.constexpr(8)  # SGD: 0, or a bool/uint8 flag saying the momentum buffer is new
ROW_SIZE = tl.constexpr(9)
MAX_STATES = 3
SGD_MOMENTUM_BUFFER = ROW_STATE
ADAM_EXP_AVG = ROW_STATE
ADAM_EXP_AVG_SQ = ROW_STATE + 1
ADAM_MAX_EXP_AVG_SQ = ROW_STATE + 2
ADAGRAD_SUM = ROW_STATE
RMSPROP_SQUARE_AVG = ROW_STATE
RMSPROP_GRAD_AVG = ROW_STATE + 1
RMSPROP_MOMENTUM_BUFFER = ROW_STATE + 2

# ---- the hyper-parameter table (float64), per algorithm --------------------------------------------
SGD_MOMENTUM = tl.constexpr(0)
SGD_DAMPENING = tl.constexpr(1)
SGD_WEIGHT_DECAY = tl.constexpr(2)
ADAM_BETA1 = tl.constexpr(0)
ADAM_BETA2 = tl.constexpr(1)
ADAM_WEIGHT_DECAY = tl.constexpr(2)
ADAM_EPS = tl.constexpr(3)
ADAGRAD_LR_DECAY = tl.constexpr(0)
ADAGRAD_WEIGHT_DECAY = tl.constexpr(1)
ADAGRAD_EPS = tl.constexpr(2)
RMSPROP_ALPHA = tl.constexpr(0)
RMSPROP_EPS = tl.constexpr(1)
RMSPROP_WEIGHT_DECAY = tl.constexpr(2)
RMSPROP_MOMENTUM = tl.constexpr(3)
SEED_LO = tl.constexpr(4)  # stochastic rounding's seed as two uint32 halves (exact in float64), every algorithm
SEED_HI = tl.constexpr(5)
HYPER_SIZE = 6


# ---- shared pieces (few: the interpreter re-patches the language at every nested jit call, ~0.25 ms
# each, so helpers that are one line are written out where they are used) -------------------------
@triton.jit
def _scalar(base, ADDRESS: tl.constexpr, IS_F64: tl.constexpr):
    """The one-element float32/float64 tensor whose address and dtype flag sit at base[ADDRESS] and
    base[IS_F64], as float64 (0 where the address is 0: absent)."""
    address = tl.load(base + ADDRESS)
    is_f64 = tl.load(base + IS_F64) != 0
    present = address != 0
    v64 = tl.load(address.to(tl.pointer_type(tl.float64)), mask=present & is_f64, other=0.0)
    v32 = tl.load(address.to(tl.pointer_type(tl.float32)), mask=present & (~is_f64), other=0.0)
    return tl.where(is_f64, v64, v32.to(tl.float64))


@triton.jit
def _chunk(table, BLOCK: tl.constexpr):
    """This program's tensor row, element offsets and mask (all false when found_inf is set: the
    grad scaler skips the step and nothing is touched). (x == 0).to(int32) != 0: the interpreter types
    a float comparison by its operands, which numpy's bitwise ops then refuse to combine."""
    pid = tl.program_id(0).to(tl.int64)
    pair = table + tl.load(table + CHUNKS_AT) + 2 * pid
    row = table + HEADER_SIZE + tl.load(pair) * ROW_SIZE
    offs = tl.load(pair + 1) + tl.arange(0, BLOCK).to(tl.int64)
    not_found = (_scalar(table, FOUND_INF_ADDRESS, FOUND_INF_IS_F64) == 0).to(tl.int32) != 0
    return row, offs, (offs < tl.load(row + ROW_NUMEL)) & not_found


@triton.jit
def _gradient(table, row, offs, mask, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """The gradient as the update uses it: unscaled by the grad scaler's factor (and written back
    so), negated to maximize."""
    g_ptr = tl.load(row + ROW_GRAD).to(tl.pointer_type(DTYPE))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if tl.load(table + GRAD_SCALE_ADDRESS) != 0:
        inv_scale = (1.0 / _scalar(table, GRAD_SCALE_ADDRESS, GRAD_SCALE_IS_F64)).to(COMPUTE)
        unscaled = (g * inv_scale).to(DTYPE)
        tl.store(g_ptr + offs, unscaled, mask=mask)
        g = unscaled.to(COMPUTE)
    if tl.load(table + MAXIMIZE) != 0:
        g = -g
    return g


@triton.jit
def _store_param(table, hyper, p_ptr, offs, p, mask, DTYPE: tl.constexpr):
    """The parameter's new value p stored, rounded to nearest, or stochastically for a bfloat16 group
    under bf16_stochastic_round (its bits written through a uint16 view; kernels/_common.py)."""
    if DTYPE == tl.bfloat16:
        if tl.load(table + STOCHASTIC_ROUND) != 0:
            pid = tl.program_id(0).to(tl.int64)
            tensor = tl.load(table + tl.load(table + CHUNKS_AT) + 2 * pid)
            seed_lo = tl.load(hyper + SEED_LO).to(tl.uint32)
            seed_hi = tl.load(hyper + SEED_HI).to(tl.uint32)
            key = stochastic_round_key(seed_lo, seed_hi, tensor.to(tl.uint32))
            bits = bfloat16_round_stochastic(p.to(tl.float32), key, offs)
            tl.store(p_ptr.to(tl.pointer_type(tl.uint16)) + offs, bits, mask=mask)
        else:
            tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)


# ---- the update kernels, one per algorithm. State is stored and read back rounded to DTYPE, as
# torch's update reads its state; lr_is_f32: torch computes step-size scalars in a tensor lr's dtype.
@triton.jit
def _sgd_kernel(table, hyper, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row, offs, mask = _chunk(table, BLOCK)
    g = _gradient(table, row, offs, mask, DTYPE, COMPUTE)
    p_ptr = tl.load(row + ROW_PARAM).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    lr = _scalar(table, LR_ADDRESS, LR_IS_F64).to(COMPUTE)
    momentum = tl.load(hyper + SGD_MOMENTUM)
    weight_decay = tl.load(hyper + SGD_WEIGHT_DECAY)
    if weight_decay != 0:
        g = g + weight_decay.to(COMPUTE) * p
    if momentum != 0:
        buf_ptr = tl.load(row + SGD_MOMENTUM_BUFFER).to(tl.pointer_type(DTYPE))
        flag = tl.load(row + ROW_NEW_BUFFER)
        is_new = tl.load(flag.to(tl.pointer_type(tl.uint8)), mask=flag != 0, other=0) != 0
        dampening = tl.load(hyper + SGD_DAMPENING)
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        buf = tl.where(is_new, g, momentum.to(COMPUTE) * buf + (1.0 - dampening).to(COMPUTE) * g).to(DTYPE)
        tl.store(buf_ptr + offs, buf, mask=mask)
        if tl.load(table + SGD_NESTEROV) != 0:
            g = g + momentum.to(COMPUTE) * buf.to(COMPUTE)
        else:
            g = buf.to(COMPUTE)
    _store_param(table, hyper, p_ptr, offs, p - lr * g, mask, DTYPE)


@triton.jit
def _adam_kernel(
    table, hyper, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, STATE: tl.constexpr
):  # STATE: the states' dtype (DTYPE, or bfloat16 for float32 parameters)
    row, offs, mask = _chunk(table, BLOCK)
    g = _gradient(table, row, offs, mask, DTYPE, COMPUTE)
    p_ptr = tl.load(row + ROW_PARAM).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    lr = _scalar(table, LR_ADDRESS, LR_IS_F64)
    lr_is_f32 = tl.load(table + LR_IS_F64) == 0
    beta1 = tl.load(hyper + ADAM_BETA1)
    beta2 = tl.load(hyper + ADAM_BETA2)
    weight_decay = tl.load(hyper + ADAM_WEIGHT_DECAY)
    step = _scalar(row, ROW_STEP, ROW_STEP_IS_F64) + 1.0  # the finish kernel stores it
    # torch's bias corrections in float64 (beta ** step as exp(step log beta))
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    step_size = tl.where(
        lr_is_f32, (lr.to(tl.float32) / bias_correction1.to(tl.float32)).to(tl.float64), lr / bias_correction1
    )
    inv_bias_correction2_sqrt = 1.0 / tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    if weight_decay != 0:
        if tl.load(table + ADAM_DECOUPLED) != 0:
            decay = tl.where(
                lr_is_f32,
                (1.0 - lr.to(tl.float32) * weight_decay.to(tl.float32)).to(tl.float64),
                1.0 - lr * weight_decay,
            )
            p = p * decay.to(COMPUTE)
        else:
            g = g + weight_decay.to(COMPUTE) * p
    m_ptr = tl.load(row + ADAM_EXP_AVG).to(tl.pointer_type(STATE))
    v_ptr = tl.load(row + ADAM_EXP_AVG_SQ).to(tl.pointer_type(STATE))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    b1 = beta1.to(COMPUTE)
    b2 = beta2.to(COMPUTE)
    m = (m + (1.0 - b1) * (g - m)).to(STATE)  # lerp
    v = (v * b2 + (1.0 - b2) * g * g).to(STATE)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    v = v.to(COMPUTE)
    if tl.load(table + ADAM_AMSGRAD) != 0:
        vmax_ptr = tl.load(row + ADAM_MAX_EXP_AVG_SQ).to(tl.pointer_type(STATE))
        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        vmax = tl.where(vmax != vmax, vmax, tl.where(vmax > v, vmax, v)).to(STATE)  # NaN wins, as torch.maximum
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        v = vmax.to(COMPUTE)
    eps = tl.load(hyper + ADAM_EPS).to(COMPUTE)
    denom = tl.sqrt(v) * inv_bias_correction2_sqrt.to(COMPUTE) + eps
    _store_param(table, hyper, p_ptr, offs, p - step_size.to(COMPUTE) * m.to(COMPUTE) / denom, mask, DTYPE)


@triton.jit
def _adagrad_kernel(table, hyper, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row, offs, mask = _chunk(table, BLOCK)
    g = _gradient(table, row, offs, mask, DTYPE, COMPUTE)
    p_ptr = tl.load(row + ROW_PARAM).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    lr = _scalar(table, LR_ADDRESS, LR_IS_F64)
    lr_is_f32 = tl.load(table + LR_IS_F64) == 0
    weight_decay = tl.load(hyper + ADAGRAD_WEIGHT_DECAY)
    step = _scalar(row, ROW_STEP, ROW_STEP_IS_F64) + 1.0  # the finish kernel stores it
    denominator = 1.0 + (step - 1.0) * tl.load(hyper + ADAGRAD_LR_DECAY)
    clr = tl.where(lr_is_f32, (lr.to(tl.float32) / denominator.to(tl.float32)).to(tl.float64), lr / denominator)
    if weight_decay != 0:
        g = g + weight_decay.to(COMPUTE) * p
    s_ptr = tl.load(row + ADAGRAD_SUM).to(tl.pointer_type(DTYPE))
    s = (tl.load(s_ptr + offs, mask=mask, other=0.0).to(COMPUTE) + g * g).to(DTYPE)
    tl.store(s_ptr + offs, s, mask=mask)
    eps = tl.load(hyper + ADAGRAD_EPS).to(COMPUTE)
    _store_param(table, hyper, p_ptr, offs, p - clr.to(COMPUTE) * g / (tl.sqrt(s.to(COMPUTE)) + eps), mask, DTYPE)


@triton.jit
def _rmsprop_kernel(table, hyper, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row, offs, mask = _chunk(table, BLOCK)
    g = _gradient(table, row, offs, mask, DTYPE, COMPUTE)
    p_ptr = tl.load(row + ROW_PARAM).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    lr = _scalar(table, LR_ADDRESS, LR_IS_F64).to(COMPUTE)
    alpha = tl.load(hyper + RMSPROP_ALPHA).to(COMPUTE)
    eps = tl.load(hyper + RMSPROP_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper + RMSPROP_WEIGHT_DECAY)
    momentum = tl.load(hyper + RMSPROP_MOMENTUM)
    if weight_decay != 0:
        g = g + weight_decay.to(COMPUTE) * p
    sq_ptr = tl.load(row + RMSPROP_SQUARE_AVG).to(tl.pointer_type(DTYPE))
    sq = (tl.load(sq_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * alpha + (1.0 - alpha) * g * g).to(DTYPE)
    tl.store(sq_ptr + offs, sq, mask=mask)
    sq = sq.to(COMPUTE)
    if tl.load(table + RMSPROP_CENTERED) != 0:
        ga_ptr = tl.load(row + RMSPROP_GRAD_AVG).to(tl.pointer_type(DTYPE))
        ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        ga = (ga + (1.0 - alpha) * (g - ga)).to(DTYPE)  # lerp
        tl.store(ga_ptr + offs, ga, mask=mask)
        avg = tl.sqrt(sq - ga.to(COMPUTE) * ga.to(COMPUTE)) + eps
    else:
        avg = tl.sqrt(sq) + eps
    if momentum > 0:
        buf_ptr = tl.load(row + RMSPROP_MOMENTUM_BUFFER).to(tl.pointer_type(DTYPE))
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * momentum.to(COMPUTE) + g / avg
        buf = buf.to(DTYPE)
        tl.store(buf_ptr + offs, buf, mask=mask)
        p = p - lr * buf.to(COMPUTE)
    else:
        p = p - lr * g / avg
    _store_param(table, hyper, p_ptr, offs, p, mask, DTYPE)


@triton.jit
def _finish_kernel(table, BLOCK: tl.constexpr):
    """After the update: step counts advance and applied new-buffer flags clear, unless found_inf
    is set (a separate launch, since every program of a tensor reads its step first)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    not_found = (_scalar(table, FOUND_INF_ADDRESS, FOUND_INF_IS_F64) == 0).to(tl.int32) != 0
    live = (idx < tl.load(table + TENSOR_COUNT)) & not_found
    rows = table + HEADER_SIZE + idx * ROW_SIZE
    step = tl.load(rows + ROW_STEP, mask=live, other=0)
    is_f64 = tl.load(rows + ROW_STEP_IS_F64, mask=live, other=0) != 0
    as_f64 = live & (step != 0) & is_f64
    as_f32 = live & (step != 0) & (~is_f64)
    step64 = step.to(tl.pointer_type(tl.float64))
    step32 = step.to(tl.pointer_type(tl.float32))
    tl.store(step64, tl.load(step64, mask=as_f64, other=0.0) + 1.0, mask=as_f64)
    tl.store(step32, tl.load(step32, mask=as_f32, other=0.0) + 1.0, mask=as_f32)
    flag = tl.load(rows + ROW_NEW_BUFFER, mask=live, other=0)
    tl.store(flag.to(tl.pointer_type(tl.uint8)), tl.zeros([BLOCK], tl.uint8), mask=live & (flag != 0))


# ---- the launches --------------------------------------------------------------------------------
UPDATE_KERNELS = {"sgd": _sgd_kernel, "adam": _adam_kernel, "adagrad": _adagrad_kernel, "rmsprop": _rmsprop_kernel}
# torch dtype -> the Triton dtype parameters and state are stored in
DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
UPDATE_SIGNATURE = {"table": "*i64", "hyper": "*fp64"}
FINISH_SIGNATURE = {"table": "*i64"}
# Compile options of the update launches: no fused multiply-add, so that the per-step scalars (1 - lr *
# weight_decay, 1 + (step - 1) * lr_decay) round each product as torch's separate ops do (a float32 lr
# makes one float32 ulp of 1 - lr * wd a 6e-8 relative error in a float64 parameter). The kernels are
# memory-bound: the unfused element math costs nothing measurable.
UPDATE_OPTIONS = {"enable_fp_fusion": False}


def _update_constexprs(dtype, name=None, state_dtype=None):
    """The compile-time parameters of an update launch: the parameters' dtype, the compute dtype it
    implies (float32 for half types, as torch's opmath), the block size; Adam's also its states' dtype
    (the parameters', or bfloat16 for float32 parameters: ADAM_STATE_DTYPES)."""
    out = {"DTYPE": DTYPES[dtype], "COMPUTE": compute_dtype(dtype), "BLOCK": BLOCK}
    if name == "adam":
        out["STATE"] = DTYPES[state_dtype or dtype]
    return out


# The states' dtypes of the Adam launches besides the parameters' own: (parameters, states).
ADAM_STATE_DTYPES = ((torch.float32, torch.bfloat16),)


def _finish_constexprs():
    return {"BLOCK": FINISH_BLOCK}


def aot_variants():
    """Every launch the launchers below make: (label, kernel, signature, constexprs)."""
    variants = [
        (f"{name} {str(dtype).replace('torch.', '')}", kernel, dict(UPDATE_SIGNATURE), _update_constexprs(dtype, name))
        for name, kernel in UPDATE_KERNELS.items()
        for dtype in DTYPES
    ]
    variants += [
        (f"adam {str(p).replace('torch.', '')} state {str(st).replace('torch.', '')}", _adam_kernel,
         dict(UPDATE_SIGNATURE), _update_constexprs(p, "adam", st))
        for p, st in ADAM_STATE_DTYPES
    ]  # fmt: skip
    variants += _adam_8bit_variants()
    return variants + [("finish", _finish_kernel, dict(FINISH_SIGNATURE), _finish_constexprs())]


def _address(t):
    return t.data_ptr() if t is not None else 0


def _launch(
    name,
    params,
    grads,
    states,
    steps,
    new_buffers,
    lr,
    grad_scale,
    found_inf,
    maximize,
    options,
    hyper,
    rounding=(False, 0),
    state_dtype=None,
):
    """One update launch over the group, then (where steps or flags exist) the finish launch.
    states: up to MAX_STATES lists (empty where unused); options: (header slot, bool) pairs; rounding:
    (bf16_stochastic_round, seed), the flag set only for bfloat16 groups (csrc/optim.h); state_dtype:
    Adam's states' dtype where not the parameters'."""
    n = len(params)
    device, dtype = params[0].device, params[0].dtype
    header = [0] * HEADER_SIZE.value
    header[LR_ADDRESS] = lr.data_ptr()
    header[LR_IS_F64] = int(lr.dtype == torch.float64)
    if grad_scale is not None:
        header[GRAD_SCALE_ADDRESS] = grad_scale.data_ptr()
        header[GRAD_SCALE_IS_F64] = int(grad_scale.dtype == torch.float64)
    if found_inf is not None:
        header[FOUND_INF_ADDRESS] = found_inf.data_ptr()
        header[FOUND_INF_IS_F64] = int(found_inf.dtype == torch.float64)
    header[MAXIMIZE] = int(maximize)
    for slot, value in options:
        header[slot] = int(value)
    header[TENSOR_COUNT] = n
    header[STOCHASTIC_ROUND] = int(rounding[0])
    if rounding[0] and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "pyops: bf16_stochastic_round=True cannot be captured in a CUDA graph (each replay would reuse the "
            "captured seed); capture the step without it, or use master_weights=True"
        )
    if rounding[0]:  # a new seed each step: the hyper table changes with it (uploaded, not cached for long)
        hyper = list(hyper)
        hyper[SEED_LO], hyper[SEED_HI] = rounding[1] & 0xFFFFFFFF, (rounding[1] >> 32) & 0xFFFFFFFF
    states = [s for s in states] + [[]] * (MAX_STATES - len(states))
    rows, chunks = [], []
    for i, p in enumerate(params):
        numel = p.numel()
        step = steps[i] if steps else None
        rows += [
            numel,
            p.data_ptr(),
            grads[i].data_ptr(),
            *(s[i].data_ptr() if s else 0 for s in states),
            _address(step),
            int(step is not None and step.dtype == torch.float64),
            new_buffers[i].data_ptr() if new_buffers else 0,
        ]
        for start in range(0, numel, BLOCK):
            chunks += [i, start]
    header[CHUNKS_AT] = HEADER_SIZE.value + len(rows)
    table = device_table(header + rows + chunks, torch.int64, device)
    if chunks:
        hyper_table = device_table(hyper, torch.float64, device)
        constexprs = _update_constexprs(dtype, name, state_dtype)
        UPDATE_KERNELS[name][(len(chunks) // 2,)](table, hyper_table, **constexprs, **UPDATE_OPTIONS)
    if steps or new_buffers:
        _finish_kernel[(triton.cdiv(n, FINISH_BLOCK),)](table, **_finish_constexprs())


def _hyper(*slots):
    """The hyper-parameter table from (slot, value) pairs."""
    values = [0.0] * HYPER_SIZE
    for slot, value in slots:
        values[slot] = float(value)
    return values


# The launchers take the primitives' own arguments (csrc/primitives.h), checked by csrc/optim.h (which
# clears bf16_stochastic_round for groups of another dtype than bfloat16).
def sgd_step(
    params,
    grads,
    momentum_buffers,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    new_buffers,
    grad_scale,
    found_inf,
    bf16_stochastic_round=False,
    seed=0,
):
    hyper = _hyper((SGD_MOMENTUM, momentum), (SGD_DAMPENING, dampening), (SGD_WEIGHT_DECAY, weight_decay))
    _launch(
        "sgd",
        params,
        grads,
        [momentum_buffers if momentum != 0 else []],
        [],
        new_buffers,
        lr,
        grad_scale,
        found_inf,
        maximize,
        [(SGD_NESTEROV, nesterov)],
        hyper,
        (bf16_stochastic_round, seed),
    )


def adam_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    amsgrad,
    maximize,
    decoupled,
    grad_scale,
    found_inf,
    bf16_stochastic_round=False,
    seed=0,
):
    hyper = _hyper((ADAM_BETA1, beta1), (ADAM_BETA2, beta2), (ADAM_WEIGHT_DECAY, weight_decay), (ADAM_EPS, eps))
    # one launch per states' dtype: the parameters', or bfloat16 for float32 parameters (ADAM_STATE_DTYPES;
    # a parameter's states share one: csrc/optim.h checks)
    by_state = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        by_state.setdefault(m.dtype if (p.dtype, m.dtype) in ADAM_STATE_DTYPES else None, []).append(i)
    for state_dtype, idx in by_state.items():
        pick = (lambda lst, idx=idx: [lst[i] for i in idx]) if len(by_state) > 1 else (lambda lst: lst)
        _launch(
            "adam",
            pick(params),
            pick(grads),
            [pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else []],
            pick(steps),
            [],
            lr,
            grad_scale,
            found_inf,
            maximize,
            [(ADAM_AMSGRAD, amsgrad), (ADAM_DECOUPLED, decoupled)],
            hyper,
            (bf16_stochastic_round, seed),
            state_dtype,
        )


def adagrad_step(
    params,
    grads,
    sums,
    steps,
    lr,
    lr_decay,
    weight_decay,
    eps,
    maximize,
    grad_scale,
    found_inf,
    bf16_stochastic_round=False,
    seed=0,
):
    hyper = _hyper((ADAGRAD_LR_DECAY, lr_decay), (ADAGRAD_WEIGHT_DECAY, weight_decay), (ADAGRAD_EPS, eps))
    rounding = (bf16_stochastic_round, seed)
    _launch("adagrad", params, grads, [sums], steps, [], lr, grad_scale, found_inf, maximize, [], hyper, rounding)


def rmsprop_step(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    steps,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
    grad_scale,
    found_inf,
    bf16_stochastic_round=False,
    seed=0,
):
    hyper = _hyper(
        (RMSPROP_ALPHA, alpha), (RMSPROP_EPS, eps), (RMSPROP_WEIGHT_DECAY, weight_decay), (RMSPROP_MOMENTUM, momentum)
    )
    _launch(
        "rmsprop",
        params,
        grads,
        [square_avgs, grad_avgs if centered else [], momentum_buffers if momentum > 0 else []],
        steps,
        [],
        lr,
        grad_scale,
        found_inf,
        maximize,
        [(RMSPROP_CENTERED, centered)],
        hyper,
        (bf16_stochastic_round, seed),
    )


# ---- Adam/AdamW with 8-bit blockwise states (pyops::adam_step_8bit_, csrc/optim.h's Adam8bitStep) ----
# One program per block of QUANT_BLOCK elements (one float32 absmax each) across the group's tensors:
# dequantize (map[code] * absmax), the float32 Adam/AdamW update (float64 for float64 parameters), the
# block's new absmax (NaN when it holds a NaN), requantize: code = the number of the map's float32
# midpoints (q[c] + q[c+1]) * 0.5 below state * (1 / absmax), found by an 8-step binary search (two
# gathers from the 1 KB map a step). Every operation is a separate IEEE-rounded one (no fused
# multiply-add: UPDATE_OPTIONS; div_rn and sqrt_rn), in the order csrc/optim.h states the update, so
# the codes are those of that float32 math bit for bit. The maps' order is checked on the host where
# they are in host memory (csrc/triton/optim.cpp), not on a GPU (a device read; the optimizers pass
# bitsandbytes' sorted maps): unsorted maps give other codes there, never a read out of bounds.
# The table: the header and rows of the update kernels (state slots: exp_avg codes, exp_avg_sq codes,
# exp_avg absmaxs; no new-buffer flag, so _finish_kernel advances the steps), then per tensor the address
# of its exp_avg_sq absmaxs, then the two maps' addresses, then the (tensor, start) pairs of the blocks.
QUANT_BLOCK = 256  # csrc/optim.h's kQuantBlock
QUANT_MAP_SIZE: tl.constexpr = tl.constexpr(256)
ADAM8_EXP_AVG = ROW_STATE  # uint8 codes
ADAM8_EXP_AVG_SQ = ROW_STATE + 1  # uint8 codes
ADAM8_EXP_AVG_ABSMAX = ROW_STATE + 2  # float32, one per block
NAN: tl.constexpr = tl.constexpr(float("nan"))
# Waves: 47 to 56 registers a thread at 4 warps (ptxas, sm_90) leave 9 to 10 programs resident per SM, so
# a launch over 1M elements (4,096 programs) makes 3 waves or more on an H100.


@triton.jit
def _requantize(x, inv, qmap, BLOCK: tl.constexpr):
    """The codes of x * inv: how many of the map's 255 midpoints lie below it (a NaN: 0)."""
    y = x * inv
    code = tl.zeros([BLOCK], tl.int32)
    for k in tl.static_range(8):
        half = 128 >> k  # code + half - 1 <= 254: the gathers stay in the map
        lo = tl.load(qmap + (code + half - 1))
        hi = tl.load(qmap + (code + half))
        code = tl.where((lo + hi) * 0.5 < y, code + half, code)
    return code.to(tl.uint8)


@triton.jit
def _adam_8bit_kernel(table, hyper, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pair = table + tl.load(table + CHUNKS_AT) + 2 * pid
    tensor = tl.load(pair)
    start = tl.load(pair + 1)
    count = tl.load(table + TENSOR_COUNT)
    row = table + HEADER_SIZE + tensor * ROW_SIZE
    extra = table + HEADER_SIZE + count * ROW_SIZE  # exp_avg_sq absmaxs' addresses, then the maps'
    not_found = (_scalar(table, FOUND_INF_ADDRESS, FOUND_INF_IS_F64) == 0).to(tl.int32) != 0
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (offs < tl.load(row + ROW_NUMEL)) & not_found
    block = start // BLOCK
    g = _gradient(table, row, offs, mask, DTYPE, COMPUTE)
    p_ptr = tl.load(row + ROW_PARAM).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    # the per-tensor scalars as _adam_kernel computes them (float64; lr / bias correction rounded once)
    lr = _scalar(table, LR_ADDRESS, LR_IS_F64)
    lr_is_f32 = tl.load(table + LR_IS_F64) == 0
    beta1 = tl.load(hyper + ADAM_BETA1)
    beta2 = tl.load(hyper + ADAM_BETA2)
    weight_decay = tl.load(hyper + ADAM_WEIGHT_DECAY)
    step = _scalar(row, ROW_STEP, ROW_STEP_IS_F64) + 1.0  # the finish kernel stores it
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    step_size = tl.where(
        lr_is_f32,
        tl.div_rn(lr.to(tl.float32), bias_correction1.to(tl.float32)).to(tl.float64),
        lr / bias_correction1,
    )
    inv_bias_correction2_sqrt = 1.0 / tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    if weight_decay != 0:
        if tl.load(table + ADAM_DECOUPLED) != 0:
            decay = tl.where(
                lr_is_f32,
                (1.0 - lr.to(tl.float32) * weight_decay.to(tl.float32)).to(tl.float64),
                1.0 - lr * weight_decay,
            )
            p = p * decay.to(COMPUTE)
        else:
            g = g + weight_decay.to(COMPUTE) * p
    # dequantize: map[code] * absmax in float32
    qmap_signed = tl.load(extra + count).to(tl.pointer_type(tl.float32))
    qmap_unsigned = tl.load(extra + count + 1).to(tl.pointer_type(tl.float32))
    mc_ptr = tl.load(row + ADAM8_EXP_AVG).to(tl.pointer_type(tl.uint8))
    vc_ptr = tl.load(row + ADAM8_EXP_AVG_SQ).to(tl.pointer_type(tl.uint8))
    ma_ptr = tl.load(row + ADAM8_EXP_AVG_ABSMAX).to(tl.pointer_type(tl.float32)) + block
    va_ptr = tl.load(extra + tensor).to(tl.pointer_type(tl.float32)) + block
    mc = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    m0 = (tl.load(qmap_signed + mc) * tl.load(ma_ptr)).to(COMPUTE)
    v0 = (tl.load(qmap_unsigned + vc) * tl.load(va_ptr)).to(COMPUTE)
    # the update
    b1 = beta1.to(COMPUTE)
    b2 = beta2.to(COMPUTE)
    m = m0 + (1.0 - b1) * (g - m0)
    v = v0 * b2 + (1.0 - b2) * g * g
    eps = tl.load(hyper + ADAM_EPS).to(COMPUTE)
    if COMPUTE == tl.float64:  # float64 division and square root are IEEE-rounded on every target
        denom = tl.sqrt(v) * inv_bias_correction2_sqrt.to(COMPUTE) + eps
        p = p - step_size.to(COMPUTE) * m / denom
    else:
        denom = tl.sqrt_rn(v) * inv_bias_correction2_sqrt.to(COMPUTE) + eps
        p = p - tl.div_rn(step_size.to(COMPUTE) * m, denom)
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    # the block's new absmaxs (NaN for both where a state is NaN), then the codes
    m32 = tl.where(mask, m.to(tl.float32), 0.0)
    v32 = tl.where(mask, v.to(tl.float32), 0.0)
    has_nan = tl.max(((m32 != m32) | (v32 != v32)).to(tl.int32), axis=0) != 0
    m_absmax = tl.where(has_nan, NAN, tl.max(tl.where(m32 != m32, 0.0, tl.abs(m32)), axis=0))
    v_absmax = tl.where(has_nan, NAN, tl.max(tl.where(v32 != v32, 0.0, tl.abs(v32)), axis=0))
    tl.store(ma_ptr, m_absmax, mask=not_found)
    tl.store(va_ptr, v_absmax, mask=not_found)
    one = tl.full([], 1.0, tl.float32)
    m_inv = tl.where(m_absmax > 0, tl.div_rn(one, tl.where(m_absmax > 0, m_absmax, one)), 0.0)
    v_inv = tl.where(v_absmax > 0, tl.div_rn(one, tl.where(v_absmax > 0, v_absmax, one)), 0.0)
    tl.store(mc_ptr + offs, _requantize(m32, m_inv, qmap_signed, BLOCK), mask=mask)
    tl.store(vc_ptr + offs, _requantize(v32, v_inv, qmap_unsigned, BLOCK), mask=mask)


def _adam_8bit_constexprs(dtype):
    return {"DTYPE": DTYPES[dtype], "COMPUTE": compute_dtype(dtype), "BLOCK": QUANT_BLOCK}


def _adam_8bit_variants():
    return [
        (f"adam_8bit {str(dtype).replace('torch.', '')}", _adam_8bit_kernel, dict(UPDATE_SIGNATURE),
         _adam_8bit_constexprs(dtype))
        for dtype in DTYPES
    ]  # fmt: skip


def adam_step_8bit(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    exp_avg_absmaxs,
    exp_avg_sq_absmaxs,
    steps,
    qmap_signed,
    qmap_unsigned,
    block_size,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    maximize,
    decoupled,
    grad_scale,
    found_inf,
):
    """The launcher of pyops::adam_step_8bit_triton_ (arguments checked by csrc/optim.h: block_size is
    QUANT_BLOCK, the maps 256 float32 values, the absmaxs one float32 per block)."""
    n = len(params)
    device, dtype = params[0].device, params[0].dtype
    header = [0] * HEADER_SIZE.value
    header[LR_ADDRESS] = lr.data_ptr()
    header[LR_IS_F64] = int(lr.dtype == torch.float64)
    if grad_scale is not None:
        header[GRAD_SCALE_ADDRESS] = grad_scale.data_ptr()
        header[GRAD_SCALE_IS_F64] = int(grad_scale.dtype == torch.float64)
    if found_inf is not None:
        header[FOUND_INF_ADDRESS] = found_inf.data_ptr()
        header[FOUND_INF_IS_F64] = int(found_inf.dtype == torch.float64)
    header[MAXIMIZE] = int(maximize)
    header[ADAM_DECOUPLED] = int(decoupled)
    header[TENSOR_COUNT] = n
    rows, chunks = [], []
    for i, p in enumerate(params):
        numel = p.numel()
        rows += [
            numel,
            p.data_ptr(),
            grads[i].data_ptr(),
            exp_avgs[i].data_ptr(),
            exp_avg_sqs[i].data_ptr(),
            exp_avg_absmaxs[i].data_ptr(),
            steps[i].data_ptr(),
            int(steps[i].dtype == torch.float64),
            0,
        ]
        for start in range(0, numel, QUANT_BLOCK):
            chunks += [i, start]
    extra = [t.data_ptr() for t in exp_avg_sq_absmaxs] + [qmap_signed.data_ptr(), qmap_unsigned.data_ptr()]
    header[CHUNKS_AT] = HEADER_SIZE.value + len(rows) + len(extra)
    table = device_table(header + rows + extra + chunks, torch.int64, device)
    if chunks:
        hyper = _hyper((ADAM_BETA1, beta1), (ADAM_BETA2, beta2), (ADAM_WEIGHT_DECAY, weight_decay), (ADAM_EPS, eps))
        hyper_table = device_table(hyper, torch.float64, device)
        _adam_8bit_kernel[(len(chunks) // 2,)](table, hyper_table, **_adam_8bit_constexprs(dtype), **UPDATE_OPTIONS)
    _finish_kernel[(triton.cdiv(n, FINISH_BLOCK),)](table, **_finish_constexprs())

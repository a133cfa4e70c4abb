"""Adam/AdamW with quantized states: 8-bit blockwise (`state_dtype="8bit"`, `Adam8bit`, `AdamW8bit`) and
bfloat16 (`state_dtype=torch.bfloat16`).

8-bit states, as bitsandbytes' blockwise 8-bit optimizers and torchao's AdamW8bit keep them: exp_avg and
exp_avg_sq are uint8 codes (the parameter's shape and strides) into a 256-value map, and each block of
BLOCK_SIZE = 256 elements (in memory order) keeps one float32 absmax, so a state element is
map[code] * absmax: (1 + 1) + 2 * 4 / 256 = 2.03 bytes a parameter, against 8 for float32 states. The
maps are bitsandbytes' "dynamic tree" maps (`dynamic_map`): signed for exp_avg, unsigned for exp_avg_sq
(never negative), whose decades of linear steps keep about two significant digits over seven decades
of |state| / absmax. A step dequantizes a block, applies the float32 Adam update (the same expressions
as the float32 kernel), and requantizes against the block's new absmax: code = the number of the map's
midpoints (q[c] + q[c+1]) / 2, in float32, below state * (1 / absmax) (the nearest map value, ties to
the lower one); deterministic (no stochastic rounding). A block holding inf or NaN has a NaN absmax.

bfloat16 states: exp_avg and exp_avg_sq (and max_exp_avg_sq) are bfloat16, rounded to nearest even after
each update (4 bytes a parameter); float32 parameters only (others keep states in their own dtype).

Tensors of fewer than MIN_QUANTIZED_SIZE = 4096 elements (bitsandbytes' min_8bit_size; torchao keeps
small tensors in float32 likewise) keep float32 states (the parameter's dtype), as do complex,
non-dense and DTensor parameters and those with sparse gradients: they take the float32 kernel.
amsgrad with 8-bit states is refused (it would need a third quantized state).

Paths: the kernels of every device (pyops::adam_step_8bit_, and pyops::adam_step_ with bfloat16 states:
C++ on the CPU, CUDA, Triton); on a backend without one (the `torch` backend, or a CUDA-less build's
GPU tensors) the same dequantize -> update -> requantize in torch ops, counted in
pyops.optim.fallback_counts() under `auto`.

state_dict: per quantized parameter "exp_avg" and "exp_avg_sq" (uint8 codes, or bfloat16),
"exp_avg_absmax" and "exp_avg_sq_absmax" (float32, one per block; 8-bit only) and "step"; it round-trips
exactly. load_state_dict takes a float32 Adam's (torch's or pyops') state and quantizes it;
`dequantized_state_dict(optimizer)` gives the float32 (parameter dtype) state_dict that torch's Adam loads.
"""

import torch
import torch.nn.functional as F

from ..backend import KERNEL_DTYPES, current, resolve
from ..ops import PRIMITIVES
from ._step import _DTensor, _fell_back, _is_dense, _lr_tensor, _on, _same_layout, _scalar

BLOCK_SIZE = 256
MIN_QUANTIZED_SIZE = 4096
STATE_DTYPES = (None, torch.bfloat16, "8bit")
QUANTIZED_KEYS = ("exp_avg", "exp_avg_sq")
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}


def dynamic_map(signed):
    """bitsandbytes' dynamic tree map (create_dynamic_map with 7 exponent bits, 8 bits), 256 sorted
    float32 values: for each decade i = 0..6, the midpoints of linspace(0.1, 1, n_i + 1) (float32) times
    10^(i - 6), with n_i = 2^i (signed: each value and its negation) or 2^(i+1) (unsigned), plus 0 and 1.
    The signed map spans [-0.99297, 1] (127 negative values, 0, 128 positive), the unsigned [0, 1]."""
    values = []
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_MAPS = {}  # device -> (signed map, unsigned map)


def maps(device):
    """The (signed, unsigned) dynamic maps on device, built once."""
    device = torch.device(device)
    if device not in _MAPS:
        _MAPS[device] = (dynamic_map(True).to(device), dynamic_map(False).to(device))
    return _MAPS[device]


def _flat(t):
    """t's elements in memory order, as a 1-d view (t dense)."""
    return t.as_strided((t.numel(),), (1,))


def _blocks(n):
    return (n + BLOCK_SIZE - 1) // BLOCK_SIZE


def dequantize(codes, absmax, qmap):
    """map[code] * absmax per element, float32, in codes' memory order (1-d)."""
    flat = _flat(codes)
    n = flat.numel()
    values = F.pad(qmap[flat.long()], (0, _blocks(n) * BLOCK_SIZE - n))
    return (values.view(-1, BLOCK_SIZE) * absmax.view(-1, 1)).view(-1)[:n]


def _block_nan(x):
    """Per block of BLOCK_SIZE of a 1-d x, whether it holds a NaN."""
    n = x.numel()
    return F.pad(x, (0, _blocks(n) * BLOCK_SIZE - n)).view(-1, BLOCK_SIZE).isnan().any(1)


def quantize(x, qmap, nan=None):
    """(codes, absmax) of a 1-d float32 x: per block of BLOCK_SIZE its absmax (NaN if it holds one, or
    where `nan` says so), and per element the number of the map's float32 midpoints below
    x * (1 / absmax) (0 for a zero block)."""
    n = x.numel()
    blocks = F.pad(x, (0, _blocks(n) * BLOCK_SIZE - n)).view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(1)
    nan = blocks.isnan().any(1) if nan is None else nan
    absmax = torch.where(nan, torch.full_like(absmax, float("nan")), absmax)
    inv = torch.where(absmax > 0, absmax.reciprocal(), torch.zeros_like(absmax))
    y = (blocks * inv.view(-1, 1)).view(-1)[:n]
    mids = (qmap[:-1] + qmap[1:]) * 0.5
    return torch.bucketize(y, mids).to(torch.uint8), absmax


def state_bytes(optimizer):
    """Bytes of optimizer state tensors (step counts included) per parameter element."""
    total = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    count = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return total / max(count, 1)


# ---- which parameters take quantized states ------------------------------------------------------


def check_state_dtype(name, state_dtype, amsgrad, master_weights, differentiable):
    if not (state_dtype is None or state_dtype == torch.bfloat16 or state_dtype == "8bit"):
        raise ValueError(f"pyops.optim.{name}: state_dtype must be None, torch.bfloat16 or '8bit', got {state_dtype!r}")
    if state_dtype is None:
        return
    if state_dtype == "8bit" and amsgrad:
        raise ValueError(f"pyops.optim.{name}: amsgrad=True is not supported with 8-bit states (state_dtype='8bit')")
    if master_weights:
        raise ValueError(f"pyops.optim.{name}: state_dtype={state_dtype!r} needs master_weights=False")
    if differentiable:
        raise ValueError(f"pyops.optim.{name}: state_dtype={state_dtype!r} needs differentiable=False")


def check_rounding(name, state_dtype, bf16_stochastic_round):
    """8-bit states take no stochastic rounding of bfloat16 parameters (their kernel rounds to nearest)."""
    if state_dtype == "8bit" and bf16_stochastic_round:
        raise ValueError(
            f"pyops.optim.{name}: bf16_stochastic_round=True is not supported with 8-bit states (state_dtype='8bit')"
        )


def _eligible(state_dtype, p):
    """Whether a parameter takes state_dtype's quantized states (else float32/its own dtype)."""
    if state_dtype is None or p.numel() < MIN_QUANTIZED_SIZE or p.is_complex() or not _is_dense(p):
        return False
    if _DTensor is not None and isinstance(p, _DTensor):
        return False
    if state_dtype == "8bit":
        return p.dtype in KERNEL_DTYPES
    return p.dtype == torch.float32


def kind_of(state, p):
    """'8bit', 'bf16' or None (the parameter's own dtype) for a parameter's state."""
    m = state.get("exp_avg")
    if m is None or m.dtype == p.dtype:
        return None
    if m.dtype == torch.uint8:
        return "8bit"
    return "bf16" if m.dtype == torch.bfloat16 else None


def quantized_params(optimizer, group):
    """The group's parameters with a gradient that step with quantized states, their state created
    where new."""
    sd = group.get("state_dtype")
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        state = optimizer.state[p]
        if not state:
            if p.grad.is_sparse or not _eligible(sd, p):
                continue
            new_state(state, p, sd, group["amsgrad"])
        if kind_of(state, p) is not None:
            out.append(p)
    return out


def new_state(state, p, sd, amsgrad):
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    if sd == "8bit":
        qs, qu = maps(p.device)
        for key, qmap in zip(QUANTIZED_KEYS, (qs, qu)):
            codes, absmax = quantize(torch.zeros(p.numel(), device=p.device), qmap)
            state[key] = torch.empty_like(p, dtype=torch.uint8)
            _flat(state[key]).copy_(codes)
            state[ABSMAX_KEYS[key]] = absmax
    else:
        for key in QUANTIZED_KEYS + (("max_exp_avg_sq",) if amsgrad else ()):
            state[key] = torch.zeros_like(p, dtype=torch.bfloat16)


def _wanted(group, p):
    sd = group.get("state_dtype")
    if not _eligible(sd, p):
        return None
    return "bf16" if sd == torch.bfloat16 else sd


def convert_loaded_state(optimizer, saved_state_dict):
    """After torch's load_state_dict: restore quantized states as saved (torch's loader cast them to the
    parameters' dtype), quantize float states where the group asks for quantized ones, and dequantize
    quantized states where it does not."""
    saved_ids = [i for g in saved_state_dict["param_groups"] for i in g["params"]]
    groups = [g for g in optimizer.param_groups for _ in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p, group in zip(saved_ids, params, groups):
        saved = saved_state_dict["state"].get(pid)
        if not saved:
            continue
        state = optimizer.state[p]
        for k, v in saved.items():
            if k == "step" or not torch.is_tensor(v):
                continue
            if (v.dtype in (torch.uint8, torch.bfloat16) and v.dtype != p.dtype) or k in ABSMAX_KEYS.values():
                state[k] = v.to(p.device, copy=True)
        kind, want = kind_of(state, p), _wanted(group, p)
        if kind == want or "exp_avg" not in state:
            continue
        if kind is not None:
            floats = _dequantized(state, p, kind)
        else:
            floats = {k: state[k] for k in (*QUANTIZED_KEYS, "max_exp_avg_sq") if k in state}
        for k in (*QUANTIZED_KEYS, *ABSMAX_KEYS.values(), "max_exp_avg_sq"):
            state.pop(k, None)
        if want is not None and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(p.device, torch.float32)
        if want == "8bit":  # (never amsgrad: refused with 8-bit states)
            qs, qu = maps(p.device)
            for key, qmap in zip(QUANTIZED_KEYS, (qs, qu)):
                state[key] = torch.empty_like(p, dtype=torch.uint8)
                codes, absmax = quantize(_flat(torch.empty_like(p, dtype=torch.float32).copy_(floats[key])), qmap)
                _flat(state[key]).copy_(codes)
                state[ABSMAX_KEYS[key]] = absmax
        else:
            dtype = torch.bfloat16 if want == "bf16" else p.dtype
            for key, v in floats.items():
                state[key] = torch.empty_like(p, dtype=dtype).copy_(v)


def _dequantized(state, p, kind):
    """{key: the state as p-shaped float tensors} of a quantized state."""
    out = {}
    if kind == "8bit":
        qs, qu = maps(p.device)
        for key, qmap in zip(QUANTIZED_KEYS, (qs, qu)):
            full = torch.empty_like(p, dtype=torch.float32)
            _flat(full).copy_(dequantize(state[key], state[ABSMAX_KEYS[key]], qmap))
            out[key] = full.to(p.dtype)
    else:
        for key in QUANTIZED_KEYS + ("max_exp_avg_sq",):
            if key in state:
                out[key] = state[key].to(p.dtype)
    return out


def dequantized_state_dict(optimizer):
    """optimizer.state_dict() with quantized states as float tensors in their parameter's dtype and shape
    (the absmax keys dropped, the groups' state_dtype removed): what torch.optim.Adam/AdamW load."""
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    state = {}
    for pid, p in zip(ids, params):
        s = sd["state"].get(pid)
        if s is None:
            continue
        kind = kind_of(s, p)
        if kind is None:
            state[pid] = s
            continue
        s = dict(s)
        s.update(_dequantized(s, p, kind))
        for k in ABSMAX_KEYS.values():
            s.pop(k, None)
        state[pid] = s
    groups = [{k: v for k, v in g.items() if k != "state_dtype"} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- the step ------------------------------------------------------------------------------------

# adam_step_ kernels that take bfloat16 state for float32 parameters (D::kBf16AdamStates, csrc/optim.h)
_BF16_STATE_KERNELS = {("native", "cpu"), ("native", "cuda"), ("triton", "cpu"), ("triton", "cuda")}


def _has_8bit_kernel(backend, device):
    op = PRIMITIVES[backend]["adam_step_8bit_"]
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op._name, key)


def step_quantized(optimizer, group, params, grad_scale, found_inf, decoupled):
    """One step of the quantized-state parameters of a group: per (device, dtype, kind), one kernel call
    where the backend has one, else the torch-ops path."""
    sets = {}
    for p in params:
        state = optimizer.state[p]
        sets.setdefault((p.device, p.dtype, kind_of(state, p)), []).append(p)
    for (device, _, kind), ps in sets.items():
        for p in ps:  # the kernels read step counts on the parameter's device
            st = optimizer.state[p]
            if st["step"].device != device:
                st["step"] = st["step"].to(device, torch.float32)
        backend = resolve("adam", device)
        gs, fi = _on(grad_scale, device), _on(found_inf, device)
        grads, copies = [], []
        for p in ps:
            g = p.grad
            if g.dtype != p.dtype or not _same_layout(g, p):
                copy = torch.empty_like(p).copy_(g)
                copies.append((g, copy))
                g = copy
            grads.append(g)
        if kind == "8bit" and backend in ("native", "triton") and _has_8bit_kernel(backend, device):
            _run_8bit(optimizer, group, backend, ps, grads, device, gs, fi, decoupled)
        elif kind == "bf16" and (backend, device.type) in _BF16_STATE_KERNELS:
            _run_bf16(optimizer, group, backend, ps, grads, device, gs, fi, decoupled)
        else:
            if current() == "auto":
                _fell_back(
                    optimizer, f"{'8-bit' if kind == '8bit' else 'bfloat16'} Adam states on {device.type}", len(ps)
                )
            _torch_step(optimizer, group, kind, ps, grads, gs, fi, decoupled)
        if grad_scale is not None:
            for g, copy in copies:
                g.copy_(copy)


def _hyper(group):
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    return beta1, beta2, _scalar(group["weight_decay"]), group["eps"], group["maximize"]


def _run_8bit(optimizer, group, backend, ps, grads, device, grad_scale, found_inf, decoupled):
    st = [optimizer.state[p] for p in ps]
    qs, qu = maps(device)
    beta1, beta2, wd, eps, maximize = _hyper(group)
    PRIMITIVES[backend]["adam_step_8bit_"](
        ps,
        grads,
        [s["exp_avg"] for s in st],
        [s["exp_avg_sq"] for s in st],
        [s["exp_avg_absmax"] for s in st],
        [s["exp_avg_sq_absmax"] for s in st],
        [s["step"] for s in st],
        qs,
        qu,
        BLOCK_SIZE,
        _lr_tensor(group["lr"], device),
        beta1,
        beta2,
        wd,
        eps,
        maximize,
        decoupled,
        grad_scale,
        found_inf,
    )


def _run_bf16(optimizer, group, backend, ps, grads, device, grad_scale, found_inf, decoupled):
    st = [optimizer.state[p] for p in ps]
    beta1, beta2, wd, eps, maximize = _hyper(group)
    amsgrad = group["amsgrad"]
    PRIMITIVES[backend]["adam_step_"](
        ps,
        grads,
        [s["exp_avg"] for s in st],
        [s["exp_avg_sq"] for s in st],
        [s["max_exp_avg_sq"] for s in st] if amsgrad else [],
        [s["step"] for s in st],
        _lr_tensor(group["lr"], device),
        beta1,
        beta2,
        wd,
        eps,
        amsgrad,
        maximize,
        decoupled,
        grad_scale,
        found_inf,
    )


def _torch_step(optimizer, group, kind, ps, grads, grad_scale, found_inf, decoupled):
    """The kernels' update in torch ops (float32 math for float32/half parameters, float64 for float64):
    dequantize, Adam's update with the kernels' expressions, requantize; the grad scaler's contract
    with no host read off the CPU (a skipped step selects the old values on the device)."""
    skip = None
    if found_inf is not None:
        if found_inf.device.type == "cpu":
            if float(found_inf) != 0:
                return
        else:
            skip = found_inf != 0
    beta1, beta2, wd, eps, maximize = _hyper(group)
    lr = group["lr"]
    amsgrad = kind == "bf16" and group["amsgrad"]
    for p, g in zip(ps, grads):
        state = optimizer.state[p]
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        pf, gf = _flat(p), _flat(g)
        gc = gf.to(compute)
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().to(compute)
            gc = (gc * inv).to(g.dtype)
            if skip is not None:
                gc = torch.where(skip, gf, gc)
            gf.copy_(gc)
            gc = gc.to(compute)
        if maximize:
            gc = -gc
        x = pf.to(compute)
        step = state["step"]
        new_step = step + 1
        t = new_step.double()
        lr_t = lr.double() if torch.is_tensor(lr) else lr
        lr_is_float = torch.is_tensor(lr) and lr.dtype == torch.float32
        bc1 = 1 - beta1**t
        if lr_is_float:
            step_size = (lr.float() / bc1.float()).double()
            decay = (1.0 - lr.float() * float(wd)).double()
        else:
            step_size, decay = lr_t / bc1, 1 - lr_t * wd
        inv_bc2 = 1 / (1 - beta2**t).sqrt()
        if wd != 0:
            if decoupled:
                x = x * torch.as_tensor(decay).to(x.device, compute)
            else:
                gc = gc + compute_scalar(wd, compute) * x
        if kind == "8bit":
            qs, qu = maps(p.device)
            m0 = dequantize(state["exp_avg"], state["exp_avg_absmax"], qs).to(compute)
            v0 = dequantize(state["exp_avg_sq"], state["exp_avg_sq_absmax"], qu).to(compute)
        else:
            m0, v0 = _flat(state["exp_avg"]).to(compute), _flat(state["exp_avg_sq"]).to(compute)
        one = torch.ones((), dtype=compute)
        b1, b2 = torch.tensor(beta1, dtype=compute), torch.tensor(beta2, dtype=compute)
        m = m0 + (one - b1) * (gc - m0)
        v = v0 * b2 + (one - b2) * gc * gc
        if kind == "bf16":
            m, v = m.to(torch.bfloat16), v.to(torch.bfloat16)
            vu = v
            if amsgrad:
                vu = torch.maximum(_flat(state["max_exp_avg_sq"]), v)
            md, vd = m.to(compute), vu.to(compute)
        else:
            md, vd = m, v
        denom = vd.sqrt() * torch.as_tensor(inv_bc2).to(x.device, compute) + compute_scalar(eps, compute)
        new_p = (x - torch.as_tensor(step_size).to(x.device, compute) * md / denom).to(p.dtype)
        updates = [(pf, new_p), (step, new_step)]
        if kind == "8bit":  # a NaN in either state poisons both absmaxs of its block, as the kernels do
            nan = _block_nan(m) | _block_nan(v)
            for key, qmap, val in (("exp_avg", qs, m), ("exp_avg_sq", qu, v)):
                codes, absmax = quantize(val.float(), qmap, nan)
                updates += [(_flat(state[key]), codes), (state[ABSMAX_KEYS[key]], absmax)]
        else:
            updates += [(_flat(state["exp_avg"]), m), (_flat(state["exp_avg_sq"]), v)]
            if amsgrad:
                updates.append((_flat(state["max_exp_avg_sq"]), vu))
        for dst, src in updates:
            if skip is not None:
                src = torch.where(skip, dst, src.to(dst.device))
            dst.copy_(src)


def compute_scalar(value, dtype):
    return torch.tensor(float(value), dtype=dtype)

"""Triton kernels of the optim family: one launch updates every tensor of a (device, dtype) group.

A chunk table (tensor index, start) lists BLOCK-element pieces of all tensors; each program looks
its tensor's pointers up in pointer tables (int64 addresses) and updates one piece, reading and
writing each element once. Hyper-parameters travel in a float64 table and lr as a tensor, so they
are runtime values (no recompiles, exact in float64); steps, grad_scale and found_inf are read on
the device. Math as pyops/optim/fused.py.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
SGD, ADAM, ADAGRAD, RMSPROP = 0, 1, 2, 3
# hyper table slots: a and b mean per algorithm what the kernel's branches say
H_A, H_B, H_WD, H_EPS = 0, 1, 2, 3


@triton.jit
def _ptr(table, t, dtype: tl.constexpr):
    return tl.load(table + t).to(tl.pointer_type(dtype))


@triton.jit
def _multi_tensor_kernel(chunks, sizes, p_tab, g_tab, s1_tab, s2_tab, s3_tab, step_tab, first_tab, lr_ptr, hyper,
                         scale_ptr, found_ptr, ALGO: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                         FLAG1: tl.constexpr, FLAG2: tl.constexpr, MAXIMIZE: tl.constexpr,
                         HAS_WD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                         LR_F32: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    n = tl.load(sizes + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    if HAS_FOUND:  # the grad scaler found inf/NaN: touch nothing
        mask = mask & (tl.load(found_ptr + tl.zeros([BLOCK], tl.int32)).to(tl.float32) == 0)
    p_ptr = _ptr(p_tab, t, DTYPE)
    g_ptr = _ptr(g_tab, t, DTYPE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(COMPUTE)
        tl.store(g_ptr + offs, g.to(DTYPE), mask=mask)
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    lr = tl.load(lr_ptr).to(COMPUTE)
    a = tl.load(hyper + H_A).to(COMPUTE)
    b = tl.load(hyper + H_B).to(COMPUTE)
    wd = tl.load(hyper + H_WD).to(COMPUTE)
    eps = tl.load(hyper + H_EPS).to(COMPUTE)
    if ALGO == 0:  # SGD: a momentum, b dampening; FLAG1 momentum, FLAG2 nesterov
        if HAS_WD:
            g = g + wd * p
        if FLAG1:
            m_ptr = _ptr(s1_tab, t, DTYPE)
            first = tl.load(first_tab + t)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            buf = tl.where(first != 0, g, a * m + (1.0 - b) * g)
            tl.store(m_ptr + offs, buf.to(DTYPE), mask=mask)
            buf = buf.to(DTYPE).to(COMPUTE)
            if FLAG2:
                g = g + a * buf
            else:
                g = buf
        p = p - lr * g
    elif ALGO == 1:  # Adam: a beta1, b beta2; FLAG1 amsgrad, FLAG2 decoupled weight decay
        step = (tl.load(_ptr(step_tab, t, tl.float32)) + 1.0).to(COMPUTE)
        if HAS_WD:
            if FLAG2:
                if LR_F32:  # torch computes 1 - lr * wd in a float32 lr's dtype
                    p = p * (1.0 - lr.to(tl.float32) * wd.to(tl.float32)).to(COMPUTE)
                else:
                    p = p * (1.0 - lr * wd)
            else:
                g = g + wd * p
        m_ptr = _ptr(s1_tab, t, DTYPE)
        v_ptr = _ptr(s2_tab, t, DTYPE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        m = m + (1.0 - a) * (g - m)
        v = v * b + (1.0 - b) * g * g
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
        m = m.to(DTYPE).to(COMPUTE)
        v = v.to(DTYPE).to(COMPUTE)
        if FLAG1:
            vmax_ptr = _ptr(s3_tab, t, DTYPE)
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(COMPUTE), v)
            tl.store(vmax_ptr + offs, vmax.to(DTYPE), mask=mask)
            v = vmax.to(DTYPE).to(COMPUTE)
        bc1 = 1.0 - tl.exp(step * tl.log(a))
        bc2 = 1.0 - tl.exp(step * tl.log(b))
        if LR_F32:  # and lr / bias_correction1 likewise
            step_size = (lr.to(tl.float32) / bc1.to(tl.float32)).to(COMPUTE)
        else:
            step_size = lr / bc1
        p = p - step_size * m / (tl.sqrt(v) / tl.sqrt(bc2) + eps)
    elif ALGO == 2:  # Adagrad: a lr_decay
        step = (tl.load(_ptr(step_tab, t, tl.float32)) + 1.0).to(COMPUTE)
        if HAS_WD:
            g = g + wd * p
        s_ptr = _ptr(s1_tab, t, DTYPE)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(COMPUTE) + g * g
        tl.store(s_ptr + offs, s.to(DTYPE), mask=mask)
        s = s.to(DTYPE).to(COMPUTE)
        p = p - lr / (1.0 + (step - 1.0) * a) * g / (tl.sqrt(s) + eps)
    else:  # RMSprop: a alpha, b momentum; FLAG1 centered, FLAG2 momentum > 0
        if HAS_WD:
            g = g + wd * p
        sq_ptr = _ptr(s1_tab, t, DTYPE)
        sq = tl.load(sq_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * a + (1.0 - a) * g * g
        tl.store(sq_ptr + offs, sq.to(DTYPE), mask=mask)
        sq = sq.to(DTYPE).to(COMPUTE)
        if FLAG1:
            ga_ptr = _ptr(s2_tab, t, DTYPE)
            ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            ga = ga + (1.0 - a) * (g - ga)
            tl.store(ga_ptr + offs, ga.to(DTYPE), mask=mask)
            ga = ga.to(DTYPE).to(COMPUTE)
            avg = tl.sqrt(sq - ga * ga) + eps
        else:
            avg = tl.sqrt(sq) + eps
        if FLAG2:
            m_ptr = _ptr(s3_tab, t, DTYPE)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * b + g / avg
            tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
            p = p - lr * m.to(DTYPE).to(COMPUTE)
        else:
            p = p - lr * g / avg
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)


_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


_TABLES = {}


def _table(values, device, dtype=torch.int64):
    """values as a tensor on device: uploaded from pinned memory without a host synchronisation, and
    cached, so that a step over unchanged tensors and hyper-parameters uploads nothing (CUDA graph
    capture after a warm-up step then records no host copy)."""
    key = (device, dtype, tuple(values))
    t = _TABLES.get(key)
    if t is None:
        t = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        if len(_TABLES) >= 64:  # parameter lists and hyper-parameters change rarely
            _TABLES.clear()
        _TABLES[key] = t
    return t


def _addresses(tensors, device):
    return _table([x.data_ptr() for x in tensors] if tensors else [0], device)


def step(algo, params, grads, s1, s2, s3, steps, lr, hyper, flags, maximize, has_wd, grad_scale, found_inf,
         first=None):
    """One launch over every tensor of the group (all of one device and dtype), then the step
    counts advance (by 0 where found_inf is set): the kernel reads step and uses step + 1."""
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    chunks = [(i, s) for i, p in enumerate(params) for s in range(0, p.numel(), BLOCK)]
    if not chunks:
        return
    chunk_t = _table([x for c in chunks for x in c], device)
    sizes = _table([p.numel() for p in params], device)
    hyper_t = _table(list(hyper), device, torch.float64)
    lr_t = lr.to(device) if isinstance(lr, torch.Tensor) else _table([float(lr)], device, torch.float64)
    dummy = hyper_t
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    _multi_tensor_kernel[(len(chunks),)](
        chunk_t, sizes, _addresses(params, device), _addresses(grads, device), _addresses(s1, device),
        _addresses(s2, device), _addresses(s3, device), _addresses(steps, device),
        _table([int(f) for f in first] if first else [0] * len(params), device), lr_t, hyper_t,
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        ALGO=algo, DTYPE=_TL[dtype], COMPUTE=compute, FLAG1=bool(flags[0]), FLAG2=bool(flags[1]),
        MAXIMIZE=bool(maximize), HAS_WD=bool(has_wd), HAS_SCALE=grad_scale is not None,
        HAS_FOUND=found_inf is not None, LR_F32=isinstance(lr, torch.Tensor) and lr.dtype == torch.float32,
        BLOCK=BLOCK)
    if steps:
        torch._foreach_add_(steps, (1 - found_inf.to(steps[0].device, torch.float32)) if found_inf is not None else 1)

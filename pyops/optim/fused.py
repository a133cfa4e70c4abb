"""Fused optimizers: torch.optim's SGD, Adam, AdamW, Adagrad and RMSprop with each step done by one
pyops kernel call per (device, dtype) group of a parameter group.

The classes subclass torch's, so constructor signatures, defaults, validation, param_groups keys,
state keys and state_dict layout are torch's own; only step() differs. Per element (g the gradient,
negated when maximize; wd the weight decay):
  SGD:     g += wd p; b = first ? g : mu b + (1 - dampening) g; g = nesterov ? g + mu b : b; p -= lr g
  Adam(W): t += 1; (AdamW/decoupled: p *= 1 - lr wd | else g += wd p); m = lerp(m, g, 1 - b1);
           v = b2 v + (1 - b2) g^2; (amsgrad: vmax = max(vmax, v)); p -= lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps)
  Adagrad: t += 1; g += wd p; s += g^2; p -= lr / (1 + (t - 1) lr_decay) g / (sqrt(s) + eps)
  RMSprop: t += 1; g += wd p; a = alpha a + (1 - alpha) g^2; (centered: ga = lerp(ga, g, 1 - alpha), a' = a - ga^2);
           d = sqrt(a') + eps; momentum: b = mu b + g / d, p -= lr b | else p -= lr g / d
Grad scaler (torch.amp.GradScaler): `grad_scale` divides the gradients, which are written back
unscaled; `found_inf` set leaves parameters, gradients and all state untouched.

master_weights=True keeps a float32 copy of each float16/bfloat16 parameter ("master_param" in its
state) and its state in float32; the parameter takes the rounded result after each step.

Kernels: native C++ on CPU (csrc/cpu/optim.cpp), CUDA (csrc/cuda/optim.cu), Triton (kernels/optim.py). Where no pyops kernel runs (other devices, the
`torch` backend, non-dense parameters) the step falls back to torch's for-loop implementation.
"""
import torch
from torch import optim
from torch.optim import adagrad as _adagrad, adam as _adam, rmsprop as _rmsprop, sgd as _sgd

from ..backend import KERNEL_DTYPES, resolve
from ..ops.optim import PRIMITIVES

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"]



def _no_differentiable(name, differentiable):
    if differentiable:
        raise ValueError(f"pyops.optim.{name}: differentiable=True is not supported; use torch.optim.{name}")


def _scalar(v):
    return float(v) if isinstance(v, torch.Tensor) else v


_LR = {}


def _lr_tensor(lr, device):
    """lr as a one-element tensor on device: a float goes through pinned memory (no host sync) once
    per value and device."""
    if isinstance(lr, torch.Tensor):
        return lr.detach().to(device)
    key = (float(lr), device)
    if key not in _LR:
        t = torch.tensor(float(lr), dtype=torch.float64)
        if len(_LR) >= 64:
            _LR.clear()
        _LR[key] = t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)
    return _LR[key]


def _skipped(found_inf):
    """Whether the grad scaler skips this step: read on the host, so only where the answer is needed
    to keep torch's state layout and it costs no device synchronisation or is unavoidable."""
    return found_inf is not None and float(found_inf) != 0


def _kernel_subsets(name, params, grads):
    """(backend, indices) groups that one kernel call can update together (dense tensors of one device
    and dtype whose gradients share their layout, on a device with a pyops kernel) and the indices
    left to torch's implementation. (State tensors are torch's zeros_like(param), which keeps a dense
    param's layout.)"""
    if not params:
        return [], []
    backends = {}

    def backend_of(dev):
        if dev not in backends:
            b = resolve(name, dev)
            backends[dev] = b if b in ("native", "triton") else None
        return backends[dev]

    dev, dtype = params[0].device, params[0].dtype
    b0 = backend_of(dev)
    if b0 is not None and dtype in KERNEL_DTYPES and all(
            p.dtype is dtype and p.device == dev and p.is_contiguous() and g.is_contiguous() and g.dtype is dtype
            for p, g in zip(params, grads)):
        return [(b0, list(range(len(params))))], []  # the common case, checked cheaply
    groups, rest = {}, []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = backend_of(p.device)
        if b is not None and p.dtype in KERNEL_DTYPES and g.dtype == p.dtype and g.stride() == p.stride() \
                and _is_dense(p):
            groups.setdefault((b, p.device, p.dtype), []).append(i)
        else:
            rest.append(i)
    return [(key[0], idx) for key, idx in groups.items()], rest


def _is_dense(t):
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    return torch.empty_like(t, device="meta").stride() == t.stride()


def _pick(lst, idx):
    return [lst[i] for i in idx] if lst else []


class _Fused:
    """step() for a torch optimizer subclass: _collect(group) -> the lists _init_group gathers,
    _native(group, lists, idx, grad_scale, found_inf) and _torch(group, lists, idx) update a subset."""

    _step_supports_amp_scaling = True

    @staticmethod
    def _kernels():
        from ..kernels import optim as K  # imported on first use (TRITON_INTERPRET is read then)

        return K

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            lists = self._collect(group)
            writeback = None
            if getattr(self, "master_weights", False):
                lists, writeback = self._to_master(group, lists)
            params = lists[0]
            self._steps_to_devices(lists)
            if any(g.is_sparse or g.is_complex() for g in lists[1]):
                kind = "sparse gradients" if any(g.is_sparse for g in lists[1]) else "complex parameters"
                raise TypeError(f"pyops.optim.{type(self).__name__}: {kind} are not supported")
            kernel_groups, rest = _kernel_subsets(self._op, params, lists[1])
            for backend, idx in kernel_groups:
                run = self._native if backend == "native" else self._triton
                run(group, lists, idx, grad_scale, found_inf)
            if rest:
                if _skipped(found_inf):
                    continue
                if grad_scale is not None:
                    for i in rest:
                        lists[1][i].div_(grad_scale.to(lists[1][i].device))
                self._torch(group, lists, rest)
            if writeback is not None:
                writeback(grad_scale is not None)
        return loss

    _steps_at = None  # where the step counts are in _collect's lists (None: no step counts)

    def _steps_to_devices(self, lists):
        """The kernels read step counts on the parameter's device (as torch's fused and capturable
        modes keep them); torch's for-loop mode keeps them on the CPU, so they move, once."""
        if self._steps_at is None:
            return
        steps = lists[self._steps_at]
        for i, (p, t) in enumerate(zip(lists[0], steps)):
            if t.device != p.device and p.device.type != "cpu":
                steps[i] = self.state[self._owner(p)]["step"] = t.to(p.device)

    def _owner(self, p):
        """The parameter a tensor of the step's lists stands for (itself, or the one whose float32
        master copy it is)."""
        return getattr(self, "_masters", {}).get(id(p), p)

    def _to_master(self, group, lists):
        """master_weights: float16/bfloat16 parameters step through float32 master copies kept in
        their state ("master_param"), with float32 state and float32 copies of the gradients; the
        parameters take the rounded result. Returns the lists to step and the write-back."""
        params, grads = lists[0], lists[1]
        half = [i for i, p in enumerate(params) if p.dtype in (torch.float16, torch.bfloat16)]
        if not half:
            return lists, None
        for i in half:
            p, state = params[i], self.state[params[i]]
            if "master_param" not in state:
                state["master_param"] = p.detach().float()
                for k, v in list(state.items()):
                    if k not in ("step", "master_param") and isinstance(v, torch.Tensor) and v.dtype == p.dtype:
                        state[k] = v.float()
        lists = self._collect(group)  # again: now with the float32 state
        self._masters = getattr(self, "_masters", {})
        new_params, new_grads = list(lists[0]), list(lists[1])
        for i in half:
            master = self.state[params[i]]["master_param"]
            self._masters[id(master)] = params[i]
            new_params[i], new_grads[i] = master, grads[i].float()

        def writeback(unscaled):
            for i in half:
                params[i].copy_(new_params[i])
                if unscaled:  # the grad scaler's contract: gradients written back unscaled
                    grads[i].copy_(new_grads[i])

        return (new_params, new_grads) + tuple(lists[2:]), writeback


class SGD(_Fused, optim.SGD):
    """torch.optim.SGD, fused (see the module docstring for the update)."""

    _op = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None, master_weights=False):
        _no_differentiable("SGD", differentiable)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach,
                         differentiable=False, fused=fused)
        self.master_weights = bool(master_weights)

    def _collect(self, group):
        params, grads, bufs = [], [], []
        self._init_group(group, params, grads, bufs)
        return params, grads, bufs

    def _buffers(self, group, params, bufs):
        """Momentum buffers for the kernels, and which start as the gradient (torch creates a buffer as
        clone(grad) at a parameter's first step). Without dampening a zero buffer gives the same
        first update (0 * momentum + grad), so new buffers are zeros and need no flag."""
        if _scalar(group["momentum"]) == 0:
            return [], []
        if _scalar(group["dampening"]) == 0:
            return [torch.zeros_like(p) if b is None else b for p, b in zip(params, bufs)], []
        first = [b is None for b in bufs]
        return [torch.empty_like(p) if b is None else b for p, b in zip(params, bufs)], first

    def _keep_buffers(self, params, old, new, first, found_inf):
        """The state holds the new buffers from now on, unless this step was skipped and they were
        never written (the flagged ones; zero buffers stay valid)."""
        if first and any(first) and _skipped(found_inf):
            new = [n if not f else None for n, f in zip(new, first)]
        for p, o, n in zip(params, old, new):
            if o is None and n is not None:
                self.state[self._owner(p)]["momentum_buffer"] = n

    def _native(self, group, lists, idx, grad_scale, found_inf):
        params, grads, old = (_pick(lst, idx) for lst in lists)
        bufs, first = self._buffers(group, params, old)
        PRIMITIVES["sgd_step_"](params, grads, bufs, _lr_tensor(group["lr"], params[0].device), _scalar(group["momentum"]),
                       _scalar(group["dampening"]), _scalar(group["weight_decay"]), group["nesterov"],
                       group["maximize"], [int(f) for f in first], grad_scale, found_inf)
        if bufs:
            self._keep_buffers(params, old, bufs, first, found_inf)

    def _triton(self, group, lists, idx, grad_scale, found_inf):
        params, grads, old = (_pick(lst, idx) for lst in lists)
        bufs, first = self._buffers(group, params, old)
        momentum, wd = _scalar(group["momentum"]), _scalar(group["weight_decay"])
        K = self._kernels()
        K.step(K.SGD, params, grads, bufs, [], [], [], group["lr"], (momentum, _scalar(group["dampening"]), wd, 0.0),
               (momentum != 0, group["nesterov"]), group["maximize"], wd != 0, grad_scale, found_inf, first=first)
        if bufs:
            self._keep_buffers(params, old, bufs, first, found_inf)

    def _torch(self, group, lists, idx):
        params, grads, bufs = (_pick(lst, idx) for lst in lists)
        _sgd.sgd(params, grads, bufs, foreach=False, weight_decay=group["weight_decay"],
                      momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                      nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[self._owner(p)]["momentum_buffer"] = b


class _AdamStep:
    _op = "adam"
    _steps_at = 5

    def _collect(self, group):
        params, grads, m, v, vmax, steps = [], [], [], [], [], []
        self._init_group(group, params, grads, m, v, vmax, steps)
        return params, grads, m, v, vmax, steps

    def _native(self, group, lists, idx, grad_scale, found_inf):
        params, grads, m, v, vmax, steps = (_pick(lst, idx) for lst in lists)
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        PRIMITIVES["adam_step_"](params, grads, m, v, vmax if group["amsgrad"] else [], steps, _lr_tensor(group["lr"], params[0].device), beta1,
                        beta2, _scalar(group["weight_decay"]), group["eps"], group["amsgrad"], group["maximize"],
                        self._decoupled(group), grad_scale, found_inf)

    def _triton(self, group, lists, idx, grad_scale, found_inf):
        params, grads, m, v, vmax, steps = (_pick(lst, idx) for lst in lists)
        K = self._kernels()
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        wd = _scalar(group["weight_decay"])
        K.step(K.ADAM, params, grads, m, v, vmax if group["amsgrad"] else [], steps, group["lr"],
               (beta1, beta2, wd, group["eps"]), (group["amsgrad"], self._decoupled(group)), group["maximize"],
               wd != 0, grad_scale, found_inf)

    def _torch(self, group, lists, idx):
        params, grads, m, v, vmax, steps = (_pick(lst, idx) for lst in lists)
        beta1, beta2 = group["betas"]
        _adam.adam(params, grads, m, v, vmax if group["amsgrad"] else [], steps, foreach=False,
                        capturable=group["capturable"], decoupled_weight_decay=self._decoupled(group),
                        amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


class Adam(_AdamStep, _Fused, optim.Adam):
    """torch.optim.Adam, fused (see the module docstring for the update)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False,
                 master_weights=False):
        _no_differentiable("Adam", differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=False, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self.master_weights = bool(master_weights)

    @staticmethod
    def _decoupled(group):
        return group.get("decoupled_weight_decay", False)


class AdamW(_AdamStep, _Fused, optim.AdamW):
    """torch.optim.AdamW (Adam with decoupled weight decay), fused."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False):
        _no_differentiable("AdamW", differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=False, fused=fused)
        self.master_weights = bool(master_weights)

    @staticmethod
    def _decoupled(group):
        return True


class Adagrad(_Fused, optim.Adagrad):
    """torch.optim.Adagrad, fused (see the module docstring for the update)."""

    _op = "adagrad"
    _steps_at = 3

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, master_weights=False):
        _no_differentiable("Adagrad", differentiable)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
                         maximize=maximize, differentiable=False, fused=fused)
        self.master_weights = bool(master_weights)

    def _collect(self, group):
        params, grads, sums, steps = [], [], [], []
        self._init_group(group, params, grads, sums, steps)
        return params, grads, sums, steps

    def _native(self, group, lists, idx, grad_scale, found_inf):
        params, grads, sums, steps = (_pick(lst, idx) for lst in lists)
        PRIMITIVES["adagrad_step_"](params, grads, sums, steps, _lr_tensor(group["lr"], params[0].device), group["lr_decay"],
                           _scalar(group["weight_decay"]), group["eps"], group["maximize"], grad_scale, found_inf)

    def _triton(self, group, lists, idx, grad_scale, found_inf):
        params, grads, sums, steps = (_pick(lst, idx) for lst in lists)
        K = self._kernels()
        wd = _scalar(group["weight_decay"])
        K.step(K.ADAGRAD, params, grads, sums, [], [], steps, group["lr"], (group["lr_decay"], 0.0, wd, group["eps"]),
               (False, False), group["maximize"], wd != 0, grad_scale, found_inf)

    def _torch(self, group, lists, idx):
        params, grads, sums, steps = (_pick(lst, idx) for lst in lists)
        _adagrad.adagrad(params, grads, sums, steps, foreach=False, lr=group["lr"],
                              weight_decay=group["weight_decay"], lr_decay=group["lr_decay"], eps=group["eps"],
                              maximize=group["maximize"])


class RMSprop(_Fused, optim.RMSprop):
    """torch.optim.RMSprop, fused (see the module docstring for the update)."""

    _op = "rmsprop"
    _steps_at = 5

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, master_weights=False):
        _no_differentiable("RMSprop", differentiable)
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable, foreach, maximize,
                         differentiable=False)
        self.master_weights = bool(master_weights)

    def _collect(self, group):
        params, grads, square_avgs, bufs, grad_avgs, steps = [], [], [], [], [], []
        self._init_group(group, params, grads, square_avgs, bufs, grad_avgs, steps)
        return params, grads, square_avgs, grad_avgs, bufs, steps

    def _native(self, group, lists, idx, grad_scale, found_inf):
        params, grads, square_avgs, grad_avgs, bufs, steps = (_pick(lst, idx) for lst in lists)
        PRIMITIVES["rmsprop_step_"](params, grads, square_avgs, grad_avgs if group["centered"] else [],
                           bufs if group["momentum"] > 0 else [], steps, _lr_tensor(group["lr"], params[0].device), group["alpha"],
                           group["eps"], _scalar(group["weight_decay"]), group["momentum"], group["centered"],
                           group["maximize"], grad_scale, found_inf)

    def _triton(self, group, lists, idx, grad_scale, found_inf):
        params, grads, square_avgs, grad_avgs, bufs, steps = (_pick(lst, idx) for lst in lists)
        K = self._kernels()
        wd = _scalar(group["weight_decay"])
        K.step(K.RMSPROP, params, grads, square_avgs, grad_avgs if group["centered"] else [],
               bufs if group["momentum"] > 0 else [], steps, group["lr"],
               (group["alpha"], group["momentum"], wd, group["eps"]), (group["centered"], group["momentum"] > 0),
               group["maximize"], wd != 0, grad_scale, found_inf)

    def _torch(self, group, lists, idx):
        params, grads, square_avgs, grad_avgs, bufs, steps = (_pick(lst, idx) for lst in lists)
        _rmsprop.rmsprop(params, grads, square_avgs, grad_avgs if group["centered"] else [],
                              bufs if group["momentum"] > 0 else [], steps, foreach=False,
                              maximize=group["maximize"], capturable=group["capturable"], lr=group["lr"],
                              alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                              momentum=group["momentum"], centered=group["centered"])

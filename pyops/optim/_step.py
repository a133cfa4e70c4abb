"""The step machinery the fused optimizers (pyops/optim/fused.py) share: one kernel call per group where
the group fits one (pyops._C._fused_step_fits, the primitive's own first check), the careful per-tensor
path otherwise, torch's steps as the fallback, the float lr upload, master weights and the fallback
counts.

Which path a tensor takes (`pyops.optim.fallback_counts()` counts the tensor-steps that take torch's,
and the "pyops" logger says so once per optimizer and reason at debug level):
  - pyops kernel (native C++ on CPU, csrc/cpu/optim.cpp; CUDA, csrc/cuda/optim.cu; Triton,
    kernels/optim.py): dense float64/float32/float16/bfloat16 parameters on a device with a kernel;
    complex parameters as real pairs (torch.view_as_real, as torch's fused optimizers do); gradients
    and state in another layout than their parameter's (a gradient strided differently, state kept in
    a parameter's old memory format) are brought to its layout first (state once, for good).
  - torch's for-loop step: parameters that are not dense (e.g. a strided view), sparse gradients
    (SGD, Adagrad; the others refuse them as torch does), gradients of another dtype than their
    parameter, devices without a pyops kernel, and the `torch` backend. With a grad scaler on a GPU
    the skip decision stays on the device there too (no host read), except that Adagrad's for-loop
    reads its step count on the host, as torch's does.
  - torch's own step(): `differentiable=True` (the whole optimizer).
master_weights=True keeps a float32 copy of each float16/bfloat16 parameter ("master_param" in its
state) and its state in float32; the parameter takes the rounded result after each step. The float32
state survives deepcopy, pickling and state_dict()/load_state_dict().

bf16_stochastic_round=True (the name torchao's bfloat16 optimizers give the option) is the other way to
train bfloat16 parameters, without the master copy's 4 bytes a parameter: the kernel computes the new
value in float32 as always and stores it rounded stochastically, up with probability (its distance to
the bfloat16 below) / ulp, so that E[stored] = the float32 value and updates below half an ulp, which
round to nearest loses every step, still move the parameter on average. The random bits are a hash
of (seed, tensor index, element index) (csrc/common/stochastic_round.h), the seed drawn from torch's
default generator at each kernel call: torch.manual_seed makes a run reproducible, whatever the thread
count. Only bfloat16 parameters are affected, and only where a pyops kernel steps them: the native
(CPU, CUDA) and Triton kernels hash alike; on a GPU they refuse CUDA graph capture (a replay would
reuse the captured seed); torch's for-loop fallback (listed above) rounds to nearest.
It cannot be combined with master_weights (whose float32 copy already keeps small updates).
"""

import logging
import threading
from collections import Counter

import torch

from .. import _C
from ..backend import KERNEL_DTYPES, current, resolve
from ..kernels._upload import upload
from ..ops import PRIMITIVES
from ..ops import optim as _optim_ops  # noqa: F401  (the primitives' fakes and Triton launch ops)

KERNEL_BACKENDS = ("native", "triton")
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_CACHED_LRS = 64
_SEED_BOUND = 2**63 - 1  # stochastic rounding's seeds: any non-negative int64

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

_log = logging.getLogger("pyops")
_FITS = _C._fused_step_fits  # csrc/optim.h
_FALLBACKS = Counter()
_LOGGED = set()


def fallback_counts():
    """Tensor-steps that took torch's implementation instead of a pyops kernel, by reason, since the
    process started."""
    return dict(_FALLBACKS)


def _fell_back(optimizer, reason, count):
    _FALLBACKS[reason] += count
    if (type(optimizer).__name__, reason) not in _LOGGED:
        _LOGGED.add((type(optimizer).__name__, reason))
        _log.debug(
            "pyops.optim.%s: %s take torch's step instead of a pyops kernel (counted in pyops.optim.fallback_counts())",
            type(optimizer).__name__,
            reason,
        )


def _scalar(v):
    return float(v) if isinstance(v, torch.Tensor) else v


_LRS = {}  # see kernels/_upload.py: the entries, keyed by value, device and stream
# Guards _LRS's misses, evictions and capture marks: threads stepping their own optimizers share the
# cache. A hit takes no lock.
_LRS_LOCK = threading.Lock()


def _lr_tensor(lr, device):
    """lr as a one-element tensor on device. A float is uploaded once per value, device and stream,
    from pinned memory (no host synchronisation); one created or used during a CUDA graph capture is
    kept for good, since the graph replays it."""
    if isinstance(lr, torch.Tensor):
        return lr if lr.device == device else lr.detach().to(device)
    value = float(lr)
    return upload(_LRS, _LRS_LOCK, MAX_CACHED_LRS, value, lambda: torch.tensor(value, dtype=torch.float64), device)


def _as_state_of(owner, t):
    """t, stepped in place of the parameter `owner` (as its real pairs or its local shard), in the form
    owner's state holds it: complex for a complex parameter, sharded as owner for a DTensor one."""
    if owner.is_complex() and not t.is_complex():
        t = torch.view_as_complex(t)
    if _DTensor is not None and isinstance(owner, _DTensor) and not isinstance(t, _DTensor):
        t = _DTensor.from_local(
            t, owner.device_mesh, owner.placements, run_check=False, shape=owner.shape, stride=owner.stride()
        )
    return t


def _on(t, device):
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _pick(lst, idx):
    return [lst[i] for i in idx] if lst else []


def _is_dense(t):
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    return torch.empty_like(t, device="meta").stride() == t.stride()


def _same_layout(a, b):
    """Whether a and b (one shape) walk memory alike: strides agree wherever a size exceeds one."""
    return a.shape == b.shape and all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


class _Fused:
    """step() for a torch optimizer subclass. Each subclass names its primitive and lists:
    _collect(group) -> (lists in _init_group's order, has_sparse_grad); _arguments(group, lists, lr,
    grad_scale, found_inf) -> the primitive's arguments; _torch(group, lists, skip) -> torch's
    for-loop step on those lists; _state_keys: the state key each list holds (None: params, grads,
    steps); _steps_at: where the step counts are (None: no step counts)."""

    master_weights = False  # instances set it; kept through deepcopy and pickling (__getstate__)
    bf16_stochastic_round = False  # likewise
    _steps_at = None

    def _step_lists(self, group, lists):
        """(params, grads, the state lists, steps) as the primitive receives them, from _collect's lists;
        a None state tensor is one the step creates like its parameter."""
        raise NotImplementedError

    # GradScaler.step reads this before anything else; under step_in_backward (in_backward.py) the
    # scaler's skip of the whole step cannot be kept, so the read refuses. torch's fused constructors
    # assign it, hence the setter.
    @property
    def _step_supports_amp_scaling(self):
        if self.__dict__.get("_in_backward") is not None:
            self._in_backward.refuse("GradScaler.step(optimizer)")
        return True

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value):
        pass

    def step(self, closure=None):
        if self.__dict__.get("_in_backward") is not None:
            self._in_backward.refuse("optimizer.step()")
        if self.defaults.get("differentiable"):
            count = sum(p.grad is not None for g in self.param_groups for p in g["params"])
            _fell_back(self, "differentiable=True", count)
            return super().step(closure)  # torch's own, which differentiates through the step
        return self._fused_step(closure)

    @torch.no_grad()
    def _fused_step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups(self.param_groups, getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss

    @torch.no_grad()
    def _step_groups(self, groups, grad_scale, found_inf):
        """Step each group's parameters that have a gradient (groups: param_groups, or step_in_backward's
        one-parameter views of them)."""
        self._stand_ins = {}  # id(tensor stepped instead of a parameter) -> the parameter, this step
        for group in groups:
            lists, has_sparse = self._collect(group)
            if not lists[0]:
                continue
            writeback = None
            if self.master_weights:
                lists, writeback = self._to_master(group, lists)
            local = self._local_shards(lists)
            if local is None:  # DTensors whose shards cannot be stepped on their own
                _fell_back(self, "DTensor parameters sharded unlike their gradients", len(lists[0]))
                self._fallback(group, lists, range(len(lists[0])), grad_scale, found_inf)
                if writeback is not None:
                    writeback(grad_scale is not None)
                continue
            lists = local
            # The common case in one call; the shared C++ checks decide whether it qualifies (they run
            # before anything is written), and anything else goes the careful way.
            if has_sparse or not self._whole_group(group, lists, grad_scale, found_inf):
                self._careful_step(group, lists, grad_scale, found_inf)
            if writeback is not None:
                writeback(grad_scale is not None)
        self._stand_ins = {}

    def _whole_group(self, group, lists, grad_scale, found_inf):
        """Step the group in one kernel call when it fits one (the primitive's own first check, asked
        through pyops._C._fused_step_fits); False, with nothing written, where it does not."""
        device = lists[0][0].device
        backend = resolve(self._op, device)
        if backend not in KERNEL_BACKENDS:
            return False
        params, grads, states, steps = self._step_lists(group, lists)
        if not _FITS(params, grads, states, steps):
            return False
        self._run_once_each(backend, group, lists, device, _on(grad_scale, device), _on(found_inf, device))
        return True

    def _run_once_each(self, backend, group, lists, device, grad_scale, found_inf):
        """_run over lists, in rounds where a parameter is listed more than once (torch steps it once per
        listing, in order). A primitive updates all its tensors at once (in parallel on a GPU, and on
        the CPU for large groups), reading each step count before any is advanced: a tensor listed twice
        in one call would be stepped once, or raced. Round k steps the k-th listing of each parameter;
        the first round unscales the gradients in place, so the later ones take them as they are (each
        listing steps with the unscaled gradient, as after torch's GradScaler.unscale_)."""
        params = lists[0]
        distinct = {id(self._owner(p)) for p in params} if self._stand_ins else set(map(id, params))
        if len(distinct) == len(params):
            self._run(backend, group, lists, device, grad_scale, found_inf)
            return
        owners = [id(self._owner(p)) for p in params]
        listed, rounds = {}, []
        for i, owner in enumerate(owners):
            k = listed[owner] = listed.get(owner, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        for k, idx in enumerate(rounds):
            sub = [_pick(lst, idx) for lst in lists]
            self._run(backend, group, sub, device, grad_scale if k == 0 else None, found_inf)

    def _run(self, backend, group, lists, device, grad_scale, found_inf):
        """One primitive call over lists (one device and dtype; each parameter listed once)."""
        lr = _lr_tensor(group["lr"], device)
        args = self._arguments(group, lists, lr, grad_scale, found_inf)
        PRIMITIVES[backend][self._primitive](*args, *self._rounding(lists[0]))

    def _rounding(self, params):
        """The primitive's trailing (bf16_stochastic_round, seed) where the flag applies (bfloat16
        parameters), with a seed drawn from torch's default generator; else nothing (the defaults)."""
        if not self.bf16_stochastic_round or params[0].dtype != torch.bfloat16:
            return ()
        return True, int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64))

    def _careful_step(self, group, lists, grad_scale, found_inf):
        """Per tensor: the kernel where one can run it (after bringing gradients and state to the
        parameter's layout and complex tensors to real pairs), torch's step otherwise."""
        lists = [list(lst) for lst in lists]
        params, grads = lists[0], lists[1]
        if self._steps_at is not None:
            self._steps_to_devices(params, lists[self._steps_at])
        auto = current() == "auto"
        backends, kernel_groups, fallbacks = {}, {}, {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.device not in backends:
                backends[p.device] = resolve(self._op, p.device)
            backend = backends[p.device]
            real_dtype = p.real.dtype if p.is_complex() else p.dtype
            if backend not in KERNEL_BACKENDS:
                reason = "tensors on a device without a pyops kernel" if auto else None
            elif g.is_sparse:
                reason = "sparse gradients"
            elif real_dtype not in KERNEL_DTYPES:
                reason = f"{p.dtype} parameters"
            elif not _is_dense(p):
                reason = "non-dense parameters"
            elif g.dtype != p.dtype:
                reason = "gradients of another dtype than their parameter"
            else:
                kernel_groups.setdefault((backend, p.device, p.dtype), []).append(i)
                continue
            fallbacks.setdefault(reason, []).append(i)
        unscaled_copies = []
        for (backend, device, _), idx in kernel_groups.items():
            sub = [_pick(lst, idx) for lst in lists]
            self._to_param_layouts(sub, unscaled_copies)
            if sub[0][0].is_complex():
                self._as_real_pairs(sub)
            self._run_once_each(backend, group, sub, device, _on(grad_scale, device), _on(found_inf, device))
        if grad_scale is not None:  # gradients stepped from a copy in their parameter's layout
            for g, copy in unscaled_copies:
                g.copy_(copy)
        for reason, idx in fallbacks.items():
            if reason is not None:
                _fell_back(self, reason, len(idx))
            self._fallback(group, lists, idx, grad_scale, found_inf)

    def _to_param_layouts(self, sub, unscaled_copies):
        """State in another layout than its parameter (kept from the parameter's old memory format)
        is replaced by a copy in the parameter's, for good; a gradient is stepped from such a copy."""
        params = sub[0]
        copies = {}  # id(tensor) -> its copy: a parameter listed twice steps one copy twice
        for i, p in enumerate(params):
            g = sub[1][i]
            if not _same_layout(g, p):
                if id(g) not in copies:
                    copies[id(g)] = torch.empty_like(p).copy_(g)
                    unscaled_copies.append((g, copies[id(g)]))
                sub[1][i] = copies[id(g)]
            for k, key in enumerate(self._state_keys):
                s = sub[k][i] if key is not None and sub[k] else None
                if s is not None and not _same_layout(s, p):
                    if id(s) not in copies:
                        copies[id(s)] = torch.empty_like(p, dtype=s.dtype).copy_(s)
                        self.state[self._owner(p)][key] = _as_state_of(self._owner(p), copies[id(s)])
                    sub[k][i] = copies[id(s)]

    def _local_shards(self, lists):
        """DTensor parameters (FSDP2's sharded ones), their gradients and state as this rank's local
        shards: every step is elementwise, so stepping each rank's shard steps the whole tensor,
        provided a parameter and its gradient are sharded alike and nothing is pending reduction
        (Partial). None where that does not hold; lists itself where there is no DTensor."""
        if _DTensor is None or not any(isinstance(p, _DTensor) for p in lists[0]):
            return lists
        for p, g in zip(lists[0], lists[1]):
            for t in (p, g):
                if not isinstance(t, _DTensor) or any(pl.is_partial() for pl in t.placements):
                    return None
            if g.placements != p.placements or g.device_mesh != p.device_mesh:
                return None
        out = []
        for lst in lists:
            shards = []
            for t in lst:
                if isinstance(t, _DTensor):
                    local = t.to_local()
                    self._stand_ins[id(local)] = self._owner(t)
                    t = local
                shards.append(t)
            out.append(shards)
        return tuple(out)

    def _as_real_pairs(self, sub):
        """Complex tensors as real pairs (the view shares the parameter's version counter)."""
        for k, lst in enumerate(sub):
            if k == self._steps_at:
                continue
            for i, t in enumerate(lst):
                if t is not None and t.is_complex():
                    lst[i] = torch.view_as_real(t)
                    self._stand_ins[id(lst[i])] = self._owner(t)

    def _fallback(self, group, lists, idx, grad_scale, found_inf):
        """torch's for-loop step for the tensors at idx, under the grad scaler's contract. A
        found_inf on the CPU is read; on a device the step runs and is undone there where found_inf
        is set, so that nothing waits for the device."""
        sub = [_pick(lst, idx) for lst in lists]
        skip = None
        if found_inf is not None:
            if found_inf.device.type == "cpu":
                if float(found_inf) != 0:
                    return
            else:
                skip = found_inf != 0
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal()
            for g in {id(g): g for g in sub[1]}.values():  # once each, were a parameter listed twice
                factor = inv.to(g.device, g.real.dtype if g.is_complex() else g.dtype)
                if skip is not None:
                    factor = torch.where(skip.to(g.device), torch.ones_like(factor), factor)
                g.mul_(factor)
        if skip is None:
            self._torch(group, sub, None)
            return
        written = [t for k, lst in enumerate(sub) if k != 1 for t in lst if t is not None]
        before = [t.clone() for t in written]
        self._torch(group, sub, skip)
        for t, b in zip(written, before):
            t.copy_(torch.where(skip.to(t.device), b, t))

    def _steps_to_devices(self, params, steps):
        """The kernels read step counts on the parameter's device (as torch's fused and capturable
        modes keep them); torch's for-loop mode keeps them on the CPU, so they move, once."""
        for i, (p, t) in enumerate(zip(params, steps)):
            if t.device != p.device and p.device.type != "cpu":
                steps[i] = self.state[self._owner(p)]["step"] = t.to(p.device)

    def _owner(self, t):
        """The parameter a tensor of the step's lists stands for (itself, or the parameter whose
        float32 master copy or real view it is)."""
        return self._stand_ins.get(id(t), t)

    def _capturable(self, params, steps):
        """torch's for-loop reads step counts on the host unless told they live on the device."""
        return bool(steps) and steps[0].device.type != "cpu"

    # ---- master weights ------------------------------------------------------------------------
    def _to_master(self, group, lists):
        """master_weights: float16/bfloat16 parameters step through float32 master copies kept in
        their state ("master_param"), with float32 state and float32 copies of the gradients; the
        parameters take the rounded result. Returns the lists to step and the write-back."""
        params, grads = lists[0], lists[1]
        half = [i for i, p in enumerate(params) if p.dtype in HALF_DTYPES]
        if not half:
            return lists, None
        converted = False
        for i in half:
            p, state = params[i], self.state[params[i]]
            master = state.get("master_param")
            if master is None or master.dtype != torch.float32:
                state["master_param"] = (p if master is None else master).detach().to(torch.float32, copy=True)
                converted = True
            for k, v in list(state.items()):
                if k not in ("step", "master_param") and isinstance(v, torch.Tensor) and v.dtype in HALF_DTYPES:
                    state[k] = v.float()
                    converted = True
        if converted:
            lists = self._collect(group)[0]  # again: now with the float32 state
        new_params, new_grads = list(lists[0]), list(lists[1])
        float_grads = {}  # id(gradient) -> its float32 copy: one for a parameter listed twice
        for i in half:
            master = self.state[params[i]]["master_param"]
            self._stand_ins[id(master)] = params[i]
            if id(grads[i]) not in float_grads:
                float_grads[id(grads[i])] = grads[i].float()
            new_params[i], new_grads[i] = master, float_grads[id(grads[i])]

        def writeback(unscaled):
            for i in half:
                params[i].copy_(new_params[i])
                if unscaled:  # the grad scaler's contract: gradients written back unscaled
                    grads[i].copy_(new_grads[i])

        return (new_params, new_grads) + tuple(lists[2:]), writeback

    # ---- what survives copies and reloads ----------------------------------------------------------
    def __getstate__(self):
        self._settle()
        state = super().__getstate__()
        state["master_weights"] = self.master_weights
        state["bf16_stochastic_round"] = self.bf16_stochastic_round
        return state

    def state_dict(self):
        self._settle()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self.__dict__.pop("_pending_new_buffers", None)
        super().load_state_dict(state_dict)
        if self.master_weights:  # torch's loader cast the float32 master copies and state to the params' dtype
            saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip(saved_ids, params):
                saved = state_dict["state"].get(pid, {})
                if p.dtype not in HALF_DTYPES:
                    continue
                for k, v in saved.items():
                    if k != "step" and isinstance(v, torch.Tensor) and v.dtype == torch.float32:
                        self.state[p][k] = v.to(p.device, copy=True)

    def _settle(self):
        """Resolve what the device decides lazily (SGD's new momentum buffers under a grad scaler)."""


def _check_master(master_weights, differentiable, bf16_stochastic_round=False):
    if master_weights and differentiable:
        raise ValueError(
            "pyops.optim: master_weights=True needs differentiable=False (a differentiable step is "
            "torch's own, which keeps no master copies)"
        )
    if bf16_stochastic_round and differentiable:
        raise ValueError(
            "pyops.optim: bf16_stochastic_round=True needs differentiable=False (a differentiable step is "
            "torch's own, which rounds to nearest)"
        )
    if bf16_stochastic_round and master_weights:
        raise ValueError(
            "pyops.optim: bf16_stochastic_round=True and master_weights=True exclude each other: the float32 "
            "master copy already keeps the updates that rounding a bfloat16 parameter would lose"
        )

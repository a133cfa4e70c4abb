"""Fused optimizers: torch.optim's SGD, Adam, AdamW, Adagrad and RMSprop with each step done by one
pyops kernel call per (device, dtype) group of a parameter group.

The classes subclass torch's, so constructor signatures, defaults, validation, param_groups keys,
state keys and state_dict layout are torch's own; only step() differs. Per element (g the gradient,
negated when maximize; wd the weight decay):
  SGD:     g += wd p; b = new ? g : mu b + (1 - dampening) g; g = nesterov ? g + mu b : b; p -= lr g
  Adam(W): t += 1; (AdamW/decoupled: p *= 1 - lr wd | else g += wd p); m = lerp(m, g, 1 - b1);
           v = b2 v + (1 - b2) g^2; (amsgrad: vmax = max(vmax, v), NaN wins);
           p -= lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps)
  Adagrad: t += 1; g += wd p; s += g^2; p -= lr / (1 + (t - 1) lr_decay) g / (sqrt(s) + eps)
  RMSprop: t += 1; g += wd p; a = alpha a + (1 - alpha) g^2; (centered: ga = lerp(ga, g, 1 - alpha), a' = a - ga^2);
           d = sqrt(a') + eps; momentum: b = mu b + g / d, p -= lr b | else p -= lr g / d
With a float32 lr tensor, lr / (1 - b1^t), 1 - lr wd and Adagrad's lr / (1 + (t - 1) lr_decay) round to
float32, as torch's tensor arithmetic does. Grad scaler (torch.amp.GradScaler): `grad_scale` divides
the gradients, which are written back unscaled; `found_inf` set leaves parameters, gradients and all
state untouched. Steps bump the version counters of what they write, as torch's in-place ops do. A
parameter listed twice in a group steps twice, as torch's (from the gradient unscaled once).

Which tensors take a kernel, torch's for-loop or torch's own step, master_weights and
bf16_stochastic_round: the shared step machinery, pyops/optim/_step.py. Adam and AdamW's quantized states
(state_dtype=torch.bfloat16 or "8bit"; Adam8bit, AdamW8bit): pyops/optim/quantized.py.
"""

import torch
from torch import optim
from torch.optim import adagrad as _adagrad
from torch.optim import adam as _adam
from torch.optim import rmsprop as _rmsprop
from torch.optim import sgd as _sgd

from ..ops import PRIMITIVES
from . import quantized as _q
from ._step import _as_state_of, _check_master, _Fused, _lr_tensor, _scalar, fallback_counts

__all__ = ["SGD", "Adam", "AdamW", "Adam8bit", "AdamW8bit", "Adagrad", "RMSprop", "fallback_counts"]


class SGD(_Fused, optim.SGD):
    """torch.optim.SGD, fused (see the module docstring for the update and the paths)."""

    _op = "sgd"
    _primitive = "sgd_step_"
    _state_keys = (None, None, "momentum_buffer")

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
        master_weights=False,
        bf16_stochastic_round=False,
    ):
        _check_master(master_weights, differentiable, bf16_stochastic_round)
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self.master_weights = bool(master_weights)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)

    def _collect(self, group):
        params, grads, bufs = [], [], []
        has_sparse = self._init_group(group, params, grads, bufs)
        return (params, grads, bufs), has_sparse

    def _step_lists(self, group, lists):
        params, grads, bufs = lists
        return params, grads, [bufs if _scalar(group["momentum"]) != 0 else []], []

    # New momentum buffers: torch creates one as clone(grad) at a parameter's first step. Without
    # dampening a zero buffer gives the same first update (0 * momentum + grad), so new buffers are
    # zeros. With dampening the kernel is told which buffers are new by a one-element flag per
    # parameter, which the kernel clears once it applied it. Under a grad scaler a step may be
    # skipped, and whether it was is known on the device only: the buffer joins the state at once and
    # its flag stays pending (passed again at the next step) until a step without found_inf, a found_inf
    # on the CPU, state_dict() or pickling settles it; an unwritten buffer then leaves the state.
    def _pending(self):
        return self.__dict__.setdefault("_pending_new_buffers", {})

    def _run(self, backend, group, lists, device, grad_scale, found_inf):
        params, grads, old = lists
        momentum, dampening = _scalar(group["momentum"]), _scalar(group["dampening"])
        bufs, new, flags, pending = old, [], [], self.__dict__.get("_pending_new_buffers")
        if momentum != 0:
            new = [i for i, b in enumerate(old) if b is None]
            if new:
                bufs = list(old)
                make = torch.zeros_like if dampening == 0 else torch.empty_like
                for i in new:
                    bufs[i] = make(params[i])
            if (new and dampening != 0) or pending:
                flags = [self._zero_flag(device)] * len(params)
                if dampening != 0:
                    for i in new:
                        flags[i] = torch.ones(1, dtype=torch.uint8, device=device)
                for i, p in enumerate(params if pending else ()):
                    flags[i] = pending.get(self._owner(p), flags[i])
        PRIMITIVES[backend]["sgd_step_"](
            params,
            grads,
            bufs if momentum != 0 else [],
            _lr_tensor(group["lr"], device),
            momentum,
            dampening,
            _scalar(group["weight_decay"]),
            group["nesterov"],
            group["maximize"],
            flags,
            grad_scale,
            found_inf,
            *self._rounding(params),
        )
        if new or flags:
            self._keep_buffers(params, bufs, new, flags if dampening != 0 else [], found_inf)

    def _zero_flag(self, device):
        zeros = self.__dict__.setdefault("_zero_flags", {})
        if device not in zeros:
            zeros[device] = torch.zeros(1, dtype=torch.uint8, device=device)
        return zeros[device]

    def _keep_buffers(self, params, bufs, new, flags, found_inf):
        skipped = None  # unknown on the host
        if found_inf is None:
            skipped = False
        elif found_inf.device.type == "cpu":
            skipped = float(found_inf) != 0
        pending = self._pending()
        for i in new:
            owner = self._owner(params[i])
            if skipped and flags:
                continue  # never written: the next step starts this buffer
            buf = bufs[i]
            self.state[owner]["momentum_buffer"] = _as_state_of(owner, buf)
            if skipped is None and flags:
                pending[owner] = flags[i]
        if skipped is False and pending:  # every flag passed was applied and cleared
            for p in params:
                pending.pop(self._owner(p), None)

    def _settle(self):
        pending = self.__dict__.get("_pending_new_buffers")
        for owner, flag in list((pending or {}).items()):
            if bool(flag.item()):  # still new: the step that made it was skipped
                self.state[owner].pop("momentum_buffer", None)
            del pending[owner]

    def _torch(self, group, lists, skip):
        params, grads, bufs = lists
        momentum = _scalar(group["momentum"])
        pending = self.__dict__.get("_pending_new_buffers")
        if momentum != 0 and pending:  # a buffer still flagged new starts anew (a host read, rare)
            for i, p in enumerate(params):
                flag = pending.pop(self._owner(p), None)
                if flag is not None and bool(flag.item()):
                    bufs[i] = None
        new = [i for i, b in enumerate(bufs) if b is None] if momentum != 0 else []
        _sgd.sgd(
            params,
            grads,
            bufs,
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=False,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if momentum != 0:
            for p, b in zip(params, bufs):
                self.state[self._owner(p)]["momentum_buffer"] = _as_state_of(self._owner(p), b)
            if skip is not None:  # created by a step the device may skip: settled like the kernel's
                flag = skip.to(torch.uint8).reshape(1)
                for i in new:
                    self._pending()[self._owner(params[i])] = flag


class _AdamStep:
    _op = "adam"
    _primitive = "adam_step_"
    _state_keys = (None, None, "exp_avg", "exp_avg_sq", "max_exp_avg_sq", None)
    _steps_at = 5

    # ---- quantized states (state_dtype: pyops/optim/quantized.py) ---------------------------------
    def _set_state_dtype(self, state_dtype):
        """A group's "state_dtype", where it is not None (so that without it state_dict() and the groups
        are torch's own)."""
        if state_dtype is None:
            return
        self.defaults["state_dtype"] = state_dtype
        for group in self.param_groups:
            group.setdefault("state_dtype", state_dtype)

    @torch.no_grad()
    def _step_groups(self, groups, grad_scale, found_inf):
        """Parameters with quantized states take pyops/optim/quantized.py's step; the rest (float states:
        small tensors, or no state_dtype) the float step, through the groups without them (groups:
        param_groups, or step_in_backward's one-parameter views of them)."""
        if not any(g.get("state_dtype") is not None or self._has_quantized(g) for g in groups):
            return super()._step_groups(groups, grad_scale, found_inf)
        rest = []
        for group in groups:
            quantized = _q.quantized_params(self, group)
            if quantized:
                # a parameter listed k times steps k times, as torch's: in rounds, from the gradient
                # unscaled once (as _run_once_each)
                rounds, listed = [], {}
                for p in quantized:
                    k = listed[id(p)] = listed.get(id(p), -1) + 1
                    if k == len(rounds):
                        rounds.append([])
                    rounds[k].append(p)
                for k, ps in enumerate(rounds):
                    scale = grad_scale if k == 0 else None
                    _q.step_quantized(self, group, ps, scale, found_inf, self._decoupled(group))
                ids = set(map(id, quantized))
                group = dict(group, params=[p for p in group["params"] if id(p) not in ids])
            rest.append(group)
        return super()._step_groups(rest, grad_scale, found_inf)

    def _has_quantized(self, group):
        return any(_q.kind_of(self.state[p], p) for p in group["params"] if p in self.state)

    def load_state_dict(self, state_dict):
        """torch's, then the states brought to this optimizer's state_dtype (its own, per group, whatever
        the state_dict's groups say): quantized from float states, dequantized where it has none."""
        own = [g.get("state_dtype", self.defaults.get("state_dtype")) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, state_dtype in zip(self.param_groups, own):
            group.pop("state_dtype", None)
            if state_dtype is not None:
                group["state_dtype"] = state_dtype
        _q.convert_loaded_state(self, state_dict)

    def _collect(self, group):
        params, grads, m, v, vmax, steps = [], [], [], [], [], []
        self._init_group(group, params, grads, m, v, vmax, steps)
        return (params, grads, m, v, vmax, steps), False

    def _step_lists(self, group, lists):
        params, grads, m, v, vmax, steps = lists
        return params, grads, [m, v, vmax if group["amsgrad"] else []], steps

    def _arguments(self, group, lists, lr, grad_scale, found_inf):
        params, grads, m, v, vmax, steps = lists
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        return (
            params,
            grads,
            m,
            v,
            vmax if group["amsgrad"] else [],
            steps,
            lr,
            beta1,
            beta2,
            _scalar(group["weight_decay"]),
            group["eps"],
            group["amsgrad"],
            group["maximize"],
            self._decoupled(group),
            grad_scale,
            found_inf,
        )

    def _torch(self, group, lists, skip):
        params, grads, m, v, vmax, steps = lists
        beta1, beta2 = group["betas"]
        _adam.adam(
            params,
            grads,
            m,
            v,
            vmax if group["amsgrad"] else [],
            steps,
            foreach=False,
            capturable=group["capturable"] or self._capturable(params, steps),
            has_complex=any(p.is_complex() for p in params),
            decoupled_weight_decay=self._decoupled(group),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


class Adam(_AdamStep, _Fused, optim.Adam):
    """torch.optim.Adam, fused (see the module docstring for the update and the paths)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
        master_weights=False,
        bf16_stochastic_round=False,
        state_dtype=None,
    ):
        _check_master(master_weights, differentiable, bf16_stochastic_round)
        _q.check_state_dtype(type(self).__name__, state_dtype, amsgrad, master_weights, differentiable)
        _q.check_rounding(type(self).__name__, state_dtype, bf16_stochastic_round)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self.master_weights = bool(master_weights)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)
        self._set_state_dtype(state_dtype)

    @staticmethod
    def _decoupled(group):
        return group.get("decoupled_weight_decay", False)


class AdamW(_AdamStep, _Fused, optim.AdamW):
    """torch.optim.AdamW (Adam with decoupled weight decay), fused."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        master_weights=False,
        bf16_stochastic_round=False,
        state_dtype=None,
    ):
        _check_master(master_weights, differentiable, bf16_stochastic_round)
        _q.check_state_dtype(type(self).__name__, state_dtype, amsgrad, master_weights, differentiable)
        _q.check_rounding(type(self).__name__, state_dtype, bf16_stochastic_round)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self.master_weights = bool(master_weights)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)
        self._set_state_dtype(state_dtype)

    @staticmethod
    def _decoupled(group):
        return True


class Adam8bit(Adam):
    """Adam with 8-bit blockwise states: pyops.optim.Adam(..., state_dtype="8bit") (the name bitsandbytes
    and torchao give it; see pyops/optim/quantized.py for the format)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, **kwargs):
        kwargs.setdefault("state_dtype", "8bit")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise states: pyops.optim.AdamW(..., state_dtype="8bit")."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, **kwargs):
        kwargs.setdefault("state_dtype", "8bit")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class Adagrad(_Fused, optim.Adagrad):
    """torch.optim.Adagrad, fused (see the module docstring for the update and the paths)."""

    _op = "adagrad"
    _primitive = "adagrad_step_"
    _state_keys = (None, None, "sum", None)
    _steps_at = 3

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        foreach=None,
        *,
        maximize=False,
        differentiable=False,
        fused=None,
        master_weights=False,
        bf16_stochastic_round=False,
    ):
        _check_master(master_weights, differentiable, bf16_stochastic_round)
        super().__init__(
            params,
            lr,
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        self.master_weights = bool(master_weights)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)

    def _collect(self, group):
        params, grads, sums, steps = [], [], [], []
        has_sparse, _ = self._init_group(group, params, grads, sums, steps)
        return (params, grads, sums, steps), has_sparse

    def _step_lists(self, group, lists):
        params, grads, sums, steps = lists
        return params, grads, [sums], steps

    def _arguments(self, group, lists, lr, grad_scale, found_inf):
        params, grads, sums, steps = lists
        return (
            params,
            grads,
            sums,
            steps,
            lr,
            group["lr_decay"],
            _scalar(group["weight_decay"]),
            group["eps"],
            group["maximize"],
            grad_scale,
            found_inf,
        )

    def _torch(self, group, lists, skip):
        params, grads, sums, steps = lists
        _adagrad.adagrad(
            params,
            grads,
            sums,
            steps,
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=False,
            has_complex=any(p.is_complex() for p in params),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


class RMSprop(_Fused, optim.RMSprop):
    """torch.optim.RMSprop, fused (see the module docstring for the update and the paths)."""

    _op = "rmsprop"
    _primitive = "rmsprop_step_"
    _state_keys = (None, None, "square_avg", "grad_avg", "momentum_buffer", None)
    _steps_at = 5

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        master_weights=False,
        bf16_stochastic_round=False,
    ):
        _check_master(master_weights, differentiable, bf16_stochastic_round)
        super().__init__(
            params,
            lr,
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            capturable,
            foreach,
            maximize,
            differentiable=differentiable,
        )
        self.master_weights = bool(master_weights)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)

    def _collect(self, group):
        params, grads, square_avgs, bufs, grad_avgs, steps = [], [], [], [], [], []
        self._init_group(group, params, grads, square_avgs, bufs, grad_avgs, steps)
        return (params, grads, square_avgs, grad_avgs, bufs, steps), False

    def _step_lists(self, group, lists):
        params, grads, square_avgs, grad_avgs, bufs, steps = lists
        states = [square_avgs, grad_avgs if group["centered"] else [], bufs if group["momentum"] > 0 else []]
        return params, grads, states, steps

    def _arguments(self, group, lists, lr, grad_scale, found_inf):
        params, grads, square_avgs, grad_avgs, bufs, steps = lists
        return (
            params,
            grads,
            square_avgs,
            grad_avgs if group["centered"] else [],
            bufs if group["momentum"] > 0 else [],
            steps,
            lr,
            group["alpha"],
            group["eps"],
            _scalar(group["weight_decay"]),
            group["momentum"],
            group["centered"],
            group["maximize"],
            grad_scale,
            found_inf,
        )

    def _torch(self, group, lists, skip):
        params, grads, square_avgs, grad_avgs, bufs, steps = lists
        _rmsprop.rmsprop(
            params,
            grads,
            square_avgs,
            grad_avgs if group["centered"] else [],
            bufs if group["momentum"] > 0 else [],
            steps,
            foreach=False,
            maximize=group["maximize"],
            capturable=group["capturable"] or self._capturable(params, steps),
            has_complex=any(p.is_complex() for p in params),
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
        )

"""The optimizer step taken inside backward: each parameter steps as soon as its gradient is complete
and its gradient is freed at once, so that a training step never holds every gradient at the same time.

    handle = pyops.optim.step_in_backward(optimizer)
    for x, y in data:
        loss_fn(model(x), y).backward()  # steps every parameter; no optimizer.step()
        scheduler.step()                 # lr schedulers work as usual
    handle.remove()                      # back to optimizer.step() after backward

How: a post-accumulate-grad hook on each parameter (torch.Tensor.register_post_accumulate_grad_hook,
which fires once the gradient is fully accumulated, also for a parameter used several times in one
forward) steps that parameter through the optimizer's own fused step, on a one-parameter view of its
group (the group's dict with "params" = [that parameter]), read when the hook fires: the group's
current lr and hyper-parameters apply, and the state is the optimizer's own, keyed by the parameter.
The kernels are elementwise, so each parameter's result is bitwise what optimizer.step() after backward
gives; state_dict()/load_state_dict(), zero_grad(), master_weights and deepcopy are unchanged. A
parameter listed twice in its group steps twice, as with step(). Then the hook sets `p.grad = None`.

What cannot work, and is refused:
  - optimizer.step() (with or without a closure) while the handle is active: the step already
    happened in backward, a second would step twice.
  - torch.amp.GradScaler: its step unscales the gradients and skips the whole step when one of them
    is inf/NaN, after backward; here each parameter has stepped with its scaled gradient before any
    could be checked. GradScaler.step(optimizer) raises (the backward before it has already stepped
    with the scaled gradients: discard those parameters). bfloat16 autocast needs no scaler.
  - differentiable=True (torch's own step over the whole optimizer), optimizer step pre/post hooks
    (they wrap optimizer.step(), which no longer runs), and torch.distributed with several ranks
    (DistributedDataParallel and FSDP reduce the gradients across ranks after the hooks would have
    stepped with the unreduced ones): refused when the handle is made.
Not detectable, documented: gradient clipping over all parameters (torch.nn.utils.clip_grad_norm_)
needs every gradient at once; called after backward it sees none (the norm of nothing, 0) and clips
nothing. Gradient accumulation over several backward calls steps at each. Parameters added with
add_param_group later, or that required no gradient when the handle was made, have no hook: a hook
that finds a parameter added later raises; make a new handle after such changes. The hooks run on the
thread autograd runs them on (the calling thread for CPU tensors, autograd's device thread for CUDA
ones), and the backend is that thread's selection (the default, "auto", unless selected there).
"""

import threading

import torch

from ._step import _Fused

__all__ = ["step_in_backward", "StepInBackward"]

_WHO = "pyops.optim.step_in_backward"


def step_in_backward(optimizer):
    """Step each of `optimizer`'s parameters in backward, as soon as its gradient is accumulated, and
    free the gradient (see the module docstring). Returns a StepInBackward handle; `handle.remove()`
    restores stepping with optimizer.step()."""
    return StepInBackward(optimizer)


def _ranks():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StepInBackward:
    """The hooks of step_in_backward(optimizer); remove() takes them off."""

    def __init__(self, optimizer):
        if not isinstance(optimizer, _Fused):
            raise TypeError(
                f"{_WHO}: expected a pyops.optim optimizer (SGD, Adam, AdamW, Adagrad, RMSprop), got "
                f"{type(optimizer).__module__}.{type(optimizer).__qualname__}; pyops.optim.convert(optimizer) "
                "makes one"
            )
        if optimizer.__dict__.get("_in_backward") is not None:
            raise RuntimeError(f"{_WHO}: this optimizer already steps in backward (remove() its handle first)")
        if optimizer.defaults.get("differentiable"):
            raise ValueError(
                f"{_WHO}: differentiable=True is refused: a differentiable step is torch's own step() over "
                "the whole optimizer"
            )
        if _ranks() > 1:
            raise RuntimeError(
                f"{_WHO}: refused under torch.distributed with {_ranks()} ranks: DistributedDataParallel and "
                "FSDP reduce the gradients across ranks after backward (or in their own hooks), and a "
                "parameter stepped in its hook would step with its rank's unreduced gradient"
            )
        from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

        hooks = (
            len(optimizer._optimizer_step_pre_hooks)
            + len(optimizer._optimizer_step_post_hooks)
            + len(_global_optimizer_pre_hooks)
            + len(_global_optimizer_post_hooks)
        )
        if hooks:
            raise RuntimeError(
                f"{_WHO}: the optimizer has {hooks} step pre/post hook(s); they wrap optimizer.step(), which "
                "does not run when each parameter steps in backward: remove them first"
            )
        self._optimizer = optimizer
        self._lock = threading.Lock()  # hooks of parameters on several devices run on several threads
        self._layout = None  # (signature of param_groups, {id(param): [(group index, listings)]})
        self._hooks = {}  # id(param) -> the hook's RemovableHandle
        for group in optimizer.param_groups:
            for p in group["params"]:  # leaves: torch's optimizers refuse others
                if id(p) in self._hooks or not p.requires_grad:
                    continue
                self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._step_one)
        optimizer._in_backward = self

    @property
    def active(self):
        return self._optimizer is not None

    def remove(self):
        """Take the hooks off: optimizer.step() after backward steps again."""
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}
        if self._optimizer is not None and self._optimizer.__dict__.get("_in_backward") is self:
            del self._optimizer._in_backward
        self._optimizer = None

    def refuse(self, what):
        if what == "GradScaler.step(optimizer)":
            raise RuntimeError(
                f"{_WHO}: GradScaler.step(optimizer) is refused: a grad scaler unscales the gradients and "
                "skips the whole step after backward when one is inf/NaN, but each parameter already "
                "stepped in backward with its scaled gradient (discard this step's parameters). Train "
                "without a GradScaler (bfloat16 autocast needs none), or remove() the handle"
            )
        raise RuntimeError(
            f"{_WHO}: {what} is refused while the parameters step in backward: they already stepped "
            "there, and a second step would step them twice (closures included). remove() the handle to "
            "step after backward"
        )

    def _where(self, p):
        """[(group index, how many times p is listed there)], from a layout rebuilt whenever param_groups
        changed (load_state_dict makes new group dicts; add_param_group adds some)."""
        groups = self._optimizer.param_groups
        signature = tuple((id(g), id(g["params"]), len(g["params"])) for g in groups)
        if self._layout is None or self._layout[0] != signature:
            where = {}
            for k, g in enumerate(groups):
                for q in g["params"]:
                    if id(q) not in self._hooks and q.requires_grad:
                        raise RuntimeError(
                            f"{_WHO}: a parameter of shape {tuple(q.shape)} was added to the optimizer after "
                            "the handle was made and has no hook: remove() the handle and make a new one"
                        )
                    entries = where.setdefault(id(q), [])
                    if entries and entries[-1][0] == k:
                        entries[-1][1] += 1
                    else:
                        entries.append([k, 1])
            self._layout = (signature, where)
        return self._layout[1].get(id(p), ())

    def _step_one(self, p):
        opt = self._optimizer
        if opt is None or p.grad is None:
            return
        with self._lock:
            groups = opt.param_groups
            views = [{**groups[k], "params": [p] * n} for k, n in self._where(p)]
            opt._step_groups(views, None, None)
            opt._opt_called = True  # what lr schedulers check (they wrap optimizer.step() to set it)
        p.grad = None

"""pyops.optim.step_in_backward: each parameter steps in its post-accumulate-grad hook. The parameters
and state after a few training steps must be bitwise those of the same optimizer stepping after
backward (the kernels are elementwise, so stepping one parameter at a time changes no float operation),
state_dict, zero_grad and lr schedulers keep working, what cannot work is refused, and one training step
of a demo model peaks lower by the gradients' bytes."""

import copy
import warnings

import pytest
import torch

import pyops
import pyops.optim as popt
from pyops import models

KERNEL_BACKENDS = [b for b in pyops.available_backends("cpu") if b != "torch"]

CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": torch.tensor(0.01), "maximize": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CONFIGS)]


class Net(torch.nn.Module):
    """Plain torch layers (only the optimizer is under test): a layer used twice in one forward (its
    hook fires once, after both gradients are summed), a frozen layer, and a parameter the loss does
    not reach (no gradient, no step)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Linear(6, 8, dtype=dtype)
        self.shared = torch.nn.Linear(8, 8, dtype=dtype)
        self.frozen = torch.nn.Linear(8, 8, dtype=dtype).requires_grad_(False)
        self.head = torch.nn.Linear(8, 3, dtype=dtype)
        self.unused = torch.nn.Parameter(torch.randn(5, dtype=dtype))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # the same weights twice
        return self.head(self.frozen(h))


def _groups(net, lr_of_second=None):
    first = [net.a.weight, net.a.bias, net.shared.weight, net.unused]
    second = {"params": [net.shared.bias, net.head.weight, net.head.bias, *net.frozen.parameters()]}
    if lr_of_second is not None:
        second["lr"] = lr_of_second
    return [{"params": first}, second]


def _data(steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 6, generator=g, dtype=dtype), torch.randn(4, 3, generator=g, dtype=dtype)) for _ in range(steps)
    ]


def _train(net, opt, data, in_backward, scheduler=None):
    handle = popt.step_in_backward(opt) if in_backward else None
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        if in_backward:
            assert all(p.grad is None for p in net.parameters())
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
    return handle


def _pair(name, cfg, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    net = Net(dtype)
    twin = copy.deepcopy(net)
    cls = getattr(popt, name)
    lr2 = 0.05 if not isinstance(cfg["lr"], torch.Tensor) else torch.tensor(0.05)
    return (net, cls(_groups(net, lr2), **cfg, **extra)), (twin, cls(_groups(twin, lr2), **cfg, **extra))


def _assert_same(a, b):
    (net_a, opt_a), (net_b, opt_b) = a, b
    for (n, p), q in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(p, q), n
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            assert torch.equal(v, w) and v.dtype == w.dtype and v.device == w.device, (k, key)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_same_parameters_and_state_as_stepping_after_backward(name, cfg, backend):
    separate, inside = _pair(name, cfg)
    data = _data(4)
    with pyops.backend(backend):
        _train(*separate, data, in_backward=False)
        handle = _train(*inside, data, in_backward=True)
    _assert_same(inside, separate)
    unused = inside[1].state.get(inside[0].unused, {})
    assert float(unused.get("step", 0)) == 0 and "exp_avg" not in unused  # no gradient, no step
    handle.remove()


@pytest.mark.parametrize("name,cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[9]], ids=["SGD", "Adam", "RMSprop"])
def test_bfloat16_with_master_weights(name, cfg):
    separate, inside = _pair(name, cfg, torch.bfloat16, master_weights=True)
    data = _data(3, torch.bfloat16)
    _train(*separate, data, in_backward=False)
    _train(*inside, data, in_backward=True)
    _assert_same(inside, separate)
    assert inside[1].state[inside[0].a.weight]["master_param"].dtype == torch.float32


def test_state_dict_round_trip_and_deepcopy():
    name, cfg = CONFIGS[5]
    separate, inside = _pair(name, cfg)
    data = _data(6)
    _train(*separate, data[:3], in_backward=False)
    handle = _train(*inside, data[:3], in_backward=True)
    saved = copy.deepcopy(inside[1].state_dict())
    # load into the same optimizer (new group dicts: the hooks look the groups up again) and go on
    inside[1].load_state_dict(saved)
    for x, y in data[3:]:
        torch.nn.functional.mse_loss(inside[0](x), y).backward()
    _train(*separate, data[3:], in_backward=False)
    _assert_same(inside, separate)
    # a copy of an optimizer that steps in backward is an ordinary optimizer
    clone = copy.deepcopy(inside[1])
    assert "_in_backward" not in clone.__dict__
    handle.remove()
    # and a fresh optimizer loading that state steps on in backward as the other after backward
    net, opt = inside[0], getattr(popt, name)(_groups(inside[0], 0.05), **cfg)
    opt.load_state_dict(inside[1].state_dict())
    more = _data(2)
    _train(net, opt, more, in_backward=True)
    _train(*separate, more, in_backward=False)
    _assert_same((net, opt), separate)


def test_lr_scheduler_changes_the_lr_the_hooks_read():
    name, cfg = CONFIGS[4]
    separate, inside = _pair(name, cfg)
    data = _data(5)
    sched_a = torch.optim.lr_scheduler.StepLR(separate[1], step_size=2, gamma=0.3)
    sched_b = torch.optim.lr_scheduler.StepLR(inside[1], step_size=2, gamma=0.3)
    _train(*separate, data, in_backward=False, scheduler=sched_a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        _train(*inside, data, in_backward=True, scheduler=sched_b)
    assert inside[1].param_groups[0]["lr"] == pytest.approx(0.01 * 0.3**2)
    _assert_same(inside, separate)


def test_parameter_listed_twice_in_its_group_steps_twice():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(3, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for net in nets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of the duplicate
            opts.append(popt.Adam([net.weight, net.bias, net.weight], lr=0.1))
    x = torch.randn(4, 3)
    handle = popt.step_in_backward(opts[1])
    for _ in range(2):
        opts[0].zero_grad()
        nets[0](x).square().sum().backward()
        opts[0].step()
        nets[1](x).square().sum().backward()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    assert opts[1].state[nets[1].weight]["step"] == 4
    handle.remove()


def test_remove_restores_stepping_after_backward():
    separate, inside = _pair(*CONFIGS[1])
    data = _data(4)
    _train(*separate, data, in_backward=False)
    handle = _train(*inside, data[:2], in_backward=True)
    handle.remove()
    assert not handle.active
    _train(*inside, data[2:], in_backward=False)  # gradients kept and step() after backward again
    _assert_same(inside, separate)
    handle.remove()  # twice is harmless
    popt.step_in_backward(inside[1]).remove()  # and a new handle can be made


def test_zero_grad_and_parameters_without_gradient():
    (net, opt), _ = _pair(*CONFIGS[1])
    handle = popt.step_in_backward(opt)
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    x, y = _data(1)[0]
    torch.nn.functional.mse_loss(net(x), y).backward()
    assert all(p.grad is None for p in net.parameters())
    assert net.frozen.weight not in opt.state and net.unused not in opt.state
    handle.remove()


def _refusal(match):
    return pytest.raises(RuntimeError, match=match)


def test_step_is_refused_while_stepping_in_backward():
    (net, opt), _ = _pair(*CONFIGS[4])
    handle = popt.step_in_backward(opt)
    with _refusal(r"pyops.optim.step_in_backward: optimizer.step\(\) is refused .* step them twice"):
        opt.step()
    with _refusal("optimizer.step"):
        opt.step(lambda: torch.tensor(0.0))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)  # wraps opt.step: still refused through the wrapper
    with _refusal("optimizer.step"):
        opt.step()
    assert sched.last_epoch == 0
    with _refusal("already steps in backward"):
        popt.step_in_backward(opt)
    handle.remove()


def test_grad_scaler_is_refused():
    (net, opt), _ = _pair(*CONFIGS[4])
    handle = popt.step_in_backward(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = _data(1)[0]
    scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
    with _refusal(r"GradScaler.step\(optimizer\) is refused: a grad scaler unscales"):
        scaler.step(opt)
    handle.remove()
    assert opt._step_supports_amp_scaling  # and accepted again


def test_what_cannot_step_in_backward_is_refused_when_the_handle_is_made():
    net = Net()
    with pytest.raises(TypeError, match="step_in_backward: expected a pyops.optim optimizer .*torch.optim.adam.Adam"):
        popt.step_in_backward(torch.optim.Adam(net.parameters()))
    with pytest.raises(ValueError, match="differentiable=True is refused"):
        popt.step_in_backward(popt.SGD(net.parameters(), differentiable=True))
    opt = popt.SGD(net.parameters())
    hook = opt.register_step_post_hook(lambda *a: None)
    with _refusal("1 step pre/post hook"):
        popt.step_in_backward(opt)
    hook.remove()


def test_several_ranks_are_refused(monkeypatch):
    """Data-parallel wrappers reduce the gradients across ranks after the hooks would have stepped."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with _refusal("refused under torch.distributed with 2 ranks: .* unreduced gradient"):
        popt.step_in_backward(popt.SGD(Net().parameters()))


def test_a_parameter_added_later_is_refused_at_the_next_backward():
    net = Net()
    opt = popt.SGD([net.a.weight], lr=0.1)
    handle = popt.step_in_backward(opt)
    opt.add_param_group({"params": [net.head.weight]})
    x, y = _data(1)[0]
    with _refusal(r"a parameter of shape \(3, 8\) was added to the optimizer after the handle was made"):
        torch.nn.functional.mse_loss(net(x), y).backward()
    handle.remove()


def test_clip_grad_norm_sees_no_gradients():
    """Documented, not detectable: clipping over all parameters needs every gradient at once."""
    (net, opt), _ = _pair(*CONFIGS[1])
    handle = popt.step_in_backward(opt)
    x, y = _data(1)[0]
    torch.nn.functional.mse_loss(net(x), y).backward()
    assert float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)) == 0
    handle.remove()


# ---- peak memory ---------------------------------------------------------------------------------


def cpu_peak_bytes(fn):
    """Peak bytes allocated while fn() runs, from the CPU profiler's allocation events (as the loss
    bench measures, bench/loss.py)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def training_step_peaks(name, batch, opt_name="Adam"):
    """Peaks of one training step (forward, loss, backward, step() or not, zero_grad) of the demo model
    `name`, after a first step made the optimizer's state, so that each counts the same things
    (zero_grad last, so that what a step allocates is freed within it): stepping after backward,
    stepping in backward, and the floor of any step in backward: the same backward with hooks that only
    free each gradient (every gradient must exist whole once, when its hook fires)."""
    peaks = {}
    for mode in ("separate", "inside", "floor"):
        model = models.build(name)
        loss_fn = models.loss_module()
        opt = getattr(popt, opt_name)(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        y = torch.arange(batch) % 10
        handle = popt.step_in_backward(opt) if mode == "inside" else None

        def step(model=model, loss_fn=loss_fn, opt=opt, x=x, y=y, mode=mode):
            loss_fn(model(x), y).backward()
            if mode == "separate":
                opt.step()
            opt.zero_grad()

        step()
        if mode == "floor":
            free = lambda p: setattr(p, "grad", None)  # noqa: E731
            hooks = [p.register_post_accumulate_grad_hook(free) for p in model.parameters()]
        peaks[mode] = cpu_peak_bytes(step)
        if handle is not None:
            handle.remove()
        if mode == "floor":
            for h in hooks:
                h.remove()
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return peaks["separate"], peaks["inside"], peaks["floor"], grad_bytes


# The MLPs at batch 1 (the gradients outweigh the activations) and the CNN at batch 64 (the opposite).
@pytest.mark.parametrize("name,batch", [("mlp3", 1), ("maxout", 1), ("cnn", 64)])
def test_peak_memory_of_a_training_step(name, batch):
    """Stepping after backward holds every gradient at once (its peak is at least their bytes); stepping
    in backward holds one gradient at a time, and its peak is the floor: the step itself allocates
    nothing. The drop is the gradients alive at the separate step's peak (README: step inside backward)."""
    separate, inside, floor, grad_bytes = training_step_peaks(name, batch)
    assert inside == floor, (inside, floor)
    assert separate >= grad_bytes, (separate, grad_bytes)
    assert separate > inside, (separate, inside)

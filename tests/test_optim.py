"""pyops.optim against torch.optim's for-loop implementations, step by step."""

import copy
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

import pyops
import pyops.optim as popt
from oracle import TOL
from pyops.ops import PRIMITIVES
from pyops.ops.optim import LAUNCHES
from pyops.testing import OPTIM_NONFINITE, OPTIM_SHAPES, OPTIMIZERS

KERNEL_BACKENDS = [b for b in pyops.available_backends("cpu") if b != "torch"]
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
# (device, backend) pairs with a pyops kernel: the CPU ones here, the CUDA ones marked (skipped without a GPU)
DEVICE_BACKENDS = [("cpu", b) for b in KERNEL_BACKENDS] + [
    pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("native", "triton")
]

# The configurations of the spec table (pyops/testing/optim.py), which `python -m pyops check` runs too.
CONFIGS = {name: list(spec.configs) for name, spec in OPTIMIZERS.items()}
CASES = [(name, i) for name, cfgs in CONFIGS.items() for i in range(len(cfgs))]


def _params(dtype, device="cpu"):
    """The spec table's parameter shapes: several tensors, a 0-d and an empty one, and one whose gradient
    turns inf and NaN at one step (_with_nonfinite)."""
    torch.manual_seed(0)
    return [torch.randn(s, dtype=dtype).to(device).requires_grad_() for s in OPTIM_SHAPES]


def _with_nonfinite(grads):
    step, index, values = OPTIM_NONFINITE
    grads[step][index] = torch.tensor(values, dtype=grads[step][index].dtype, device=grads[step][index].device)
    return grads


def _run(cls, params, cfg, steps, grads):
    opt = (
        cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.02}], **cfg)
        if "lr" not in cfg
        else cls(params, **cfg)
    )
    for k in range(steps):
        for j, p in enumerate(params):
            p.grad = None if (j == 1 and k % 3 == 2) else grads[k][j].clone()  # a param without a grad
        opt.step()
    return opt


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,i", CASES)
def test_matches_torch_for_loop(name, i, dtype, backend):
    cfg = CONFIGS[name][i]
    ref_params, our_params = _params(dtype), _params(dtype)
    torch.manual_seed(1)
    grads = _with_nonfinite([[torch.randn_like(p) for p in ref_params] for _ in range(12)])
    ref = _run(getattr(torch.optim, name), ref_params, dict(cfg, foreach=False), 12, grads)
    with pyops.backend(backend):
        ours = _run(getattr(popt, name), our_params, cfg, 12, grads)
    rtol, atol = TOL[dtype]
    scale = 20  # 12 steps of rounding
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, rtol=rtol * scale, atol=atol * scale, equal_nan=True)
    for p_ours, p_ref in zip(our_params, ref_params):
        s_ours, s_ref = ours.state[p_ours], ref.state[p_ref]
        assert s_ours.keys() == s_ref.keys()
        for k in s_ref:
            torch.testing.assert_close(s_ours[k], s_ref[k], rtol=rtol * scale, atol=atol * scale, equal_nan=True)

    def groups(o):  # the reference ran with foreach=False; every other key must agree
        return [{k: v for k, v in g.items() if k not in ("foreach", "lr")} for g in o.state_dict()["param_groups"]]

    assert groups(ours) == groups(ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    """torch -> pyops -> torch: training continues on the same trajectory."""
    cfg = CONFIGS[name][1] if len(CONFIGS[name]) > 1 else {}
    params_a, params_b = _params(torch.float64), _params(torch.float64)
    torch.manual_seed(1)
    grads = [[torch.randn_like(p) for p in params_a] for _ in range(8)]
    ref = _run(getattr(torch.optim, name), params_a, dict(cfg, foreach=False), 4, grads)
    ours = getattr(popt, name)([{"params": params_b[:3]}, {"params": params_b[3:], "lr": 0.02}], **cfg)
    with torch.no_grad():
        for a, b in zip(params_a, params_b):
            b.copy_(a)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for k in range(4, 8):
        for j, (a, b) in enumerate(zip(params_a, params_b)):
            a.grad, b.grad = grads[k][j].clone(), grads[k][j].clone()
        ref.step()
        ours.step()
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    back = getattr(torch.optim, name)(
        [{"params": params_a[:3]}, {"params": params_a[3:], "lr": 0.02}], **dict(cfg, foreach=False)
    )
    back.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "name,cfg",
    [(n, c) for n in CONFIGS for c in ({}, CONFIGS[n][min(2, len(CONFIGS[n]) - 1)])]
    + [("SGD", {"momentum": 0.9, "dampening": 0.5})],
)
def test_found_inf_skips_everything(name, cfg, backend):
    """A step with found_inf set touches nothing, momentum buffers included on the very first step:
    the next real step is torch's first step."""
    params = _params(torch.float32)
    opt = getattr(popt, name)(params, **cfg)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0)
    with pyops.backend(backend):
        opt.step()
    for p, b, g in zip(params, before, grads):
        assert torch.equal(p, b) and torch.equal(p.grad, g)
    for state in opt.state.values():
        assert "step" not in state or float(state["step"]) == 0
    del opt.grad_scale, opt.found_inf
    ref_params = [b.clone().requires_grad_() for b in before]
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **cfg)
    for r, g in zip(ref_params, grads):
        r.grad = g.clone()
    with pyops.backend(backend):
        opt.step()
    ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grad_scale_unscales_and_writes_back(name, backend):
    params_a, params_b = _params(torch.float64), _params(torch.float64)
    ref = getattr(torch.optim, name)(params_a, foreach=False)
    ours = getattr(popt, name)(params_b)
    for a, b in zip(params_a, params_b):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g * 8
    ours.grad_scale, ours.found_inf = torch.tensor(8.0, dtype=torch.float64), torch.tensor(0.0)
    ref.step()
    with pyops.backend(backend):
        ours.step()
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b.grad, a.grad)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_grad_scaler_end_to_end():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = popt.Adam(model.parameters(), lr=0.1)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    scaler.scale(loss).backward()
    before = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, before)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_input(name):
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError):
        getattr(popt, name)([p], lr=-1.0)
    with pytest.raises(ValueError, match="master_weights=True needs differentiable=False"):
        getattr(popt, name)([p], differentiable=True, master_weights=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_is_a_torch_optimizer_and_torch_backend_matches(name):
    params = _params(torch.float32)
    opt = getattr(popt, name)(params)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, getattr(torch.optim, name))
    ref_params = _params(torch.float32)
    ref = getattr(torch.optim, name)(ref_params, foreach=False)
    for a, b in zip(params, ref_params):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
    with pyops.backend("torch"):
        opt.step()
    ref.step()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_half_precision_parameters(name, dtype):
    """float16/bfloat16 parameters and state, computed in float32: against torch's for-loop in
    float64 from the same starting values (the state itself is rounded to the dtype each step)."""
    cfg = CONFIGS[name][1] if len(CONFIGS[name]) > 1 else {}
    ours_p = _params(dtype)
    ref_p = [p.detach().double().requires_grad_() for p in ours_p]
    torch.manual_seed(1)
    grads = [[torch.randn_like(p) for p in ref_p] for _ in range(6)]
    _run(getattr(torch.optim, name), ref_p, dict(cfg, foreach=False), 6, grads)
    _run(getattr(popt, name), ours_p, cfg, 6, [[g.to(dtype) for g in gs] for gs in grads])
    rtol, atol = TOL[dtype]
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=rtol * 10, atol=rtol * 10)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,i", CASES)
def test_cuda_matches_torch_for_loop(name, i, dtype, backend):
    cfg = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in CONFIGS[name][i].items()}
    ref_params, our_params = _params(dtype, "cuda"), _params(dtype, "cuda")
    torch.manual_seed(1)
    grads = [[torch.randn_like(p) for p in ref_params] for _ in range(12)]
    ref = _run(getattr(torch.optim, name), ref_params, dict(cfg, foreach=False), 12, grads)
    with pyops.backend(backend):
        ours = _run(getattr(popt, name), our_params, cfg, 12, grads)
    rtol, atol = TOL[dtype]
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, rtol=rtol * 20, atol=atol * 20)
    for a, b in zip(our_params, ref_params):  # the state too (steps live on the GPU with ours)
        assert ours.state[a].keys() == ref.state[b].keys()
        for k in ref.state[b]:
            torch.testing.assert_close(
                ours.state[a][k], ref.state[b][k], rtol=rtol * 20, atol=atol * 20, check_device=False
            )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_master_weights(name, backend):
    """bfloat16 parameters with master_weights follow the float32 trajectory (to bfloat16 rounding),
    their state is float32, and a plain bfloat16 run drifts further."""
    cfg = CONFIGS[name][1] if len(CONFIGS[name]) > 1 else {}
    cfg = {k: v for k, v in cfg.items() if k != "lr"}
    half = [p.detach().bfloat16().requires_grad_() for p in _params(torch.float32)]
    full = [p.detach().float().requires_grad_() for p in half]  # the same values, in float32
    torch.manual_seed(1)
    grads = [[torch.randn_like(p).bfloat16().float() for p in full] for _ in range(20)]
    _run(getattr(torch.optim, name), full, dict(cfg, foreach=False), 20, grads)
    with pyops.backend(backend):
        opt = _run(
            getattr(popt, name), half, dict(cfg, master_weights=True), 20, [[g.bfloat16() for g in gs] for gs in grads]
        )
    for h, f in zip(half, full):
        assert h.dtype == torch.bfloat16
        torch.testing.assert_close(h.float(), f.detach(), rtol=8e-3, atol=8e-3)
        state = opt.state[h]
        if state:
            assert state["master_param"].dtype == torch.float32
            torch.testing.assert_close(state["master_param"], f.detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "RMSprop"])
def test_cuda_step_captures_in_a_graph(name, backend):
    """After a warm-up step a step records into a CUDA graph (no host synchronisation, no host
    copy), and replaying it matches eager steps."""
    cfg = {"lr": torch.tensor(0.01, device="cuda")}
    if name == "SGD":
        cfg["momentum"] = 0.9
    if name in ("Adam", "RMSprop"):
        cfg["capturable"] = True
    eager_p, graph_p = _params(torch.float32, "cuda"), _params(torch.float32, "cuda")
    grads = [torch.randn_like(p) for p in eager_p]
    for p, q, g in zip(eager_p, graph_p, grads):
        p.grad, q.grad = g.clone(), g.clone()
    with pyops.backend(backend):
        eager = getattr(popt, name)(eager_p, **cfg)
        graphed = getattr(popt, name)(graph_p, **cfg)
        eager.step()
        graphed.step()  # warm-up: state and device tables exist now
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed.step()
        for _ in range(3):
            graph.replay()
            eager.step()
    torch.cuda.synchronize()
    for p, q in zip(eager_p, graph_p):
        torch.testing.assert_close(q, p)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_cuda_graph_captures_forward_backward_and_step(name, backend):
    """A whole training step captured with zero_grad(set_to_none=True) inside the capture: the
    gradients get new addresses there, so the step's device tables are made during the capture. Replays
    with new data match eager training with torch's optimizer."""
    torch.manual_seed(0)

    def model_and_optimizer(module):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).cuda()
        cfg = {"lr": torch.tensor(0.01, device="cuda")}
        cfg.update({"momentum": 0.9} if name == "SGD" else {"capturable": True})
        if module is torch.optim:
            cfg["foreach"] = False
        return model, getattr(module, name)(model.parameters(), **cfg)

    data = [(torch.randn(32, 8, device="cuda"), torch.randn(32, 4, device="cuda")) for _ in range(8)]
    model, opt = model_and_optimizer(popt)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(static_x), static_y).backward()
        opt.step()

    with pyops.backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x, y in data[:3]:  # warm-up: real steps
                static_x.copy_(x)
                static_y.copy_(y)
                train_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            train_step()
        for x, y in data[3:]:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
    ref_model, ref_opt = model_and_optimizer(torch.optim)
    for x, y in data:
        ref_opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_cuda_steps_on_two_streams(name, backend):
    """The same optimizer steps on the default stream and on a side stream in turn (the device tables
    are per stream), matching torch's steps."""

    def params():
        torch.manual_seed(0)
        return [
            torch.randn(5000, device="cuda", requires_grad=True),
            torch.randn(7, 3, device="cuda", requires_grad=True),
        ]

    ours_p, ref_p = params(), params()
    cfg = {"momentum": 0.9} if name == "SGD" else {}
    ours = getattr(popt, name)(ours_p, **cfg)
    ref = getattr(torch.optim, name)(ref_p, foreach=False, **cfg)
    side = torch.cuda.Stream()
    for k in range(6):
        torch.manual_seed(k)
        grads = [torch.randn_like(p) for p in ours_p]
        for a, b, g in zip(ours_p, ref_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        stream = side if k % 2 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), pyops.backend(backend):
            ours.step()
        torch.cuda.current_stream().wait_stream(stream)
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("scalar_dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_grad_scaler_without_host_reads(backend, scalar_dtype):
    """grad_scale and found_inf of either float dtype, and SGD's first step with dampening skipped by
    the grad scaler: no host synchronisation (torch's sync debug mode raises on one), and the next
    real step is torch's first step."""
    torch.manual_seed(0)
    params = [torch.randn(5, 3, device="cuda", requires_grad=True), torch.randn(4, device="cuda", requires_grad=True)]
    ref_p = [p.detach().clone().requires_grad_() for p in params]
    opt = popt.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    ref = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g * 4
    opt.grad_scale = torch.tensor(4.0, device="cuda", dtype=scalar_dtype)
    opt.found_inf = torch.tensor(1.0, device="cuda", dtype=scalar_dtype)
    with pyops.backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()  # skipped on the device
            opt.found_inf = torch.zeros((), device="cuda", dtype=scalar_dtype)
            opt.step()  # the real first step
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for r, g in zip(ref_p, grads):
        r.grad = g.clone()
    ref.step()
    for p, r in zip(params, ref_p):
        torch.testing.assert_close(p, r)
        torch.testing.assert_close(
            opt.state_dict()["state"][0 if p is params[0] else 1]["momentum_buffer"], ref.state[r]["momentum_buffer"]
        )
    assert all("momentum_buffer" in s for s in opt.state_dict()["state"].values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sparse_gradients(name):
    """SGD and Adagrad take sparse gradients (torch's step for those tensors, counted); the others
    refuse them, as torch's do."""
    torch.manual_seed(0)
    ours_p, ref_p = torch.randn(4, 3, requires_grad=True), None
    ref_p = ours_p.detach().clone().requires_grad_()
    dense = torch.randn(2, 3, requires_grad=True)
    ours = getattr(popt, name)([ours_p, dense], lr=0.1)
    ref = getattr(torch.optim, name)([ref_p, dense.detach().clone().requires_grad_()], lr=0.1, foreach=False)
    before = popt.fallback_counts().get("sparse gradients", 0)
    for _ in range(3):
        grad = torch.randn(4, 3).to_sparse()
        ours_p.grad, ref_p.grad = grad.clone(), grad.clone()
        dense.grad = ref.param_groups[0]["params"][1].grad = torch.randn(2, 3)
        if name not in ("SGD", "Adagrad"):
            with pytest.raises((TypeError, RuntimeError), match="(?i)sparse"):
                ours.step()
            with pytest.raises((TypeError, RuntimeError), match="(?i)sparse"):
                ref.step()
            return
        ours.step()
        ref.step()
    torch.testing.assert_close(ours_p, ref_p)
    torch.testing.assert_close(dense, ref.param_groups[0]["params"][1])
    assert popt.fallback_counts()["sparse gradients"] == before + 3


def _opcheck_args(name, dtype, requires_grad=False):
    torch.manual_seed(0)
    shapes = [(3, 4), (0,), (), (2, 3, 4, 5)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    params[3] = params[3].contiguous(memory_format=torch.channels_last)
    like = lambda: [torch.rand_like(p) for p in params]  # noqa: E731
    steps = [torch.tensor(2.0) for _ in params]
    lr = torch.tensor(0.01, dtype=torch.float64)
    if name == "sgd_step_":
        flags = [torch.tensor([int(i == 1)], dtype=torch.uint8) for i in range(len(params))]
        return (params, like(), like(), lr, 0.9, 0.1, 0.01, True, False, flags, None, None)
    if name == "adam_step_":
        return (
            params,
            like(),
            like(),
            like(),
            like(),
            steps,
            lr,
            0.9,
            0.999,
            0.01,
            1e-8,
            True,
            False,
            False,
            torch.tensor(2.0),
            torch.tensor(0.0),
        )
    if name == "adagrad_step_":
        return (params, like(), like(), steps, lr, 0.1, 0.0, 1e-10, True, None, None)
    return (params, like(), like(), like(), like(), steps, lr, 0.99, 1e-8, 0.1, 0.5, True, False, None, None)


PRIMITIVE_NAMES = ["sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", PRIMITIVE_NAMES)
def test_opcheck(name, dtype, backend):
    torch.library.opcheck(PRIMITIVES[backend][name], _opcheck_args(name, dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_primitives_reject_bad_input(backend):
    prims = PRIMITIVES[backend]
    args = list(_opcheck_args("adam_step_", torch.float32))
    args[1] = args[1][:2]
    with pytest.raises(RuntimeError, match="pyops::adam_step_: grads has 2 tensors but params has 4"):
        prims["adam_step_"](*args)
    args = list(_opcheck_args("sgd_step_", torch.float32))
    args[1] = [g.double() for g in args[1]]
    with pytest.raises(RuntimeError, match="pyops::sgd_step_: grads has dtype"):
        prims["sgd_step_"](*args)


def _misfits():
    """Groups that one call cannot step as given, each with what the primitive says of it."""
    p = [torch.randn(3, 4), torch.randn(5)]
    g = [torch.randn_like(t) for t in p]
    st = [torch.tensor(1.0), torch.tensor(1.0)]
    return {
        "state layout": (p, g, [p[0].t().contiguous().t(), p[1].clone()], st, "has shape"),
        "grad dtype": (p, [g[0].double(), g[1]], [t.clone() for t in p], st, "has dtype"),
        "mixed dtypes": ([p[0], p[1].double()], [g[0], g[1].double()], [p[0].clone(), p[1].double()], st, "params[1]"),
        "not dense": ([torch.randn(3, 8)[:, ::2], p[1]], g, [t.clone() for t in p], st, "is not dense"),
        "integer": (
            [torch.ones(3, dtype=torch.int64)],
            [torch.ones(3, dtype=torch.int64)],
            [torch.ones(3, dtype=torch.int64)],
            st[:1],
            "must be float64",
        ),
        "step dtype": (p, g, [t.clone() for t in p], [torch.tensor(1), torch.tensor(1)], "steps[0]"),
    }


@pytest.mark.parametrize("case", list(_misfits()))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_step_fits_is_the_primitives_first_check(case, backend):
    """The optimizers ask pyops._C._fused_step_fits before one call per group, and the primitive raises
    exactly where it answers False (one function in csrc/optim.h): a group that fits and then raises is
    a real bug, which step() lets through."""
    params, grads, states, steps, words = _misfits()[case]
    lr = torch.tensor(0.1)
    assert not pyops._C._fused_step_fits(params, grads, [states], steps)
    with pytest.raises(RuntimeError, match=re.escape(words)):
        PRIMITIVES[backend]["adagrad_step_"](params, grads, states, steps, lr, 0.0, 0.0, 1e-10, False, None, None)
    fit = [torch.randn(3, 4), torch.randn(5)]
    fit_steps = [torch.tensor(1.0) for _ in fit]
    assert pyops._C._fused_step_fits(fit, [torch.randn_like(t) for t in fit], [[None] * len(fit), []], fit_steps)
    with pytest.raises(RuntimeError, match="lists must have params' length"):
        pyops._C._fused_step_fits(fit, [], [], [])
    with pytest.raises(TypeError, match="expected a tensor, got int"):
        pyops._C._fused_step_fits(fit, [1, 2], [], [])


def test_step_raises_what_the_primitive_raises_on_a_fitting_group(monkeypatch):
    """A primitive's error on a group that fits is not taken for 'does not fit' (once, step() caught
    every RuntimeError that began with the primitive's name and went the slow way)."""
    model = torch.nn.Linear(3, 2)
    opt = popt.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()

    def broken(*args):
        raise RuntimeError("pyops::adam_step_: a bug")

    for backend in KERNEL_BACKENDS:
        monkeypatch.setitem(PRIMITIVES[backend], "adam_step_", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        opt.step()


# ---- torch's semantics: version counters, layouts, complex, differentiable, fallbacks ------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_bumps_version_counters(name, backend):
    """A backward that saved a parameter before the step raises, as with torch's optimizers."""
    p = torch.randn(4, requires_grad=True)
    x = torch.randn(4, requires_grad=True)
    loss = (p * x).sum()  # saves p for x's gradient
    p.grad = torch.randn(4)
    opt = getattr(popt, name)([p], **({"momentum": 0.9} if name == "SGD" else {}))
    with pyops.backend(backend):
        opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    versions = {k: v._version for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    with pyops.backend(backend):
        opt.step()
    for k, v in opt.state[p].items():
        if isinstance(v, torch.Tensor):
            assert v._version > versions[k], k


def _compare_with_torch(name, cfg, make_params, grads_for, steps, backend, between=None):
    """Our optimizer and torch's for-loop from the same parameters and gradients: parameters and
    state agree after `steps` steps (between(k, params) runs before step k on both sides)."""
    ours_p, ref_p = make_params(), make_params()
    ours = getattr(popt, name)(ours_p, **cfg)
    ref = getattr(torch.optim, name)(ref_p, foreach=False, **cfg)
    for k in range(steps):
        if between is not None:
            between(k, ours_p)
            between(k, ref_p)
        for j, (a, b) in enumerate(zip(ours_p, ref_p)):
            a.grad, b.grad = grads_for(k, j, a), grads_for(k, j, b)
        with pyops.backend(backend):
            ours.step()
        ref.step()
    rtol, atol = TOL[ours_p[0].real.dtype if ours_p[0].is_complex() else ours_p[0].dtype]
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=rtol * 20, atol=atol * 20, equal_nan=True)
        for key in ref.state[b]:
            torch.testing.assert_close(
                ours.state[a][key],
                ref.state[b][key],
                rtol=rtol * 20,
                atol=atol * 20,
                equal_nan=True,
                check_device=False,  # ours keeps step counts on the parameter's device
            )
    return ours, ref


def _one_config(name):
    return CONFIGS[name][2] if len(CONFIGS[name]) > 2 else CONFIGS[name][-1]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_strided_differently_on_a_size_one_dim(name, backend):
    """A gradient whose strides differ from the parameter's only where a size is 1 takes the kernel."""
    before = sum(popt.fallback_counts().values())

    def params():
        torch.manual_seed(0)
        return [
            torch.randn(3, 1, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 5, dtype=torch.float64, requires_grad=True),
        ]

    def grad(k, j, p):
        torch.manual_seed(10 * k + j)
        g = torch.randn(p.shape[::-1], dtype=torch.float64).t()  # (3, 1) with strides (1, 3)
        assert g.stride() != p.stride() and g.shape == p.shape
        return g

    _compare_with_torch(name, _one_config(name), params, grad, 3, backend)
    assert sum(popt.fallback_counts().values()) == before


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_in_the_old_memory_format(name, backend):
    """model.to(memory_format=torch.channels_last) after some steps: the state keeps the old format
    (torch's too), and the steps go on correct; ours is restrided to the parameter's layout once."""

    def params():
        torch.manual_seed(0)
        return [
            torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True),
            torch.randn(4, dtype=torch.float64, requires_grad=True),
        ]

    def grad(k, j, p):
        torch.manual_seed(10 * k + j)
        return torch.empty_like(p).copy_(torch.randn(p.shape, dtype=torch.float64))

    def to_channels_last(k, ps):
        if k == 2:
            ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)

    cfg = dict(CONFIGS[name][1] if len(CONFIGS[name]) > 1 else {}, **({"momentum": 0.9} if name == "SGD" else {}))
    cfg = {k: v for k, v in cfg.items() if k != "lr"}
    ours, _ = _compare_with_torch(name, cfg, params, grad, 5, backend, between=to_channels_last)
    p = ours.param_groups[0]["params"][0]
    for key, value in ours.state[p].items():
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            assert value.stride() == p.stride(), key


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_complex_parameters(name, backend):
    """Complex parameters step as real pairs, as torch's fused optimizers do; state stays complex."""
    before = sum(popt.fallback_counts().values())

    def params():
        torch.manual_seed(0)
        return [
            torch.randn(4, 3, dtype=torch.complex128, requires_grad=True),
            torch.randn(5, dtype=torch.float64, requires_grad=True),
        ]

    def grad(k, j, p):
        torch.manual_seed(10 * k + j)
        return torch.randn(p.shape, dtype=p.dtype)

    cfg = {"momentum": 0.9, "dampening": 0.3} if name == "SGD" else _one_config(name)
    ours, _ = _compare_with_torch(name, cfg, params, grad, 4, backend)
    assert sum(popt.fallback_counts().values()) == before
    for value in ours.state[ours.param_groups[0]["params"][0]].values():
        assert value.dim() == 0 or value.is_complex()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_differentiable_takes_torchs_step(name):
    """differentiable=True runs torch's own step, so the update is part of the graph: the gradient
    through two steps matches torch's."""
    before = popt.fallback_counts().get("differentiable=True", 0)
    results = []
    for module in (popt, torch.optim):
        torch.manual_seed(0)
        leaf = torch.randn(4, dtype=torch.float64, requires_grad=True)
        p = leaf.clone()  # differentiable steps update non-leaf parameters
        opt = getattr(module, name)([p], differentiable=True, **({"foreach": False} if module is torch.optim else {}))
        for k in range(2):
            torch.manual_seed(k)
            p.grad = torch.randn(4, dtype=torch.float64)
            opt.step()
        (p * p).sum().backward()
        results.append((p.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    assert popt.fallback_counts()["differentiable=True"] == before + 2


def test_non_dense_parameters_fall_back_counted_and_logged_once(caplog):
    base = torch.randn(4, 8, dtype=torch.float64)
    strided = base[:, ::2].detach().requires_grad_()  # a leaf that is not dense
    dense = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ref_p = [strided.detach().clone().requires_grad_(), dense.detach().clone().requires_grad_()]
    ours = popt.Adam([strided, dense])
    ref = torch.optim.Adam(ref_p, foreach=False)
    before = popt.fallback_counts().get("non-dense parameters", 0)
    with caplog.at_level(logging.DEBUG, logger="pyops"):
        for _ in range(3):
            for a, b in zip([strided, dense], ref_p):
                g = torch.randn(a.shape, dtype=a.dtype)
                a.grad, b.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
    for a, b in zip([strided, dense], ref_p):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert popt.fallback_counts()["non-dense parameters"] == before + 3
    logged = [r for r in caplog.records if "non-dense parameters" in r.getMessage()]
    assert len(logged) <= 1 and (before > 0 or len(logged) == 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fallback_keeps_the_grad_scaler_contract(name, device):
    """Tensors that take torch's step (here a non-dense parameter) under a grad scaler: found_inf set
    leaves everything untouched (decided on the device where found_inf lives), otherwise gradients are
    unscaled in place and the step is torch's."""
    torch.manual_seed(0)
    base = torch.randn(4, 8, dtype=torch.float64, device=device)
    ours = [base[:, ::2].detach().requires_grad_(), torch.randn(3, dtype=torch.float64, device=device).requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    cfg = {"momentum": 0.9, "dampening": 0.5} if name == "SGD" else {}
    opt = getattr(popt, name)(ours, **cfg)
    ref_opt = getattr(torch.optim, name)(ref, foreach=False, **cfg)
    grads = [torch.randn(p.shape, dtype=p.dtype, device=device) for p in ours]
    for p, g in zip(ours, grads):
        p.grad = g * 8
    before = [p.detach().clone() for p in ours]
    opt.grad_scale = torch.tensor(8.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    for p, b, g in zip(ours, before, grads):
        assert torch.equal(p, b) and torch.equal(p.grad, g * 8)
    opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    for p, r, g in zip(ours, ref, grads):
        torch.testing.assert_close(p.grad, g)
        r.grad = g.clone()
    ref_opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    if name == "SGD":
        state = opt.state_dict()["state"]
        torch.testing.assert_close(state[0]["momentum_buffer"], ref_opt.state[ref[0]]["momentum_buffer"])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_amsgrad_propagates_nan(device, backend):
    def params():
        return [torch.ones(4, dtype=torch.float64, device=device, requires_grad=True)]

    def grad(k, j, p):
        g = torch.full((4,), 0.5, dtype=torch.float64, device=device)
        if k == 1:
            g[2] = float("nan")
        return g

    ours, _ = _compare_with_torch("Adam", {"amsgrad": True}, params, grad, 3, backend)
    assert torch.isnan(ours.state[ours.param_groups[0]["params"][0]]["max_exp_avg_sq"][2])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad", "RMSprop"])
def test_float64_step_counts(name, device, backend):
    """torch keeps step counts in float64 under set_default_dtype(float64): read in their dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:

        def params():
            torch.manual_seed(0)
            return [
                torch.randn(5, 2, device=device, requires_grad=True),
                torch.randn(3, device=device, requires_grad=True),
            ]

        def grad(k, j, p):
            torch.manual_seed(10 * k + j)
            return torch.randn(p.shape).to(device)

        cfg = {"lr_decay": 0.1} if name == "Adagrad" else {"weight_decay": 0.1}
        ours, _ = _compare_with_torch(name, cfg, params, grad, 5, backend)
        step = ours.state[ours.param_groups[0]["params"][0]]["step"]
        assert step.dtype == torch.float64 and float(step) == 5
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "name,cfg",
    [
        ("Adam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("AdamW", {"weight_decay": 0.3}),
        ("Adam", {"weight_decay": 0.1}),
        ("Adagrad", {"lr_decay": 0.3}),
        ("SGD", {"momentum": 0.9}),
        ("RMSprop", {"centered": True}),
    ],
)
def test_float32_lr_with_float64_parameters(name, cfg, device, backend):
    """torch computes lr / bias correction, 1 - lr * wd and Adagrad's decayed lr in a tensor lr's
    dtype: a float32 lr rounds them to float32 for float64 parameters too."""

    def params():
        torch.manual_seed(0)
        return [torch.randn(6, 2, dtype=torch.float64).to(device).requires_grad_()]

    def grad(k, j, p):
        torch.manual_seed(k)
        return torch.randn(p.shape, dtype=torch.float64).to(device)

    _compare_with_torch(name, dict(cfg, lr=torch.tensor(0.037, device=device)), params, grad, 6, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_master_weights_survive_copies_and_reloads(name, backend):
    """deepcopy, pickling and state_dict()/load_state_dict() keep the float32 master copies and
    state: each copy steps on exactly as the original does."""
    cfg = {k: v for k, v in (CONFIGS[name][1] if len(CONFIGS[name]) > 1 else {}).items() if k != "lr"}
    torch.manual_seed(0)
    params = [torch.randn(5, 3).bfloat16().requires_grad_(), torch.randn(4).bfloat16().requires_grad_()]
    grads = [[torch.randn(p.shape).bfloat16() for p in params] for _ in range(6)]

    def step(opt, k):
        for p, g in zip(opt.param_groups[0]["params"], grads[k]):
            p.grad = g.clone()
        with pyops.backend(backend):
            opt.step()

    original = getattr(popt, name)(params, master_weights=True, **cfg)
    for k in range(3):
        step(original, k)
    reloaded_params = [p.detach().clone().requires_grad_() for p in params]
    reloaded = getattr(popt, name)(reloaded_params, master_weights=True, **cfg)
    reloaded.load_state_dict(copy.deepcopy(original.state_dict()))
    copies = [copy.deepcopy(original), pickle.loads(pickle.dumps(original)), reloaded]
    for k in range(3, 6):
        for opt in [original] + copies:
            step(opt, k)
    for opt in copies:
        assert opt.master_weights
        for p, q in zip(original.param_groups[0]["params"], opt.param_groups[0]["params"]):
            assert torch.equal(p, q)
            for key, value in original.state[p].items():
                assert value.dtype == opt.state[q][key].dtype
                assert key == "step" or value.dtype == torch.float32
                assert torch.equal(value, opt.state[q][key]), key


# torch warns at a parameter group with a parameter listed twice, and steps it once per listing
_LISTED_TWICE = pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")


@_LISTED_TWICE
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,i", CASES)
def test_parameter_listed_twice_steps_twice(name, i, backend):
    """A parameter listed twice in a group steps twice, its step count advancing in between, as
    torch's for-loop steps it."""

    def params():
        torch.manual_seed(0)
        a = torch.randn(5, dtype=torch.float64, requires_grad=True)
        return [a, torch.randn(3, dtype=torch.float64, requires_grad=True), a]

    def grad(k, j, p):
        torch.manual_seed(10 * k + p.numel())
        return torch.randn(p.shape, dtype=p.dtype)

    _compare_with_torch(name, CONFIGS[name][i], params, grad, 3, backend)


@_LISTED_TWICE
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_listed_twice_with_state_in_the_old_memory_format(name, backend):
    """The state of a parameter listed twice, brought to the parameter's layout: one copy, stepped
    twice."""

    def params():
        torch.manual_seed(0)
        a = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
        return [a, torch.randn(4, dtype=torch.float64, requires_grad=True), a]

    def grad(k, j, p):
        torch.manual_seed(10 * k + p.numel())
        return torch.empty_like(p).copy_(torch.randn(p.shape, dtype=torch.float64))

    def to_channels_last(k, ps):
        if k == 2:
            ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)

    cfg = {k: v for k, v in CONFIGS[name][1].items() if k != "lr"}
    _compare_with_torch(name, cfg, params, grad, 4, backend, between=to_channels_last)


@_LISTED_TWICE
@pytest.mark.parametrize("path", ["kernel", "layout", "fallback", "master"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_listed_twice_under_a_grad_scaler(name, backend, path):
    """Under a grad scaler, a parameter listed twice steps as without one from the unscaled gradient
    (unscaled once, not once per listing), on every path: the kernel, a gradient in another layout
    than its parameter (stepped from a copy), torch's step (a non-dense parameter), master weights."""
    torch.manual_seed(0)
    if path == "layout":
        shape, grad_layout = (3, 2, 2, 2), torch.channels_last
    else:
        shape, grad_layout = (3, 4), torch.contiguous_format
    dtype = torch.bfloat16 if path == "master" else torch.float64
    base = torch.randn(shape[0], 2 * shape[1], *shape[2:]).to(dtype)
    value = base[:, ::2] if path == "fallback" else base[:, : shape[1]].contiguous()
    grads = [torch.randn(shape).to(dtype).contiguous(memory_format=grad_layout) for _ in range(2)]
    cfg = dict(_one_config(name), **({"master_weights": True} if path == "master" else {}))
    runs = []
    for scale in (None, 8.0):
        p = value.clone() if path != "fallback" else base.clone()[:, ::2]
        p.requires_grad_()
        opt = getattr(popt, name)([p, p], **cfg)
        if scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        for g in grads:
            p.grad = g * (scale or 1)
            with pyops.backend(backend):
                opt.step()
            assert torch.equal(p.grad, g)
        runs.append(p.detach())
    assert torch.equal(runs[0], runs[1])


class _SlowToWalk(dict):
    """A cache whose walks yield the interpreter to other threads midway, as a thread switch can: what
    another thread does to the cache meanwhile shows (in every run instead of some)."""

    def items(self):
        for i, item in enumerate(super().items()):
            if i == 1:
                time.sleep(1e-4)
            yield item


def _run_switching_often(threads):
    """Start and join `threads` with the interpreter switching threads every microsecond (races show)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


def test_threads_step_their_own_optimizers_with_float_lr_schedules(monkeypatch):
    """Threads stepping their own optimizers with float lr schedules (more distinct values than the
    shared lr cache holds, so that it evicts while other threads use it) raise nothing and give torch's
    results."""
    from pyops.optim import _step

    monkeypatch.setattr(_step, "_LRS", _SlowToWalk())
    steps = 4 * _step.MAX_CACHED_LRS
    names = list(CONFIGS)

    def schedule(t, k):
        return 1e-3 * (t + 1) / (1 + k / 50), torch.linspace(-1, 1, 3, dtype=torch.float64) * ((k % 5) - 2)

    def run(module, t, params, errors):
        try:
            opt = getattr(module, names[t])(params, **dict(CONFIGS[names[t]][1], foreach=False))
            with pyops.backend("native"):
                for k in range(steps):
                    opt.param_groups[0]["lr"], params[0].grad = schedule(t, k)
                    opt.step()
        except Exception as e:  # reported by the main thread
            errors.append(e)

    ours = [[torch.ones(3, dtype=torch.float64, requires_grad=True)] for _ in names]
    errors = []
    threads = [threading.Thread(target=run, args=(popt, t, ours[t], errors)) for t in range(len(names))]
    _run_switching_often(threads)
    assert not errors, errors
    rtol, atol = TOL[torch.float64]
    for t in range(len(names)):
        ref = [torch.ones(3, dtype=torch.float64, requires_grad=True)]
        run(torch.optim, t, ref, errors)
        assert not errors, errors
        torch.testing.assert_close(ours[t][0], ref[0], rtol=rtol, atol=atol)


# ---- the primitives: checks, flags, launches -------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_primitives_check_everything_before_launching(backend):
    """Each bad argument raises a named error on every backend (in a subprocess: an unchecked pointer
    would be a signal, not an exception)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = os.path.join(SCRIPTS, "bad_calls_optim.py")
    out = subprocess.run([sys.executable, script, backend], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 18, out.stdout
    for line in lines:
        assert ": raised pyops::" in line, line


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_parameter_changed_under_the_state(backend):
    """p.data = p.data.double() after a step leaves float32 state: a named error (torch's for-loop
    raises too), never a signal or silent garbage; a parameter moved to channels_last under its
    state steps as torch's does (both in a subprocess: a mismatch used to be a segfault)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "optim_parameter_changed.py"), backend],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    assert "dtype: raised pyops::adam_step_: exp_avgs has dtype Float but params has dtype Double" in out.stdout
    difference = float(out.stdout.split("memory format: max difference")[1])
    assert difference < 1e-6, out.stdout


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sgd_new_buffer_flags(backend):
    """A flagged buffer starts as the gradient and its flag clears; with found_inf set nothing is
    touched, the flag included, so the next step still starts it."""
    p = torch.ones(3, dtype=torch.float64)
    g = torch.full((3,), 2.0, dtype=torch.float64)
    buf = torch.full((3,), 100.0, dtype=torch.float64)
    flag = torch.ones(1, dtype=torch.uint8)
    lr = torch.tensor(0.5, dtype=torch.float64)
    step = PRIMITIVES[backend]["sgd_step_"]
    step([p], [g], [buf], lr, 0.9, 0.5, 0.0, False, False, [flag], None, torch.tensor(1.0))
    assert float(flag) == 1 and torch.equal(buf, torch.full((3,), 100.0, dtype=torch.float64))
    assert torch.equal(p, torch.ones(3, dtype=torch.float64))
    step([p], [g], [buf], lr, 0.9, 0.5, 0.0, False, False, [flag], None, torch.tensor(0.0))
    assert float(flag) == 0 and torch.equal(buf, g) and torch.equal(p, torch.zeros(3, dtype=torch.float64))
    step([p], [g], [buf], lr, 0.9, 0.5, 0.0, False, False, [flag], None, None)
    assert torch.equal(buf, 0.9 * g + 0.5 * g)


def _kernels_module():
    from pyops.kernels import optim  # imported here: conftest sets TRITON_INTERPRET first

    return optim


def test_triton_launches_are_the_aot_variants():
    """Every launch the Triton launchers make (each optimizer, dtype and option) is one of
    aot_variants(), the list compiled ahead of time for the GPU."""
    from launches import record_launches, uncovered  # imports triton

    K = _kernels_module()
    with record_launches(run=False) as launches:
        for dtype in K.DTYPES:
            for name in PRIMITIVE_NAMES:
                args = list(_opcheck_args(name, torch.float32))
                args[0] = [p.to(dtype) for p in args[0]]
                args[1:5] = [
                    [t.to(dtype) if t.is_floating_point() and t.dim() else t for t in lst]
                    if isinstance(lst, list)
                    else lst
                    for lst in args[1:5]
                ]
                getattr(K, LAUNCHES[name][1])(*args)
    assert len(launches) == len(K.DTYPES) * len(PRIMITIVE_NAMES) * 2  # the update and the finish
    missing = uncovered(launches, K.aot_variants())
    assert not missing, "launches no variant compiles:\n" + "\n".join(missing)


def test_triton_tables_from_threads(monkeypatch):
    """The Triton launchers' table cache, used by threads that each upload more distinct tables than
    it holds (so that it evicts while the others use it): every call returns its own values."""
    from pyops.kernels import _common as K  # imported here: conftest sets TRITON_INTERPRET first

    monkeypatch.setattr(K, "_TABLES", _SlowToWalk())
    errors = []

    def run(t):
        try:
            for k in range(4 * K.MAX_CACHED_TABLES):
                values = [t, k, 7]
                assert K.device_table(values, torch.int64, torch.device("cpu")).tolist() == values
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    _run_switching_often(threads)
    assert not errors, errors

"""pyops.optim against torch.optim's for-loop implementations, step by step."""
import copy

import pytest
import torch

import pyops
import pyops.optim as popt

from oracle import TOL
from pyops.ops import PRIMITIVES

KERNEL_BACKENDS = [b for b in pyops.available_backends("cpu") if b != "torch"]

CONFIGS = {
    "SGD": [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "dampening": 0.5},
            {"weight_decay": 0.1, "momentum": 0.5}, {"maximize": True, "momentum": 0.3}, {"lr": torch.tensor(0.01)}],
    "Adam": [{}, {"amsgrad": True}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
             {"maximize": True, "betas": (0.8, 0.9)}, {"lr": torch.tensor(0.01), "eps": 1e-6}],
    "AdamW": [{}, {"amsgrad": True, "weight_decay": 0.3}, {"maximize": True}],
    "Adagrad": [{}, {"lr_decay": 0.1}, {"weight_decay": 0.1, "initial_accumulator_value": 0.5}, {"maximize": True}],
    "RMSprop": [{}, {"centered": True}, {"momentum": 0.9}, {"momentum": 0.5, "centered": True, "weight_decay": 0.1},
                {"maximize": True, "alpha": 0.9}],
}
CASES = [(name, i) for name, cfgs in CONFIGS.items() for i in range(len(cfgs))]


def _params(dtype, device="cpu"):
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (), (0, 4), (3, 2, 2), (1,)]
    return [torch.randn(s, dtype=dtype).to(device).requires_grad_() for s in shapes]


def _run(cls, params, cfg, steps, grads):
    opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.02}], **cfg) if "lr" not in cfg else \
        cls(params, **cfg)
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
    grads = [[torch.randn_like(p) for p in ref_params] for _ in range(12)]
    ref = _run(getattr(torch.optim, name), ref_params, dict(cfg, foreach=False), 12, grads)
    with pyops.backend(backend):
        ours = _run(getattr(popt, name), our_params, cfg, 12, grads)
    rtol, atol = TOL[dtype]
    scale = 20  # 12 steps of rounding
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, rtol=rtol * scale, atol=atol * scale)
    for p_ours, p_ref in zip(our_params, ref_params):
        s_ours, s_ref = ours.state[p_ours], ref.state[p_ref]
        assert s_ours.keys() == s_ref.keys()
        for k in s_ref:
            torch.testing.assert_close(s_ours[k], s_ref[k], rtol=rtol * scale, atol=atol * scale)
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
    back = getattr(torch.optim, name)([{"params": params_a[:3]}, {"params": params_a[3:], "lr": 0.02}],
                                      **dict(cfg, foreach=False))
    back.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,cfg", [(n, c) for n in CONFIGS for c in ({}, CONFIGS[n][min(2, len(CONFIGS[n]) - 1)])]
                         + [("SGD", {"momentum": 0.9, "dampening": 0.5})])
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
    for p, r, g in zip(params, ref_params, grads):
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
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
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
        _run(getattr(popt, name), our_params, cfg, 12, grads)
    rtol, atol = TOL[dtype]
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, rtol=rtol * 20, atol=atol * 20)
    assert ref is not None


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
        opt = _run(getattr(popt, name), half, dict(cfg, master_weights=True), 20,
                   [[g.bfloat16() for g in gs] for gs in grads])
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
    for step in range(3):
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
        return (params, like(), like(), like(), like(), steps, lr, 0.9, 0.999, 0.01, 1e-8, True, False, False,
                torch.tensor(2.0), torch.tensor(0.0))
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

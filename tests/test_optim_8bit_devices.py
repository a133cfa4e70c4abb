"""pyops::adam_step_8bit_ on the Triton backend (the interpreter here, tiny shapes) and on CUDA, against
the CPU kernel, the torch-ops path and the float64 oracle of tests/test_optim_8bit.py.

What "equal" means here: the Triton and CUDA kernels run the update's float32 math as csrc/optim.h
states it, one IEEE-rounded operation at a time (no fused multiply-add, correctly rounded division and
square root), as the torch-ops path (pyops/optim/quantized.py, the `torch` backend) does with separate
torch ops: against that path every code, absmax, parameter and step is bit-equal. The CPU kernel is
compiled with -mfma and its compiler contracts a * b + c into fused multiply-adds, so its states and
parameters differ from the unfused math by float32 rounding: against it the codes are equal except
within float32 rounding of a decision boundary (the oracle's `near`, off by one at most there), and
absmaxs and parameters agree to a few float32 units in the last place.
"""

import math

import numpy as np
import pytest
import torch
from test_optim_8bit import CASES, QS, QU, _oracle, _random_state

import pyops
import pyops.optim as popt
from pyops.ops import PRIMITIVES
from pyops.optim import quantized as q

# whole blocks, a partial last block, a tensor of fewer than 256 elements
SHAPES = [(2, 256), (300,), (100,)]
STEP = 3.0
LR, BETA1, BETA2, EPS = 1e-2, 0.9, 0.999, 1e-8
ULPS = 4 * 2.0**-24  # float32 rounding of the fused multiply-adds' results, relative


def _inputs(dtype=torch.float32, shapes=SHAPES, seed=0, device="cpu", grad_scale=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 0.05).to(dtype) for s in shapes]
    if grad_scale is not None:
        grads = [g * grad_scale for g in grads]
    states = []
    for p in params:
        mc, vc, ma, va = _random_state(p.numel(), gen)
        states.append((mc.view(p.shape), vc.view(p.shape), ma, va))
    return {
        "params": [p.to(device) for p in params],
        "grads": [g.to(device) for g in grads],
        "states": [tuple(t.to(device) for t in st) for st in states],
    }


def _step(backend, x, cfg, lr_dtype=torch.float64, grad_scale=None, found_inf=None, step=STEP):
    """One call of the primitive on clones of x; returns (params, grads, m codes, v codes, m absmax,
    v absmax, steps)."""
    device = x["params"][0].device
    ps = [p.clone() for p in x["params"]]
    gs = [g.clone() for g in x["grads"]]
    mcs, vcs, mas, vas = ([st[k].clone() for st in x["states"]] for k in range(4))
    steps = [torch.tensor(step, device=device) for _ in ps]
    qs, qu = q.maps(device)
    PRIMITIVES[backend]["adam_step_8bit_"](
        ps,
        gs,
        mcs,
        vcs,
        mas,
        vas,
        steps,
        qs,
        qu,
        q.BLOCK_SIZE,
        torch.tensor(LR, dtype=lr_dtype, device=device),
        BETA1,
        BETA2,
        cfg["wd"],
        EPS,
        cfg["maximize"],
        cfg["decoupled"],
        None if grad_scale is None else torch.tensor(grad_scale, device=device),
        found_inf,
    )
    return ps, gs, mcs, vcs, mas, vas, steps


def _assert_near_cpu(got, want, x, cfg, grad_scale=None, lr=LR):
    """got (a device's results) against want (the CPU kernel's) and the float64 oracle."""
    ps, gs, mcs, vcs, mas, vas, steps = (
        [t.cpu() for t in got[k]] if isinstance(got[k], list) else got[k] for k in range(7)
    )
    for i, p in enumerate(x["params"]):
        p, g = p.cpu(), x["grads"][i].cpu()
        mc0, vc0, ma0, va0 = (t.cpu() for t in x["states"][i])
        oracle = _oracle(p, g, mc0, vc0, ma0, va0, STEP, lr, BETA1, BETA2, cfg["wd"], EPS, cfg["maximize"],
                         cfg["decoupled"], grad_scale)  # fmt: skip
        p_new, mc_o, vc_o, ma_o, va_o, near = oracle
        for name, a, b in (("exp_avg", mcs[i], want[2][i]), ("exp_avg_sq", vcs[i], want[3][i])):
            a, b = a.flatten().long(), b.flatten().long()
            assert ((a != b) & ~near).sum() == 0, f"{name}[{i}]: codes differ from the CPU kernel's off a boundary"
            assert ((a - b).abs() <= 1).all(), f"{name}[{i}]"
        for a, b in ((mas[i], want[4][i]), (vas[i], want[5][i])):
            torch.testing.assert_close(a, b, rtol=ULPS, atol=0)
        dtype = p.dtype
        half = dtype in (torch.float16, torch.bfloat16)
        rtol = torch.finfo(dtype).eps if half else ULPS  # half types: one rounding of the result apart
        torch.testing.assert_close(ps[i], want[0][i], rtol=rtol, atol=1e-6 * lr)
        torch.testing.assert_close(gs[i], want[1][i], rtol=0, atol=0)
        # and the float64 oracle, as tests/test_optim_8bit.py holds the CPU kernel to it
        tol = dict(rtol=1.6e-2, atol=1e-5) if half else dict(rtol=2e-6, atol=1e-5 * lr)
        torch.testing.assert_close(ps[i].double().flatten(), p_new.to(dtype).double(), **tol)
        torch.testing.assert_close(mas[i].double(), ma_o, rtol=2e-6, atol=0)
        torch.testing.assert_close(vas[i].double(), va_o, rtol=2e-6, atol=0)
        for a, b in ((mcs[i], mc_o), (vcs[i], vc_o)):
            assert ((a.flatten().long() != b) & ~near).sum() == 0
    assert [float(s) for s in steps] == [STEP + 1] * len(x["params"])


@pytest.mark.parametrize("case", list(CASES))
def test_triton_against_cpu_kernel(case):
    """maximize, L2 and decoupled weight decay: the Triton kernel against the CPU kernel and the oracle."""
    cfg = CASES[case]
    x = _inputs()
    _assert_near_cpu(_step("triton", x, cfg), _step("native", x, cfg), x, cfg)


def test_triton_grad_scaler_and_float32_lr():
    """Gradients unscaled by the grad scaler (and written back so), a float32 learning rate (lr / bias
    correction and 1 - lr wd rounded to float32, as the CPU kernel)."""
    cfg = CASES["adamw"]
    x = _inputs(grad_scale=1024.0)
    kw = dict(lr_dtype=torch.float32, grad_scale=1024.0, found_inf=torch.tensor(0.0))
    got, want = _step("triton", x, cfg, **kw), _step("native", x, cfg, **kw)
    for g, g0 in zip(got[1], x["grads"]):  # a power of two: exact
        torch.testing.assert_close(g, g0 / 1024.0, rtol=0, atol=0)
    _assert_near_cpu(got, want, x, cfg, grad_scale=1024.0, lr=float(torch.tensor(LR, dtype=torch.float32)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_triton_other_param_dtypes(dtype):
    """float64 parameters (update in float64, states float32) and bfloat16 ones (update in float32)."""
    cfg = CASES["adam_l2_maximize"]
    x = _inputs(dtype, shapes=[(300,), (100,)])
    _assert_near_cpu(_step("triton", x, cfg), _step("native", x, cfg), x, cfg)


def test_triton_found_inf_skips_everything():
    """found_inf != 0: nothing is written, not even the unscaled gradients or the step counts."""
    x = _inputs(grad_scale=8.0)
    got = _step("triton", x, CASES["adamw"], grad_scale=8.0, found_inf=torch.tensor(1.0))
    before = (x["params"], x["grads"], *([st[k] for st in x["states"]] for k in range(4)))
    for a_list, b_list in zip(got[:6], before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    assert [float(s) for s in got[6]] == [STEP] * len(SHAPES)


def test_triton_nan_block():
    """A NaN gradient makes its block's absmaxs NaN (both states), as the CPU kernel; other blocks step."""
    x = _inputs(shapes=[(600,)])
    x["grads"][0][300] = float("nan")
    got, want = _step("triton", x, CASES["adam"]), _step("native", x, CASES["adam"])
    for k in (4, 5):
        assert torch.isnan(got[k][0][1]) and torch.isnan(want[k][0][1])
        assert not torch.isnan(got[k][0][[0, 2]]).any()
        torch.testing.assert_close(got[k][0][[0, 2]], want[k][0][[0, 2]], rtol=ULPS, atol=0)
    for k in (2, 3):  # codes of the finite blocks (a NaN block's codes are unspecified)
        a, b = got[k][0].flatten(), want[k][0].flatten()
        keep = torch.ones(600, dtype=torch.bool)
        keep[256:512] = False
        assert ((a[keep].long() - b[keep].long()).abs() <= 1).all()


def _float32_math(x, cfg):
    """The update as csrc/optim.h states it, in numpy float32, one IEEE-rounded operation at a time
    (float32 parameters, a float64 lr): (params, m codes, v codes, m absmax, v absmax) per tensor."""
    f = np.float32
    t = STEP + 1
    step_size, inv_bc2 = f(LR / (1 - BETA1**t)), f(1 / math.sqrt(1 - BETA2**t))
    b1, b2, eps, wd, decay = f(BETA1), f(BETA2), f(EPS), f(cfg["wd"]), f(1 - LR * cfg["wd"])
    out = []
    for p, g, (mc, vc, ma, va) in zip(x["params"], x["grads"], x["states"]):
        p, g = p.flatten().numpy(), g.flatten().numpy()
        block = np.arange(p.size) // q.BLOCK_SIZE
        if cfg["maximize"]:
            g = -g
        if cfg["wd"]:
            if cfg["decoupled"]:
                p = p * decay
            else:
                g = g + wd * p
        m0 = QS.numpy()[mc.flatten().numpy()] * ma.numpy()[block]
        v0 = QU.numpy()[vc.flatten().numpy()] * va.numpy()[block]
        m = m0 + (f(1) - b1) * (g - m0)
        v = v0 * b2 + (f(1) - b2) * g * g
        p = p - step_size * m / (np.sqrt(v) * inv_bc2 + eps)
        result = [p]
        for state, qmap in ((m, QS.numpy()), (v, QU.numpy())):
            absmax = np.maximum.reduceat(np.abs(state), np.arange(0, p.size, q.BLOCK_SIZE))
            inv = np.where(absmax > 0, f(1) / np.where(absmax > 0, absmax, f(1)), f(0))
            mids = (qmap[:-1] + qmap[1:]) * f(0.5)
            result += [np.searchsorted(mids, state * inv[block], side="left"), absmax]
        out.append((result[0], result[1], result[3], result[2], result[4]))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_triton_bit_equal_to_float32_math(case):
    """The Triton kernel computes the stated float32 math bit for bit: parameters, codes, absmaxs."""
    cfg = CASES[case]
    x = _inputs()
    got = _step("triton", x, cfg)
    for i, (p, mc, vc, ma, va) in enumerate(_float32_math(x, cfg)):
        assert np.array_equal(got[0][i].flatten().numpy(), p), f"params[{i}]"
        assert np.array_equal(got[2][i].flatten().numpy(), mc), f"exp_avgs[{i}]"
        assert np.array_equal(got[3][i].flatten().numpy(), vc), f"exp_avg_sqs[{i}]"
        assert np.array_equal(got[4][i].numpy(), ma) and np.array_equal(got[5][i].numpy(), va), f"absmaxs[{i}]"


def _train(backend, steps=2, device="cpu"):
    """AdamW with 8-bit states on two quantized tensors (4100 elements: a partial last block of 4)."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in ((4100,), (41, 100))]
    grads = [[torch.randn(p.shape, generator=gen).to(device) * 0.05 for p in params] for _ in range(steps)]
    opt = popt.AdamW(params, lr=1e-2, weight_decay=0.1, state_dtype="8bit")
    with pyops.backend(backend):
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
    assert all(q.kind_of(opt.state[p], p) == "8bit" for p in params)
    return params, opt


def _assert_agree(a, oa, b, ob, param_rtol):
    """States bit-equal, parameters to param_rtol (and a float32 unit of the update, 1e-8, near zero)."""
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=param_rtol, atol=1e-8)
        for k, v in oa.state[x].items():
            assert torch.equal(v, ob.state[y][k]), k


def test_triton_optimizer_against_torch_ops_path():
    """Two AdamW8bit steps through the optimizer on the Triton backend and on the torch-ops path: the
    same states bit for bit, parameters within a float32 unit in the last place (torch's CPU float32
    sqrt is not correctly rounded in the last bit, the kernels' is)."""
    a, oa = _train("triton")
    b, ob = _train("torch")
    _assert_agree(a, oa, b, ob, param_rtol=2.0**-23)


def test_triton_bad_input():
    """The Triton twin shares the host side's checks (a spot check: tests/scripts/bad_calls_optim_8bit.py
    runs them all on the CPU kernel)."""
    x = _inputs(shapes=[(300,)])
    args = lambda **kw: _step_args(x, **kw)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"pyops::adam_step_8bit_: block_size must be 256.*got 128"):
        PRIMITIVES["triton"]["adam_step_8bit_"](*args(block_size=128))
    with pytest.raises(RuntimeError, match=r"pyops::adam_step_8bit_: exp_avg_absmaxs\[0\] must be .* of 2 elements"):
        PRIMITIVES["triton"]["adam_step_8bit_"](*args(ma=torch.zeros(3)))
    with pytest.raises(RuntimeError, match=r"pyops::adam_step_8bit_: qmap_signed must be .* 256"):
        PRIMITIVES["triton"]["adam_step_8bit_"](*args(qs=QS[:128]))
    with pytest.raises(RuntimeError, match=r"pyops::adam_step_8bit_: qmap_signed must hold finite values sorted"):
        PRIMITIVES["triton"]["adam_step_8bit_"](*args(qs=QS.flip(0).contiguous()))


def _step_args(x, block_size=256, ma=None, qs=None):
    st = x["states"][0]
    return (
        x["params"], x["grads"], [st[0]], [st[1]], [st[2] if ma is None else ma], [st[3]], [torch.tensor(1.0)],
        QS if qs is None else qs, QU, block_size, torch.tensor(LR, dtype=torch.float64), BETA1, BETA2, 0.0, EPS,
        False, False, None, None,
    )  # fmt: skip


# ---- bfloat16 states (pyops::adam_step_ with bfloat16 exp_avg/exp_avg_sq for float32 parameters) ----------
def _bf16_step(backend, amsgrad, device="cpu"):
    """One Adam call over a parameter with bfloat16 states and one with float32 states (two launches on
    Triton, one per states' dtype); returns every tensor it writes."""
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(s, generator=gen).to(device) for s in ((300,), (2, 50))]
    gs = [(torch.randn(p.shape, generator=gen) * 0.05).to(device) for p in ps]
    dtypes = (torch.bfloat16, torch.float32)
    ms = [(torch.randn(p.shape, generator=gen) * 0.01).to(device, dt) for p, dt in zip(ps, dtypes)]
    vs = [(torch.rand(p.shape, generator=gen) * 1e-4).to(device, dt) for p, dt in zip(ps, dtypes)]
    vmaxs = [(v.float() * 1.5).to(dt) for v, dt in zip(vs, dtypes)] if amsgrad else []
    steps = [torch.tensor(STEP, device=device) for _ in ps]
    start = [p.cpu().clone() for p in ps]
    PRIMITIVES[backend]["adam_step_"](
        ps, gs, ms, vs, vmaxs, steps, torch.tensor(LR, dtype=torch.float64, device=device), BETA1, BETA2, 0.1, EPS,
        amsgrad, False, True, None, None,
    )  # fmt: skip
    return ps, ms, vs, vmaxs, steps, start


def _assert_bf16_close(got, want, exact_share):
    """Parameters and states against the CPU kernel's: bfloat16 states within one bfloat16 unit, at least
    exact_share of them bit-equal, float32 ones to float32 rounding (the CPU kernel's fused multiply-adds);
    parameters within what such units of exp_avg and exp_avg_sq change of the Adam step (2^-6 of it) and
    float32 rounding."""
    for a, b, p0 in zip(got[0], want[0], want[5]):
        adam_step = (b - p0 * (1 - LR * 0.1)).abs()  # (weight decay 0.1, decoupled)
        assert ((a.cpu() - b).abs() <= 2.0**-6 * adam_step + ULPS * b.abs()).all()
    for k in (1, 2, 3):
        for a, b in zip(got[k], want[k]):
            a = a.cpu()
            assert a.dtype == b.dtype
            if a.dtype == torch.bfloat16:
                torch.testing.assert_close(a.float(), b.float(), rtol=torch.finfo(a.dtype).eps, atol=0)
                assert (a == b).float().mean() >= exact_share
            else:
                torch.testing.assert_close(a, b, rtol=ULPS, atol=0)
    assert [float(s) for s in got[4]] == [STEP + 1] * 2


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_triton_bf16_states(amsgrad):
    """bfloat16 states of float32 parameters on Triton (the interpreter), with a float32-state parameter
    in the same call, against the CPU kernel. The interpreter converts float32 to bfloat16 by truncating
    (the compiled kernel rounds to nearest even, as the CPU kernel): states within one bfloat16 unit."""
    _assert_bf16_close(_bf16_step("triton", amsgrad), _bf16_step("native", amsgrad), exact_share=0.4)


# ---- CUDA (run where a GPU is lent) -------------------------------------------------------------------
CUDA_SHAPES = [(64, 64), (70000,), (300,), (100,)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernel_against_cpu_kernel(case, dtype):
    """The CUDA kernel against the CPU kernel and the oracle, and bit-equal to Triton's on the GPU (the
    same unfused math; float64 parameters to the last bits of the float64 step size)."""
    cfg = CASES[case]
    x = _inputs(dtype, shapes=CUDA_SHAPES, device="cuda", grad_scale=64.0)
    kw = dict(grad_scale=64.0, found_inf=torch.tensor(0.0, device="cuda"))
    got = _step("native", x, cfg, **kw)
    x_cpu = {k: [t.cpu() if torch.is_tensor(t) else tuple(s.cpu() for s in t) for t in v] for k, v in x.items()}
    want = _step("native", x_cpu, cfg, **dict(kw, found_inf=torch.tensor(0.0)))
    _assert_near_cpu(got, want, x_cpu, cfg, grad_scale=64.0)
    tri = _step("triton", x, cfg, **kw)
    for a_list, b_list in zip(got[1:], tri[1:]):  # gradients, codes, absmaxs, steps
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    # parameters: float64 ones take lr / (1 - beta1^t) in float64, pow on CUDA, exp(t log beta1) in Triton
    rtol = 4 * 2.0**-52 if dtype == torch.float64 else 0
    for a, b in zip(got[0], tri[0]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)


@pytest.mark.cuda
def test_cuda_found_inf_and_bit_equal_to_unfused_math():
    """found_inf on the device skips the step (no host read); the CUDA kernel through the optimizer
    agrees with the torch-ops path on the GPU (states bit for bit, parameters to a float32 unit)."""
    x = _inputs(shapes=CUDA_SHAPES, device="cuda", grad_scale=8.0)
    got = _step("native", x, CASES["adamw"], grad_scale=8.0, found_inf=torch.tensor(1.0, device="cuda"))
    before = (x["params"], x["grads"], *([st[k] for st in x["states"]] for k in range(4)))
    for a_list, b_list in zip(got[:6], before):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    assert [float(s) for s in got[6]] == [STEP] * len(CUDA_SHAPES)
    a, oa = _train("native", device="cuda")
    b, ob = _train("torch", device="cuda")
    _assert_agree(a, oa, b, ob, param_rtol=2.0**-23)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_cuda_bf16_states(amsgrad, backend):
    """bfloat16 states of float32 parameters on the GPU (rounded to nearest even), CUDA and Triton kernels,
    against the CPU kernel: bit-equal states but where the CPU kernel's fused multiply-adds tip a rounding."""
    got = _bf16_step(backend, amsgrad, device="cuda")
    _assert_bf16_close(got, _bf16_step("native", amsgrad), exact_share=0.98)

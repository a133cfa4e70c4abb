"""Adam/AdamW with 8-bit blockwise and bfloat16 states (pyops/optim/quantized.py, pyops::adam_step_8bit_)
against a float64 oracle of the same dequantize -> update -> requantize."""

import copy
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

import pyops
import pyops.optim as popt
from pyops.ops import PRIMITIVES
from pyops.optim import quantized as q

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
QS, QU = q.dynamic_map(True), q.dynamic_map(False)
# y = state * (1 / absmax) carries the float32 update's rounding: a few units in the last place of the
# operands |m0|, |g|, |m| (relative to absmax); within this many of them of a decision boundary (a
# midpoint of two map values) the float64 oracle's code may differ from the kernel's by one.
BOUNDARY_ULPS = 16
EPS32 = 2.0**-24


def test_dynamic_maps():
    """bitsandbytes' dynamic maps: sorted, 256 values, signed [-0.99297, 1] with 0, unsigned [0, 1]."""
    for m in (QS, QU):
        assert m.shape == (256,) and m.dtype == torch.float32 and bool((m[1:] >= m[:-1]).all())
    assert QS[-1] == 1 and QS[0] == pytest.approx(-0.99296875) and (QS == 0).sum() == 1 and (QS < 0).sum() == 127
    assert QU[0] == 0 and QU[-1] == 1 and QU[1] == pytest.approx(0.325e-6, rel=1e-5)
    # decades of linear steps: 2^i values in decade i (signed), 2^(i+1) unsigned
    pos = QS[QS > 0][:-1]
    for i in range(7):
        assert ((pos >= 0.1 * 10.0 ** (i - 6)) & (pos < 10.0 ** (i - 6))).sum() == 2**i


def _f32_of(x):
    return float(torch.tensor(x, dtype=torch.float32))


def _oracle(p, g, mc, vc, ma, va, step, lr, beta1, beta2, wd, eps, maximize, decoupled, grad_scale=None):
    _f32 = _f32_of if p.dtype != torch.float64 else float
    """One step in float64 from the same codes and absmaxs: (params, m codes, v codes, m absmax, v absmax,
    boundary mask: elements whose code is within float32 rounding of a decision boundary). The
    coefficients are those the kernels hold (as the float32 Adam kernel's): beta1, beta2, 1 - beta1,
    1 - beta2, eps, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t) and 1 - lr wd rounded to float32 (float64
    parameters: float64)."""
    qs, qu = QS.double(), QU.double()
    p, g = p.reshape(-1), g.reshape(-1)
    n = p.numel()
    rep = torch.arange(n) // q.BLOCK_SIZE
    m0 = qs[mc.reshape(-1).long()] * ma.double()[rep]
    v0 = qu[vc.reshape(-1).long()] * va.double()[rep]
    b1, b2 = _f32(beta1), _f32(beta2)
    one_b1, one_b2 = _f32(1 - b1), _f32(1 - b2)
    t = step + 1
    step_size, inv_bc2 = _f32(lr / (1 - beta1**t)), _f32(1 / (1 - beta2**t) ** 0.5)
    g64 = g.double()
    if grad_scale is not None:
        g64 = g64 / grad_scale
    if maximize:
        g64 = -g64
    p64 = p.double()
    if wd:
        if decoupled:
            p64 = p64 * _f32(1 - lr * wd)
        else:
            g64 = g64 + _f32(wd) * p64
    m = m0 + one_b1 * (g64 - m0)
    v = b2 * v0 + one_b2 * g64 * g64
    p_new = p64 - step_size * m / (v.sqrt() * inv_bc2 + _f32(eps))
    codes, absmaxs, near = [], [], torch.zeros(n, dtype=torch.bool)
    for x, qmap, scale in ((m, qs, m0.abs() + g64.abs() + m.abs()), (v, qu, v0 + g64 * g64 + v)):
        blocks = torch.nn.functional.pad(x, (0, (-n) % q.BLOCK_SIZE)).view(-1, q.BLOCK_SIZE)
        absmax = blocks.abs().amax(1)
        y = x / absmax[rep]
        mids = (qmap[:-1] + qmap[1:]) / 2
        code = torch.bucketize(y, mids)  # the nearest map value, ties to the lower
        dist = (y[:, None] - mids[None, :]).abs().amin(1)
        near |= dist <= BOUNDARY_ULPS * EPS32 * scale / absmax[rep]
        codes.append(code)
        absmaxs.append(absmax)
    return p_new, codes[0], codes[1], absmaxs[0], absmaxs[1], near


def _random_state(n, gen):
    mc = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    vc = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    nb = (n + q.BLOCK_SIZE - 1) // q.BLOCK_SIZE
    ma = torch.rand(nb, generator=gen) * 0.1 + 0.01
    va = torch.rand(nb, generator=gen) * 0.01 + 1e-4
    return mc, vc, ma, va


CASES = {
    "adam": dict(wd=0.0, maximize=False, decoupled=False),
    "adam_l2_maximize": dict(wd=0.1, maximize=True, decoupled=False),
    "adamw": dict(wd=0.1, maximize=False, decoupled=True),
}


@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_against_float64_oracle(case, scaled, lr_dtype):
    """One call over tensors of whole blocks, a partial last block, a scalar tail (n % 16), and enough
    elements to run in parallel: codes bit-exact except within float32 rounding of a boundary; absmax,
    parameters and the unscaled gradients to float32 rounding."""
    cfg = CASES[case]
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 64), (5000,), (300,), (70000,), (13, 7, 3)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    states = [_random_state(p.numel(), gen) for p in params]
    steps = [torch.tensor(float(k + 3)) for k in range(len(params))]
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.999, 1e-8
    lr_t = torch.tensor(lr, dtype=lr_dtype)
    lr_o = float(torch.tensor(lr, dtype=lr_dtype))
    grad_scale = 1024.0 if scaled else None
    if scaled:
        grads = [g * grad_scale for g in grads]
    expected = [
        _oracle(p, g, *st, float(t), lr_o, beta1, beta2, cfg["wd"], eps, cfg["maximize"], cfg["decoupled"], grad_scale)
        for p, g, st, t in zip(params, grads, states, steps)
    ]
    if lr_dtype == torch.float32:  # lr / bias correction and 1 - lr wd round to float32, as torch's
        expected = None
    ps, gs = [p.clone() for p in params], [g.clone() for g in grads]
    mcs = [st[0].clone().view(p.shape) for st, p in zip(states, params)]
    vcs = [st[1].clone().view(p.shape) for st, p in zip(states, params)]
    mas, vas = [st[2].clone() for st in states], [st[3].clone() for st in states]
    st_t = [t.clone() for t in steps]
    PRIMITIVES["native"]["adam_step_8bit_"](
        ps,
        gs,
        mcs,
        vcs,
        mas,
        vas,
        st_t,
        QS,
        QU,
        256,
        lr_t,
        beta1,
        beta2,
        cfg["wd"],
        eps,
        cfg["maximize"],
        cfg["decoupled"],
        torch.tensor(grad_scale) if scaled else None,
        torch.tensor(0.0) if scaled else None,
    )
    for t, t0 in zip(st_t, steps):
        assert float(t) == float(t0) + 1
    if expected is None:
        expected = [
            _oracle(
                p, g, *st, float(t), lr_o, beta1, beta2, cfg["wd"], eps, cfg["maximize"], cfg["decoupled"], grad_scale
            )
            for p, g, st, t in zip(params, grads, states, steps)
        ]
    near_total = 0
    for i, (p_new, mc, vc, ma, va, near) in enumerate(expected):
        torch.testing.assert_close(ps[i].double().flatten(), p_new, rtol=2e-6, atol=1e-5 * lr, msg=f"params[{i}]")
        torch.testing.assert_close(mas[i].double(), ma, rtol=2e-6, atol=0, msg=f"exp_avg_absmax[{i}]")
        torch.testing.assert_close(vas[i].double(), va, rtol=2e-6, atol=0, msg=f"exp_avg_sq_absmax[{i}]")
        for name, got, want in (("exp_avg", mcs[i].flatten().long(), mc), ("exp_avg_sq", vcs[i].flatten().long(), vc)):
            differ = (got != want) & ~near
            assert not differ.any(), f"{name}[{i}]: {int(differ.sum())} codes differ away from a boundary"
            assert ((got - want).abs() <= 1).all(), f"{name}[{i}]"
        if scaled:  # written back unscaled (a power of two: exact)
            torch.testing.assert_close(gs[i], grads[i] / grad_scale, rtol=0, atol=0)
        near_total += int(near.sum())
    assert near_total < 0.01 * sum(p.numel() for p in params)  # the exemption is rare


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_kernel_other_param_dtypes(dtype):
    """float64 and bfloat16 parameters (computed in float64 / float32; states float32 per block)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(4100, generator=gen).to(dtype)
    g = (torch.randn(4100, generator=gen) * 0.05).to(dtype)
    mc, vc, ma, va = _random_state(4100, gen)
    p_new, mce, vce, mae, vae, near = _oracle(p, g, mc, vc, ma, va, 4.0, 1e-2, 0.9, 0.999, 0.0, 1e-8, False, False)
    ps, gs, mcs, vcs, mas, vas = [p.clone()], [g.clone()], [mc.clone()], [vc.clone()], [ma.clone()], [va.clone()]
    PRIMITIVES["native"]["adam_step_8bit_"](
        ps, gs, mcs, vcs, mas, vas, [torch.tensor(4.0)], QS, QU, 256, torch.tensor(1e-2, dtype=torch.float64),
        0.9, 0.999, 0.0, 1e-8, False, False, None, None,
    )  # fmt: skip
    tol = dict(rtol=2e-6, atol=1e-5 * 1e-2) if dtype == torch.float64 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(ps[0].double(), p_new.to(dtype).double(), **tol)
    torch.testing.assert_close(mas[0].double(), mae, rtol=2e-6, atol=0)
    for got, want in ((mcs[0].long(), mce), (vcs[0].long(), vce)):
        assert not ((got != want) & ~near).any()


def test_found_inf_skips_everything():
    gen = torch.Generator().manual_seed(3)
    p, g = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    mc, vc, ma, va = _random_state(5000, gen)
    args = [[p.clone()], [g.clone()], [mc.clone()], [vc.clone()], [ma.clone()], [va.clone()], [torch.tensor(1.0)]]
    PRIMITIVES["native"]["adam_step_8bit_"](
        *args, QS, QU, 256, torch.tensor(0.1), 0.9, 0.999, 0.0, 1e-8, False, False, torch.tensor(2.0), torch.tensor(1.0)
    )
    for got, want in zip(args, [[p], [g], [mc], [vc], [ma], [va], [torch.tensor(1.0)]]):
        assert torch.equal(got[0], want[0])


def test_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(4)
    shapes = [(70000,), (100000,), (4096,)]
    base = [
        (torch.randn(s, generator=gen), torch.randn(s, generator=gen) * 0.1, _random_state(s[0], gen)) for s in shapes
    ]
    outs = []
    threads = torch.get_num_threads()
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            ps = [b[0].clone() for b in base]
            mcs, vcs = [b[2][0].clone() for b in base], [b[2][1].clone() for b in base]
            mas, vas = [b[2][2].clone() for b in base], [b[2][3].clone() for b in base]
            PRIMITIVES["native"]["adam_step_8bit_"](
                ps, [b[1].clone() for b in base], mcs, vcs, mas, vas, [torch.tensor(1.0) for _ in base], QS, QU, 256,
                torch.tensor(1e-3), 0.9, 0.999, 0.0, 1e-8, False, False, None, None,
            )  # fmt: skip
            outs.append(ps + mcs + vcs + mas + vas)
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(300, generator=gen), torch.randn(20, 30, generator=gen)]
    mc = [torch.full(p.shape, 127, dtype=torch.uint8) for p in params]
    vc = [torch.zeros(p.shape, dtype=torch.uint8) for p in params]
    ab = [torch.zeros((p.numel() + 255) // 256) for p in params]
    args = (
        params, [torch.randn_like(p) for p in params], mc, vc, ab, [a.clone() for a in ab],
        [torch.tensor(1.0) for _ in params], QS, QU, 256, torch.tensor(1e-3), 0.9, 0.999, 0.0, 1e-8, False, True,
        None, None,
    )  # fmt: skip
    torch.library.opcheck(PRIMITIVES["native"]["adam_step_8bit_"], args)


# ---- bad input ---------------------------------------------------------------------------------


def _good_args():
    params = [torch.randn(300), torch.randn(20, 30)]
    return [
        params,
        [torch.randn_like(p) for p in params],
        [torch.zeros(p.shape, dtype=torch.uint8) for p in params],
        [torch.zeros(p.shape, dtype=torch.uint8) for p in params],
        [torch.zeros(2), torch.zeros(3)],
        [torch.zeros(2), torch.zeros(3)],
        [torch.tensor(1.0) for _ in params],
        QS.clone(),
        QU.clone(),
        256,
        torch.tensor(1e-3),
        0.9,
        0.999,
        0.0,
        1e-8,
        False,
        False,
        None,
        None,
    ]


def _bad(k, value):
    args = _good_args()
    args[k] = value(args[k]) if callable(value) else value
    return args


BAD = {
    "block size": (
        lambda: _bad(9, 128),
        "pyops::adam_step_8bit_: block_size must be 256 (the block the kernels quantize, one float32 absmax each), "
        "got 128",
    ),
    "state dtype": (
        lambda: _bad(2, lambda s: [t.float() for t in s]),
        "pyops::adam_step_8bit_: exp_avgs[0] must be uint8 codes of params[0]'s shape [300] and strides [1] on cpu, "
        "got Float of shape [300] and strides [1] on cpu",
    ),
    "absmax length": (
        lambda: _bad(5, [torch.zeros(2), torch.zeros(2)]),
        "pyops::adam_step_8bit_: exp_avg_sq_absmaxs[1] must be a contiguous 1-d float32 tensor of 3 elements (one "
        "per block of 256 of params[1]'s 600) on cpu, got Float of shape [2] on cpu",
    ),
    "map length": (
        lambda: _bad(7, QS[:128].clone()),
        "pyops::adam_step_8bit_: qmap_signed must be a contiguous 1-d float32 tensor of 256 sorted values on cpu, "
        "got Float of shape [128] on cpu",
    ),
    "map unsorted": (
        lambda: _bad(8, QU.flip(0).contiguous()),
        "pyops::adam_step_8bit_: qmap_unsigned must hold finite values sorted ascending, got 0.996484 at 1 after 1",
    ),
    "list length": (
        lambda: _bad(4, [torch.zeros(2)]),
        "pyops::adam_step_8bit_: exp_avg_absmaxs has 1 tensors but params has 2",
    ),
    "codes shape": (
        lambda: _bad(3, lambda s: [s[0], torch.zeros(600, dtype=torch.uint8)]),
        "pyops::adam_step_8bit_: exp_avg_sqs[1] must be uint8 codes of params[1]'s shape [20, 30] and strides [30, 1] "
        "on cpu, got Byte of shape [600] and strides [1] on cpu",
    ),
    "grads dtype": (
        lambda: _bad(1, lambda s: [t.double() for t in s]),
        "pyops::adam_step_8bit_: grads has dtype Double but params has dtype Float (tensor 0)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_primitive_rejects_bad_input(case):
    make, message = BAD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        PRIMITIVES["native"]["adam_step_8bit_"](*make())


def test_bad_calls_never_crash():
    """Every bad call in a subprocess: refused with an error naming the primitive, never a signal."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = os.path.join(SCRIPTS, "bad_calls_optim_8bit.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 8, out.stdout
    for line in lines:
        assert ": raised pyops::adam_step_8bit_" in line, line


def test_optimizer_bad_input():
    p = torch.randn(5000, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=re.escape("pyops.optim.Adam: state_dtype must be None, torch.bfloat16 or '8bit', got torch.float16"),
    ):
        popt.Adam([p], state_dtype=torch.float16)
    with pytest.raises(
        ValueError,
        match=re.escape("pyops.optim.AdamW8bit: amsgrad=True is not supported with 8-bit states (state_dtype='8bit')"),
    ):
        popt.AdamW8bit([p], amsgrad=True)
    with pytest.raises(ValueError, match=re.escape("pyops.optim.Adam: state_dtype='8bit' needs master_weights=False")):
        popt.Adam([p], state_dtype="8bit", master_weights=True)


# ---- the optimizers ------------------------------------------------------------------------------


def _model_params(seed=0):
    torch.manual_seed(seed)
    return [
        torch.randn(64, 96, requires_grad=True),  # 6144: quantized
        torch.randn(5000, requires_grad=True),  # quantized, partial last block
        torch.randn(32, 16, 3, 3).to(memory_format=torch.channels_last).requires_grad_(),  # 4608, channels_last
        torch.randn(100, requires_grad=True),  # small: float32 state
        torch.randn((), requires_grad=True),  # 1 element: float32 state
    ]


def _train(opt_cls, steps, seed=0, backend=None, **kw):
    params = _model_params(seed)
    opt = opt_cls(params, lr=1e-2, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with pyops.backend(backend) if backend else _null():
        for _ in range(steps):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) + 0.5 * p.detach()).to(
                    memory_format=torch.contiguous_format
                )
                if p.dim() == 4:
                    p.grad = p.grad.to(memory_format=torch.channels_last)
            opt.step()
    return params, opt


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("state_dtype", ["8bit", torch.bfloat16], ids=["8bit", "bf16"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_training_follows_float32_adam(cls, state_dtype):
    """20 steps: parameters stay close to float32 Adam's (quantized states are approximations: the
    update's direction is kept, its size within a few percent)."""
    ours, opt = _train(getattr(popt, cls), 20, state_dtype=state_dtype)
    ref, _ = _train(getattr(torch.optim, cls), 20, foreach=False)
    start = _model_params()
    for a, b, s in zip(ours, ref, start):
        moved = (b - s).detach()
        err = (a - b).detach()
        assert err.norm() <= 0.05 * moved.norm() + 1e-6, (a.shape, float(err.norm()), float(moved.norm()))
    kinds = [q.kind_of(opt.state[p], p) for p in ours]
    want = "8bit" if state_dtype == "8bit" else "bf16"
    assert kinds == [want, want, want, None, None]
    assert opt.state[ours[3]]["exp_avg"].dtype == torch.float32 and opt.state[ours[4]]["exp_avg"].dtype == torch.float32


def test_state_bytes_per_parameter():
    """11.7M parameters in ResNet-18's shapes... here one large tensor per case: 8-bit <= 2.1, bf16 <= 4
    bytes a parameter (against 8 for float32 states, step counts included)."""
    for state_dtype, limit in (("8bit", 2.1), (torch.bfloat16, 4.0 + 1e-3), (None, 8.0 + 1e-3)):
        p = torch.zeros(1 << 20, requires_grad=True)
        p.grad = torch.ones_like(p)
        opt = popt.Adam([p], state_dtype=state_dtype)
        opt.step()
        assert q.state_bytes(opt) <= limit, (state_dtype, q.state_bytes(opt))
    assert q.state_bytes(opt) > 7.9


@pytest.mark.parametrize("state_dtype", ["8bit", torch.bfloat16], ids=["8bit", "bf16"])
def test_torch_backend_agrees_with_kernel(state_dtype):
    """The torch-ops path (the `torch` backend, and devices without the kernel) computes what the
    kernel does: parameters to float32 rounding, states almost all bit-equal (codes may differ by one
    at a boundary)."""
    a, oa = _train(popt.AdamW, 5, state_dtype=state_dtype)
    b, ob = _train(popt.AdamW, 5, backend="torch", state_dtype=state_dtype)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        for k, v in oa.state[x].items():
            w = ob.state[y][k]
            if v.dtype == torch.uint8:
                assert ((v.long() - w.long()).abs() <= 1).all() and (v != w).float().mean() < 0.01
            else:
                torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-7)


def test_fallback_is_counted(monkeypatch):
    """A device without the 8-bit kernel takes the torch-ops path, counted in fallback_counts."""
    monkeypatch.setattr(q, "_has_8bit_kernel", lambda backend, device: False)
    before = sum(v for k, v in popt.fallback_counts().items() if "8-bit" in k)
    a, _ = _train(popt.Adam8bit, 3)
    after = sum(v for k, v in popt.fallback_counts().items() if "8-bit" in k)
    assert after - before == 3 * 3
    monkeypatch.undo()
    b, _ = _train(popt.Adam8bit, 3)
    assert sum(v for k, v in popt.fallback_counts().items() if "8-bit" in k) == after  # the kernel ran
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("state_dtype", ["8bit", torch.bfloat16], ids=["8bit", "bf16"])
def test_state_dict_round_trip(state_dtype):
    """state_dict -> load_state_dict restores the states exactly (codes, absmax, bfloat16, steps), and
    training continues as if uninterrupted; deepcopy and pickle too."""
    params, opt = _train(popt.Adam, 3, state_dtype=state_dtype)
    sd = copy.deepcopy(opt.state_dict())
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = popt.Adam(params2, lr=1e-2, state_dtype=state_dtype)
    opt2.load_state_dict(sd)
    for p, p2 in zip(params, params2):
        s, s2 = opt.state[p], opt2.state[p2]
        assert s.keys() == s2.keys()
        for k in s:
            assert s[k].dtype == s2[k].dtype and torch.equal(s[k], s2[k]), k
    for o in (opt2, pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert o.param_groups[0]["state_dtype"] == state_dtype
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        for p, p2 in zip(params, params2):
            g = torch.randn(p.shape, generator=gen)
            p.grad, p2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)


def test_load_from_float32_adam_and_save_to_it():
    """A float32 Adam's state_dict (torch's) loads into Adam8bit, quantized; dequantized_state_dict gives
    one that torch's Adam loads, with states within the quantization error of the originals."""
    params = _model_params()
    ref = torch.optim.Adam(params, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        ref.step()
    sd = ref.state_dict()
    ours = popt.Adam8bit(params, lr=1e-2)
    ours.load_state_dict(sd)
    assert [q.kind_of(ours.state[p], p) for p in params] == ["8bit", "8bit", "8bit", None, None]
    back = popt.dequantized_state_dict(ours)
    assert all("state_dtype" not in g for g in back["param_groups"])
    ref2 = torch.optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    ref2.load_state_dict(back)
    for i, p in enumerate(params):
        s0, s1 = sd["state"][i], back["state"][i]
        assert s1.keys() == s0.keys() and torch.equal(s0["step"], s1["step"])
        for k, qmap in (("exp_avg", QS), ("exp_avg_sq", QU)):
            assert s1[k].dtype == p.dtype and s1[k].shape == p.shape
            if q.kind_of(ours.state[p], p) is None:
                assert torch.equal(s0[k], s1[k])
                continue
            # each element dequantizes to the map value nearest to it over its block's absmax
            x, y = q._flat(s0[k].double()), q._flat(s1[k].double())
            n = x.numel()
            a = torch.nn.functional.pad(x.abs(), (0, (-n) % 256)).view(-1, 256).amax(1).repeat_interleave(256)[:n]
            nearest = (x[:, None] / a[:, None] - qmap.double()[None, :]).abs().amin(1)
            assert ((x - y).abs() / a <= nearest + 1e-6).all(), k
    # and the float32 state loads back into a float32 pyops Adam (dequantizing an 8-bit state_dict)
    plain = popt.Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    plain.load_state_dict(ours.state_dict())
    for i, p in enumerate(plain.param_groups[0]["params"]):
        assert plain.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(plain.state[p]["exp_avg"], back["state"][i]["exp_avg"])


def test_convert_keeps_working():
    params = _model_params()
    opt = popt.AdamW8bit(params)
    assert popt.convert(opt) is opt
    torch_opt = torch.optim.AdamW(params)
    converted = popt.convert(torch_opt)
    assert type(converted) is popt.AdamW and "state_dtype" not in converted.param_groups[0]


def test_small_tensors_and_1_element_keep_float32():
    p_small = torch.randn(4095, requires_grad=True)
    p_one = torch.randn(1, requires_grad=True)
    p_big = torch.randn(4096, requires_grad=True)
    opt = popt.Adam8bit([p_small, p_one, p_big])
    for p in (p_small, p_one, p_big):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p_small]["exp_avg"].dtype == torch.float32
    assert opt.state[p_one]["exp_avg"].dtype == torch.float32
    assert opt.state[p_big]["exp_avg"].dtype == torch.uint8
    assert opt.state[p_big]["exp_avg_absmax"].shape == (16,)


def test_bf16_amsgrad():
    """bfloat16 states take amsgrad (max_exp_avg_sq in bfloat16 too); the kernel and torch-ops paths agree."""
    a, oa = _train(popt.Adam, 4, state_dtype=torch.bfloat16, amsgrad=True)
    b, _ = _train(popt.Adam, 4, backend="torch", state_dtype=torch.bfloat16, amsgrad=True)
    assert oa.state[a[0]]["max_exp_avg_sq"].dtype == torch.bfloat16
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_grad_scaler_found_inf_skips_quantized():
    params = _model_params()
    opt = popt.Adam8bit(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    p0 = params[0].detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(params[0], p0)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, before[k]), k


def _codes_of(y_blocks):
    """The kernel's codes for chosen normalized states: with beta1 = 0 (or beta2 = 0) and a zero state,
    the new exp_avg is the gradient itself (exp_avg_sq its square), and a 1.0 in each block makes its
    absmax 1, so y = state exactly."""
    g = y_blocks.reshape(-1).clone()
    n = g.numel()
    p = torch.zeros(n)
    mc, vc = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    ma, va = torch.zeros(n // 256), torch.zeros(n // 256)
    PRIMITIVES["native"]["adam_step_8bit_"](
        [p], [g], [mc], [vc], [ma], [va], [torch.tensor(0.0)], QS, QU, 256, torch.tensor(0.0, dtype=torch.float64),
        0.0, 0.0, 0.0, 1e-8, False, False, None, None,
    )  # fmt: skip
    return mc, vc, ma, va


def test_codes_are_the_nearest_map_values_at_every_boundary():
    """Every midpoint of both maps, a few units in the last place either side and exactly on it, and
    values across all magnitudes, both signs: the kernel's code is the count of the map's float32
    midpoints below y (the nearest value, ties to the lower), on the vector path (whole blocks) and the
    scalar tail alike. exp_avg_sq's y is the square of the gradient, rounded."""
    for qmap, signed in ((QS, True), (QU, False)):
        mids = (qmap[:-1] + qmap[1:]) * 0.5
        around = [mids]
        up, down = mids.clone(), mids.clone()
        for _ in range(3):
            up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
            around += [up, down]
        y = torch.cat(around + [torch.logspace(-12, 0, 5000), qmap, torch.zeros(3)])
        y = y[(y.abs() <= 1)]
        if signed:
            y = torch.cat([y, -y])
        else:
            y = y[y >= 0]
        # blocks of 255 values and a 1.0 (the absmax)
        blocks = torch.nn.functional.pad(y, (0, (-y.numel()) % 255)).view(-1, 255)
        blocks = torch.cat([blocks, torch.ones(blocks.shape[0], 1)], 1)
        if signed:
            mc, _, ma, _ = _codes_of(blocks)
            assert (ma == 1).all()
            want = torch.bucketize(blocks.reshape(-1), mids)
            assert torch.equal(mc.long(), want)
        else:  # y = g * g: choose g = sqrt(y), compare with the rounded square
            g = blocks.sqrt()
            _, vc, _, va = _codes_of(g)
            sq = g.reshape(-1) * g.reshape(-1)
            want = torch.bucketize(sq / va.repeat_interleave(256), mids)
            assert torch.equal(vc.long(), want)


@pytest.mark.parametrize("state_dtype", ["8bit", torch.bfloat16], ids=["8bit", "bf16"])
def test_grad_scale_unscales_and_paths_agree(state_dtype):
    """grad_scale (found_inf 0): the gradients are written back unscaled and the step is the unscaled
    one, on the kernel and the torch-ops paths alike."""
    results = []
    for backend in ("native", "torch"):
        params = _model_params()
        opt = popt.Adam(params, lr=1e-2, state_dtype=state_dtype)
        gen = torch.Generator().manual_seed(5)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = (g * 8).to(memory_format=torch.contiguous_format)
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
        with pyops.backend(backend):
            opt.step()
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_parameter_listed_twice_steps_twice():
    """A parameter listed twice steps twice, as torch's (two rounds, not one call that races)."""
    p = torch.randn(5000, requires_grad=True)
    q8 = torch.nn.Parameter(p.detach().clone())
    ours = popt.Adam8bit([p, p], lr=1e-2)
    once = popt.Adam8bit([q8], lr=1e-2)
    g = torch.randn(5000)
    p.grad, q8.grad = g.clone(), g.clone()
    ours.step()
    once.step()
    once.step()
    torch.testing.assert_close(p, q8, rtol=0, atol=0)
    assert float(ours.state[p]["step"]) == 2


def test_bench_rows():
    """bench/optim.py times the 8-bit and bfloat16 rows beside Adam's and AdamW's float32 ones (not in
    the fixed-cost sets), each row stepping its own state_dtype."""
    from bench import optim as bench_optim

    cases = [c for c in bench_optim.cases("cpu", quick=True) if c.op in ("Adam", "AdamW") and c.mode == "step"]
    big = [c for c in cases if not c.shape[0].startswith("overhead")]
    assert big and all([v[:2] for v in c.variants] == [("8bit", "pyops_8bit"), ("bf16", "pyops_bf16")] for c in big)
    assert all(c.variants is None for c in cases if c.shape[0].startswith("overhead"))
    params = [torch.randn(5000, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    for impl in ("pyops_8bit", "pyops_bf16"):
        ps = [p.detach().clone().requires_grad_() for p in params]
        for p, p0 in zip(ps, params):
            p.grad = p0.grad.clone()
        big[0].iteration(impl)(ps)
        assert not torch.equal(ps[0], params[0])


@pytest.mark.parametrize("state_dtype", ["8bit", torch.bfloat16], ids=["8bit", "bf16"])
def test_step_in_backward_with_quantized_states(state_dtype):
    """pyops.optim.step_in_backward steps quantized states too, bitwise as optimizer.step() after
    backward does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
    twin = copy.deepcopy(model)
    a = popt.AdamW(model.parameters(), lr=1e-2, state_dtype=state_dtype)
    b = popt.AdamW(twin.parameters(), lr=1e-2, state_dtype=state_dtype)
    handle = popt.step_in_backward(a)
    for _ in range(3):
        x = torch.randn(16, 64)
        model(x).square().mean().backward()
        twin(x).square().mean().backward()
        b.step()
        b.zero_grad()
    handle.remove()
    for p, q_ in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q_)
    assert q.kind_of(a.state[model[0].weight], model[0].weight) == ("8bit" if state_dtype == "8bit" else "bf16")


def test_8bit_refuses_bf16_stochastic_round():
    p = torch.randn(5000, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pyops.optim.AdamW8bit: bf16_stochastic_round=True is not supported with 8-bit states (state_dtype='8bit')"
        ),
    ):
        popt.AdamW8bit([p], bf16_stochastic_round=True)


@pytest.mark.parametrize("n", [4096, 4100])  # whole blocks (vector path), and a tail
def test_nan_poisons_only_its_block(n):
    """A NaN in either state (here: a NaN exp_avg absmax, a NaN gradient) makes both absmaxs of its block
    NaN (every device's kernel and the torch-ops path alike); other blocks stay finite."""
    gen = torch.Generator().manual_seed(6)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1
    mc, vc, ma, va = _random_state(n, gen)
    ma[1] = float("nan")
    g[5] = float("nan")
    args = [[p.clone()], [g.clone()], [mc.clone()], [vc.clone()], [ma.clone()], [va.clone()], [torch.tensor(1.0)]]
    PRIMITIVES["native"]["adam_step_8bit_"](
        *args, QS, QU, 256, torch.tensor(1e-3), 0.9, 0.999, 0.0, 1e-8, False, False, None, None
    )
    mas, vas = args[4][0], args[5][0]
    assert mas[:2].isnan().all() and vas[:2].isnan().all()
    assert not mas[2:].isnan().any() and not vas[2:].isnan().any()
    # the torch-ops path: the same blocks
    opt = popt.Adam8bit([torch.nn.Parameter(p.clone())], lr=1e-3)
    param = opt.param_groups[0]["params"][0]
    param.grad = g.clone()
    opt.step()  # creates the state and steps once
    state = opt.state[param]
    state["exp_avg_absmax"][1] = float("nan")
    param.grad = g.clone()
    with pyops.backend("torch"):
        opt.step()
    ma2, va2 = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
    assert ma2[:2].isnan().all() and va2[:2].isnan().all() and not ma2[2:].isnan().any()

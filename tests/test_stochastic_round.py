"""bf16_stochastic_round: bfloat16 parameters stored rounded stochastically by the optimizers' kernels.
Unbiased (the mean of many roundings within a binomial bound of the exact value), each result one of
the two bfloat16 neighbours, reproducible from torch.manual_seed and independent of the thread count,
unchanged behaviour without the flag, and a bfloat16 training run whose updates are below half an ulp
moves with the flag and stalls without it. Native (CPU here; CUDA marked) and Triton (interpreted here)
kernels hash alike."""

import math

import pytest
import torch
from test_optim import _opcheck_args

import pyops
import pyops.optim as popt
from pyops.ops import PRIMITIVES

ULP_AT_ONE = 2.0**-7  # bfloat16's spacing in [1, 2)
FLOAT_ULP_AT_ONE = 2.0**-23
SIGMAS = 5  # the bound: a wrong mean fails; a right one passes but for a ~1e-6 chance (fixed seeds anyway)
NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"]


def _sgd_once(p, delta, seed, stochastic=True):
    """p += delta (a float, exact in float32 after the add) with one SGD primitive call: lr = delta,
    gradient 1, maximize."""
    grads = [torch.ones_like(x) for x in p]
    PRIMITIVES["native"]["sgd_step_"](
        p,
        grads,
        [],
        torch.tensor(delta, dtype=torch.float64),
        0.0,
        0.0,
        0.0,
        False,
        True,
        [],
        None,
        None,
        stochastic,
        seed,
    )


@pytest.mark.parametrize("fraction", [1 / 65536, 0.3, 0.5, 0.77, 65535 / 65536])
@pytest.mark.parametrize("sign", [1, -1])
def test_unbiased_within_the_binomial_bound(fraction, sign):
    """1 + f ulp (float32, exact) rounds to 1 + ulp with probability f: over n roundings (elements of
    several tensors, several seeds) the count of round-ups is Binomial(n, f)."""
    low = round(fraction * 65536)  # the float32 bits below bfloat16's mantissa
    delta = sign * low * FLOAT_ULP_AT_ONE
    start = sign * 1.0
    tensors, seeds = 4, 4
    ups = n = 0
    for seed in range(seeds):
        p = [torch.full((8192,), start, dtype=torch.bfloat16) for _ in range(tensors)]
        _sgd_once(p, delta, seed * 7919 + 1)
        for t in p:
            t = t.double()
            up = t == start + sign * ULP_AT_ONE
            assert bool(((t == start) | up).all()), "only the two bfloat16 neighbours"
            ups += int(up.sum())
            n += t.numel()
    f = low / 65536
    bound = SIGMAS * math.sqrt(n * f * (1 - f))
    assert abs(ups - n * f) <= bound, (ups, n * f, bound)


def test_mean_over_seeds_of_one_element_is_the_exact_value():
    """The same element rounded by many steps (a new seed each): its mean converges to the value."""
    f = 0.2
    low = round(f * 65536)
    n = 4096
    ups = 0
    torch.manual_seed(3)
    for _ in range(n):
        p = [torch.ones(3, dtype=torch.bfloat16)]
        _sgd_once(p, low * FLOAT_ULP_AT_ONE, int(torch.randint(0, 2**62, ())))
        ups += int(p[0][1] != 1)
    f = low / 65536
    assert abs(ups - n * f) <= SIGMAS * math.sqrt(n * f * (1 - f))


def test_exact_values_inf_and_nan():
    p = [torch.tensor([1.0, 3.0, float("inf"), float("-inf"), float("nan"), 0.0, -2.5], dtype=torch.bfloat16)]
    before = p[0].clone()
    _sgd_once(p, 0.0, 123)  # p + 0: representable values stay exactly, inf stays inf, NaN stays NaN
    assert torch.equal(p[0][:4], before[:4]) and torch.isnan(p[0][4]) and torch.equal(p[0][5:], before[5:])


def test_largest_finite_rounds_up_to_inf_as_often_as_it_lies_above():
    big = torch.finfo(torch.bfloat16).max  # 0x7f7f; + 0.5 ulp lies halfway to the next pattern, inf
    half = 2.0 ** (127 - 7 - 1)
    p = [torch.full((20000,), big, dtype=torch.bfloat16)]
    _sgd_once(p, half, 99)
    ups = int(torch.isinf(p[0]).sum())
    assert bool((torch.isinf(p[0]) | (p[0] == big)).all())
    assert abs(ups - 10000) <= SIGMAS * math.sqrt(20000 * 0.25)


def test_reproducible_and_independent_of_threads():
    """The bits hash (seed, tensor, element): one seed gives one result, whatever the thread count
    (the group is large enough for the parallel loop: several 64K-element chunks)."""
    x = torch.randn(300_000).bfloat16()
    g = torch.randn(300_000).bfloat16()
    threads = torch.get_num_threads()

    def step(seed, nthreads):
        torch.set_num_threads(nthreads)
        p = x.clone().requires_grad_()
        p.grad = g.clone()
        opt = popt.Adam([p], lr=1e-3, bf16_stochastic_round=True)
        torch.manual_seed(seed)
        opt.step()
        opt.step()
        return p.detach()

    try:
        a, b, c = step(0, 1), step(0, max(2, threads)), step(1, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _nearest_reference(p, g, lr):
    return (p.float() - lr * g.float()).bfloat16()


@pytest.mark.parametrize("name", NAMES)
def test_flag_off_and_other_dtypes_unchanged(name):
    torch.manual_seed(0)
    for dtype, flag in ((torch.bfloat16, False), (torch.float32, True), (torch.float16, True)):
        x, g = torch.randn(1000).to(dtype), torch.randn(1000).to(dtype)
        results = []
        for kwargs in ({}, {"bf16_stochastic_round": flag}):
            p = x.clone().requires_grad_()
            p.grad = g.clone()
            opt = getattr(popt, name)([p], lr=1e-2, **kwargs)
            opt.step()
            results.append(p.detach())
        assert torch.equal(results[0], results[1]), dtype
    # and SGD without the flag rounds to nearest, as torch's conversion does
    x, g = torch.randn(1000).bfloat16(), torch.randn(1000).bfloat16()
    p = x.clone().requires_grad_()
    p.grad = g.clone()
    popt.SGD([p], lr=1e-2).step()
    assert torch.equal(p.detach(), _nearest_reference(x, g, 1e-2))


# lr per optimizer so that every update lies below half an ulp of the parameter (|p| in [1, 2): half
# an ulp is 2^-8 ~ 3.9e-3): SGD's is lr |g| = 1e-3, Adam(W)'s and Adagrad's at most ~lr, RMSprop's
# first at most lr / sqrt(1 - alpha) = 10 lr = 2e-3.
STALL_LR = {"SGD": 2e-3, "Adam": 1e-3, "AdamW": 1e-3, "Adagrad": 1e-3, "RMSprop": 2e-4}


def _train(name, dtype, flag, steps=100, n=4096):
    """Pull every element of w (from 1) towards 1.5: loss = sum (w - 1.5)^2 / 2."""
    torch.manual_seed(0)
    w = torch.ones(n, dtype=dtype, requires_grad=True)
    extra = {"bf16_stochastic_round": True} if flag else {}
    opt = getattr(popt, name)([w], lr=STALL_LR[name], **extra)
    for _ in range(steps):
        opt.zero_grad()
        ((w.float() - 1.5) ** 2).sum().div(2).backward()
        opt.step()
    return w.detach().double()


@pytest.mark.parametrize("name", NAMES)
def test_updates_below_half_an_ulp_stall_without_the_flag_and_not_with_it(name):
    reference = float(_train(name, torch.float32, False).mean()) - 1  # the float32 run's distance
    stalled = _train(name, torch.bfloat16, False)
    moved = float(_train(name, torch.bfloat16, True).mean()) - 1
    assert bool((stalled == 1).all()), "round to nearest loses every update"
    assert reference > 0.01
    # Per element the rounding adds at most ulp^2 / 4 of variance a step, so the mean over n elements
    # lies within SIGMAS sigma of its expectation. That expectation is the float32 run's for SGD (its
    # update is linear in w); the other updates are not linear in the gradient, whose rounding noise
    # (relative ~1e-2 of |g| = 0.5) shifts them by a few percent at most: 5% of the distance allowed.
    sigma = math.sqrt(100 * ULP_AT_ONE**2 / 4 / 4096)
    assert abs(moved - reference) <= SIGMAS * sigma + 0.05 * reference, (moved, reference, sigma)


def test_refused_with_master_weights_and_differentiable():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="bf16_stochastic_round=True and master_weights=True exclude each other"):
        popt.Adam([p], master_weights=True, bf16_stochastic_round=True)
    with pytest.raises(ValueError, match="bf16_stochastic_round=True needs differentiable=False"):
        popt.SGD([p], differentiable=True, bf16_stochastic_round=True)


@pytest.mark.skipif("triton" not in pyops.available_backends("cpu"), reason="Triton's interpreter not enabled")
def test_triton_rounds_as_the_native_kernel():
    """The same hash in Triton (kernels/_common.py) as in C++: bitwise the native kernel's result where
    both compute the same float32 value. SGD's p - lr g with lr a power of two and bfloat16 p and g
    has an exact product, so one rounding of the difference (fused multiply-add or not) gives it.
    (bfloat16 state, as Adam's, is not compared: the interpreter's bfloat16 conversions are not the
    GPU's.)"""
    torch.manual_seed(0)
    x, g = torch.randn(3000).bfloat16(), torch.randn(3000).bfloat16()
    results = []
    for backend in ("native", "triton"):
        p = x.clone().requires_grad_()
        p.grad = g.clone()
        opt = popt.SGD([p], lr=2.0**-4, bf16_stochastic_round=True)
        torch.manual_seed(5)
        with pyops.backend(backend):
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], _nearest_reference(x, g, 2.0**-4))


@pytest.mark.skipif("triton" not in pyops.available_backends("cpu"), reason="Triton's interpreter not enabled")
def test_triton_unbiased_within_the_binomial_bound():
    f = 0.3
    low = round(f * 65536)
    p = [torch.ones(8192, dtype=torch.bfloat16) for _ in range(2)]
    grads = [torch.ones_like(t) for t in p]
    lr = torch.tensor(low * FLOAT_ULP_AT_ONE, dtype=torch.float64)
    PRIMITIVES["triton"]["sgd_step_"](p, grads, [], lr, 0.0, 0.0, 0.0, False, True, [], None, None, True, 11)
    ups = sum(int((t != 1).sum()) for t in p)
    n = sum(t.numel() for t in p)
    f = low / 65536
    assert all(bool(((t == 1) | (t.double() == 1 + ULP_AT_ONE)).all()) for t in p)
    assert abs(ups - n * f) <= SIGMAS * math.sqrt(n * f * (1 - f))


def test_survives_deepcopy_and_pickling():
    import copy
    import pickle

    opt = popt.RMSprop([torch.zeros(2, requires_grad=True)], bf16_stochastic_round=True)
    assert copy.deepcopy(opt).bf16_stochastic_round
    assert pickle.loads(pickle.dumps(opt)).bf16_stochastic_round


@pytest.mark.parametrize("name", ["sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_"])
def test_opcheck_with_the_flag(name):
    """The primitives with bfloat16 parameters, state and gradients (steps stay float32) and the flag set."""
    args = tuple(
        [t.bfloat16() for t in a] if isinstance(a, list) and a and a[0].is_floating_point() else a
        for a in _opcheck_args(name, torch.float32)
    )
    if name == "adam_step_":  # steps, lr and the grad scaler's tensors stay float32/float64
        args = args[:5] + (_opcheck_args(name, torch.float32)[5],) + args[6:]
    elif name in ("adagrad_step_", "rmsprop_step_"):
        at = 3 if name == "adagrad_step_" else 5
        args = args[:at] + (_opcheck_args(name, torch.float32)[at],) + args[at + 1 :]
    torch.library.opcheck(PRIMITIVES["native"][name], (*args, True, 12345))


@pytest.mark.cuda
def test_cuda_unbiased_reproducible_and_refused_in_graph_capture():
    """The CUDA kernel hashes as the CPU one: unbiased, one result per seed, and refused under capture
    (a replay would reuse the captured seed)."""
    f = 0.3
    low = round(f * 65536)
    p = [torch.ones(1 << 20, dtype=torch.bfloat16, device="cuda")]
    grads = [torch.ones_like(p[0])]
    lr = torch.tensor(low * FLOAT_ULP_AT_ONE, dtype=torch.float64, device="cuda")
    step = PRIMITIVES["native"]["sgd_step_"]
    step(p, grads, [], lr, 0.0, 0.0, 0.0, False, True, [], None, None, True, 7)
    n, ups = p[0].numel(), int((p[0] != 1).sum())
    f = low / 65536
    assert bool(((p[0] == 1) | (p[0].double() == 1 + ULP_AT_ONE)).all())
    assert abs(ups - n * f) <= SIGMAS * math.sqrt(n * f * (1 - f))
    q = [torch.ones_like(p[0])]
    step(q, grads, [], lr, 0.0, 0.0, 0.0, False, True, [], None, None, True, 7)
    r = [torch.ones_like(p[0])]
    step(r, grads, [], lr, 0.0, 0.0, 0.0, False, True, [], None, None, True, 8)
    assert torch.equal(p[0], q[0]) and not torch.equal(p[0], r[0])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="bf16_stochastic_round=True cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            step(q, grads, [], lr, 0.0, 0.0, 0.0, False, True, [], None, None, True, 7)

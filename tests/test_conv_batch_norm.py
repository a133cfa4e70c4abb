"""A convolution followed by a batch norm in training: the convolution's epilogue gathers the output's
batch statistics (pyops::conv2d_fwd_stats, pyops.functional.conv2d_stats) and the batch norm uses them
(pyops.functional.batch_norm_given_stats) instead of its own pass; pyops.convert links the two in a
Sequential. Checked against the float64 torch oracle: the statistics of every CPU engine, the result and
every gradient of the pair, the running statistics, the modules and the models."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import pyops
import pyops.functional as PF
import pyops.models
from oracle import assert_close
from pyops.ops import PRIMITIVES

# (input shape, weight shape, keywords, layout): one case per CPU engine and path
ENGINES = {
    "direct dw3": ((2, 4, 9, 11), (4, 1, 3, 3), {"padding": 1, "groups": 4}, torch.contiguous_format),
    "direct grouped blocked": ((2, 8, 7, 9), (16, 2, 3, 3), {"padding": 1, "groups": 4}, torch.contiguous_format),
    "direct strided": ((3, 4, 9, 8), (6, 2, 3, 3), {"stride": 2, "padding": 1, "groups": 2}, torch.contiguous_format),
    "depthwise channels_last": ((2, 20, 7, 6), (20, 1, 3, 3), {"padding": 1, "groups": 20}, torch.channels_last),
    "depthwise channels_last strided": ((2, 9, 8, 7), (9, 1, 3, 3), {"stride": 2, "groups": 9}, torch.channels_last),
    "im2col gemm": ((2, 32, 6, 5), (8, 32, 3, 3), {"padding": 1}, torch.contiguous_format),
    "direct channels_last grouped": ((2, 8, 6, 6), (8, 2, 1, 1), {"groups": 4}, torch.channels_last),
}


def _geometry(kw):
    pair = lambda v: [v, v]  # noqa: E731
    return pair(kw.get("stride", 1)), pair(kw.get("padding", 0)), pair(kw.get("dilation", 1)), kw.get("groups", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(ENGINES))
def test_fwd_stats_is_the_forward_and_its_moments(case, dtype):
    """conv2d_fwd_stats's output is conv2d_fwd's (the same kernel, bit for bit), its statistics the
    float64 mean and biased variance of that output."""
    xs, ws, kw, fmt = ENGINES[case]
    torch.manual_seed(0)
    x = (torch.randn(xs) + 3).to(dtype).contiguous(memory_format=fmt)  # an offset mean: M2 must not cancel
    w = torch.randn(ws).to(dtype)
    b = torch.randn(ws[0]).to(dtype)
    geo = _geometry(kw)
    P = PRIMITIVES["native"]
    out, mean, var = P["conv2d_fwd_stats"](x, w, b, *geo)
    ref, _ = P["conv2d_fwd"](x, w, b, *geo, 0, 0.0)
    assert out.stride() == ref.stride()
    assert torch.equal(out, ref)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    o = out.double()
    want_var, want_mean = torch.var_mean(o, dim=(0, 2, 3), correction=0)
    # float32 arithmetic over at most a few hundred values per partial: a few ulps of float32
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(mean.double(), want_mean, **tol)
    torch.testing.assert_close(var.double(), want_var, **tol)


def test_stats_do_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    cases = [ENGINES["direct dw3"], ENGINES["depthwise channels_last"], ENGINES["im2col gemm"]]
    threads = torch.get_num_threads()
    try:
        for xs, ws, kw, fmt in cases:
            x = torch.randn(xs).contiguous(memory_format=fmt)
            w = torch.randn(ws)
            results = []
            for n in (1, max(2, threads)):
                torch.set_num_threads(n)
                results.append(PRIMITIVES["native"]["conv2d_fwd_stats"](x, w, None, *_geometry(kw)))
            assert all(torch.equal(a, b) for a, b in zip(*results))
    finally:
        torch.set_num_threads(threads)


def test_fwd_stats_of_an_empty_sum_and_an_empty_output():
    P = PRIMITIVES["native"]
    x = torch.randn(2, 0, 5, 5)
    w = torch.randn(3, 0, 3, 3)
    b = torch.tensor([1.0, -2.0, 0.5])
    out, mean, var = P["conv2d_fwd_stats"](x, w, b, [1, 1], [1, 1], [1, 1], 1)
    assert torch.equal(out, b.view(1, 3, 1, 1).expand(2, 3, 5, 5))
    assert torch.equal(mean, b) and torch.equal(var, torch.zeros(3))
    out, mean, var = P["conv2d_fwd_stats"](torch.randn(0, 2, 5, 5), torch.randn(3, 2, 3, 3), None, *_geometry({}))
    assert out.shape == (0, 3, 3, 3) and mean.isnan().all() and var.isnan().all()


def _pair_oracle(x, w, b, kw, bn_w, bn_b, rm, rv, momentum, eps, act, residual=None):
    y = TF.conv2d(x, w, b, **kw)
    z = TF.batch_norm(y, rm, rv, bn_w, bn_b, True, momentum, eps)
    if residual is not None:
        z = z + residual
    return {None: z, "relu": torch.relu(z), "elu": TF.elu(z)}[act]


@pytest.mark.parametrize("act", [None, "relu", "elu"])
@pytest.mark.parametrize("case", ["direct dw3", "depthwise channels_last", "im2col gemm", "direct strided"])
def test_the_pair_matches_conv_then_batch_norm(case, act):
    """conv2d_stats -> batch_norm_given_stats: the output, every gradient and the running statistics of
    torch's conv2d -> batch_norm in float64."""
    xs, ws, kw, fmt = ENGINES[case]
    torch.manual_seed(2)
    x = torch.randn(xs).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(ws, requires_grad=True)
    b = torch.randn(ws[0], requires_grad=True)
    bn_w = torch.rand(ws[0]).add_(0.5).requires_grad_()
    bn_b = torch.randn(ws[0], requires_grad=True)
    rm, rv = torch.randn(ws[0]), torch.rand(ws[0]) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    with pyops.backend("native"):
        y, mean, var = PF.conv2d_stats(x, w, b, **kw)
        assert mean.numel() == ws[0]
        out = PF.batch_norm_given_stats(y, mean, var, rm, rv, bn_w, bn_b, 0.1, 1e-5, activation=act)
    leaves = [x, w, b, bn_w, bn_b]
    d = [t.detach().double().requires_grad_() for t in leaves]
    want = _pair_oracle(d[0], d[1], d[2], kw, d[3], d[4], rm64, rv64, 0.1, 1e-5, act)
    assert_close(out, want, torch.float32, reduced=ws[1] * ws[2] * ws[3])
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, leaves, g.float())
    expect = torch.autograd.grad(want, d, g)
    # every gradient sums over the batch and the output plane (and the taps): the reduction's length
    reduced = xs[0] * xs[2] * xs[3] * ws[1] * ws[2] * ws[3]
    for name, a, e in zip(("x", "w", "b", "bn_w", "bn_b"), got, expect):
        assert_close(a, e, torch.float32, what=name, reduced=reduced)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-6)


def test_gradcheck_through_the_given_statistics():
    """float64: the batch norm's derivative runs through the statistics the convolution gave."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bn_w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(x, w, bn_w, r):
        y, mean, var = PF.conv2d_stats(x, w, None, padding=1, groups=4)
        return PF.batch_norm_given_stats(y, mean, var, None, None, bn_w, None, activation="elu", residual=r)

    with pyops.backend("native"):
        assert torch.autograd.gradcheck(f, (x, w, bn_w, r))
        assert torch.autograd.gradgradcheck(f, (x, w, bn_w, r))


def test_torch_backend_gives_no_statistics_and_the_batch_norm_computes_them():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with pyops.backend("torch"):
        y, mean, var = PF.conv2d_stats(x, w, None, padding=1, groups=4)
        assert mean.numel() == 0 and var.numel() == 0
        out = PF.batch_norm_given_stats(y, mean, var, None, None)
    assert_close(out, TF.batch_norm(TF.conv2d(x, w, padding=1, groups=4), None, None, training=True), torch.float32)


def test_bad_statistics_are_refused():
    y = torch.randn(2, 4, 5, 5)
    with pyops.backend("native"):
        with pytest.raises(
            ValueError, match=r"pyops.batch_norm: batch_mean must be a 1-d Float tensor of the input's 4"
        ):
            PF.batch_norm_given_stats(y, torch.zeros(3), torch.ones(4), None, None)
        with pytest.raises(ValueError, match=r"pyops.batch_norm: batch_var must be a 1-d Float tensor"):
            PF.batch_norm_given_stats(y, torch.zeros(4), torch.ones(4, dtype=torch.float64), None, None)


def _seq(L, groups=4):
    return nn.Sequential(
        L.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False), L.BatchNorm2d(8), L.ReLU(), L.Conv2d(8, 4, 1)
    )


def test_convert_links_conv_to_batch_norm_and_trains_as_torch():
    torch.manual_seed(4)
    ref = _seq(nn)
    model = pyops.convert(ref)
    assert model[0].__dict__.get("_batch_norm") is model[1]
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 8, 7, 7)
    ref64 = _seq(nn).double()
    ref64.load_state_dict(ref.state_dict())
    for _ in range(2):  # twice: the running statistics move as torch's
        with pyops.backend("native"):
            out = model(x)
        want = ref64(x.double())
        assert_close(out, want, torch.float32, reduced=72)
        g = torch.randn_like(want)
        out.backward(g.float())
        want.backward(g)
    for (name, p), p64 in zip(model.named_parameters(), ref64.parameters()):
        assert_close(p.grad, p64.grad, torch.float32, what=name, reduced=4 * 49 * 8 * 9)
    for b, b64 in zip(model.buffers(), ref64.buffers()):
        torch.testing.assert_close(b.to(b64.dtype), b64, rtol=1e-5, atol=1e-6)
    model.eval()
    ref64.eval()
    assert_close(model(x), ref64(x.double()), torch.float32, reduced=72)


def test_linked_batch_norm_on_another_tensor_computes_its_own():
    """The batch norm uses the given statistics only for the linked convolution's very output."""
    torch.manual_seed(5)
    model = pyops.convert(_seq(nn))
    conv, bn = model[0], model[1]
    x = torch.randn(2, 8, 6, 6)
    with pyops.backend("native"):
        y = conv(x)
        out = bn(y * 2)  # not the convolution's output
        want = TF.batch_norm(y.detach().double() * 2, None, None, bn.weight.double(), bn.bias.double(), True)
    assert_close(out, torch.relu(want), torch.float32)
    assert bn.__dict__.get("_given_stats") is None


def test_fused_residual_block_of_the_models():
    """ResNeXt's pyops block calls its last batch norm with the shortcut: the given statistics serve there
    too, and the model matches the torch model's output and gradients."""
    torch.manual_seed(6)
    kw = {"input_shape": (3, 8, 8), "stem": 8, "cardinality": 4, "stages": ((16, 8, 1), (16, 16, 2))}
    ours, theirs = pyops.models.pair("resnext", **kw)
    linked = [m for m in ours.modules() if m.__dict__.get("_batch_norm") is not None]
    assert linked
    theirs = theirs.double()
    x = torch.randn(4, 3, 8, 8)
    with pyops.backend("native"):
        out = ours(x)
    want = theirs(x.double())
    assert_close(out, want, torch.float32, reduced=512)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, what=name, reduced=4 * 64 * 64 * 9)


def test_torch_compile_fullgraph_of_a_linked_pair():
    torch.manual_seed(7)
    model = pyops.convert(_seq(nn))
    x = torch.randn(2, 8, 6, 6)
    with pyops.backend("native"):
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(x)
    assert_close(got, want.double(), torch.float32)


def test_autocast_casts_the_linked_convolution_as_the_plain_one():
    torch.manual_seed(8)
    model = pyops.convert(_seq(nn))
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), pyops.backend("native"):
        y, mean, var = PF.conv2d_stats(x, model[0].weight, None, padding=1, groups=4)
        assert y.dtype == PF.conv2d(x, model[0].weight, None, padding=1, groups=4).dtype == torch.bfloat16
        assert mean.dtype == torch.float32
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert_close(mean, torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)[1], torch.float32, reduced=72)


@pytest.mark.parametrize("case", ["direct dw3", "depthwise channels_last", "im2col gemm", "direct strided"])
def test_non_finite_outputs_give_batch_norms_statistics(case):
    """inf, -inf and NaN in the output: the gathered mean and variance are batch_norm_stats's (inf, -inf or
    NaN as a sum gives the mean; NaN variance), so the running statistics move as without the link."""
    xs, ws, kw, fmt = ENGINES[case]
    torch.manual_seed(9)
    x = torch.randn(xs)
    x[0, 0, 1, 1], x[-1, 1, 2, 2], x[0, 2, 0, 0], x[-1, 2, 0, 0] = (
        float("inf"),
        float("-inf"),
        float("inf"),
        float("nan"),
    )
    x = x.contiguous(memory_format=fmt)
    w = torch.rand(ws) + 0.1  # positive: an infinity keeps its sign through the sum
    P = PRIMITIVES["native"]
    out, mean, var = P["conv2d_fwd_stats"](x, w, None, *_geometry(kw))
    want_mean, want_var = P["batch_norm_stats"](out)
    assert torch.equal(mean.isnan(), want_mean.isnan()) and torch.equal(var.isnan(), want_var.isnan())
    fin = want_mean.isfinite()
    assert torch.equal(mean[~fin & ~mean.isnan()], want_mean[~fin & ~want_mean.isnan()])
    torch.testing.assert_close(mean[fin], want_mean[fin], rtol=1e-5, atol=1e-5)
    assert not fin.all()  # the case reaches the non-finite path

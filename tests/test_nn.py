"""pyops.nn modules, pyops.convert, and torch.compile over a model of pyops modules."""

import pytest
import torch
from torch import nn

import pyops
import pyops.nn as pnn
from oracle import assert_close, device_backends
from pyops.ops.activation import maxout_reference

MODULES = [
    (pnn.ReLU, nn.ReLU, [(), (True,)]),
    (pnn.LeakyReLU, nn.LeakyReLU, [(), (0.2,), (0.2, True)]),
    (pnn.ELU, nn.ELU, [(), (0.5,), (0.5, True)]),
    (pnn.Sigmoid, nn.Sigmoid, [()]),
    (pnn.Tanh, nn.Tanh, [()]),
]


@pytest.mark.parametrize("ours,theirs,arglists", MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_modules_are_drop_ins(ours, theirs, arglists):
    for args in arglists:
        m, t = ours(*args), theirs(*args)
        assert isinstance(m, theirs)
        assert repr(m) == repr(t)
        x = torch.randn(4, 9, dtype=torch.float64)
        assert_close(m(x.clone()), t(x.clone()), torch.float64)
        assert m.state_dict().keys() == t.state_dict().keys()


def test_keyword_arguments_match_torch():
    assert pnn.LeakyReLU(negative_slope=0.3, inplace=True).negative_slope == 0.3
    assert pnn.ELU(alpha=2.0, inplace=False).alpha == 2.0
    assert pnn.ReLU(inplace=True).inplace


@pytest.mark.parametrize("device,backend", device_backends())
def test_maxout_unit(device, backend):
    """y_j = max_k (w_{j,k}^T x + b_{j,k}) with w_{j,k} in row j * pieces + k."""
    m = pnn.Maxout(5, 3, 4, dtype=torch.float64, device=device)
    assert repr(m) == "Maxout(in_features=5, out_features=3, pieces=4, bias=True)"
    assert m.weight.shape == (12, 5) and m.bias.shape == (12,)
    x = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    with pyops.backend(backend):
        y = m(x)
    expected = torch.stack(
        [torch.stack([x @ m.weight[j * 4 + k] + m.bias[j * 4 + k] for k in range(4)]).max(0).values for j in range(3)],
        dim=1,
    )
    assert_close(y, expected.detach(), torch.float64)
    y.sum().backward()
    assert m.weight.grad is not None and x.grad is not None
    with pyops.backend(backend):
        assert torch.autograd.gradcheck(lambda t: m(t), (x.detach().requires_grad_(),))


def test_maxout_unit_without_bias_and_bad_arguments():
    m = pnn.Maxout(4, 2, 3, bias=False)
    assert m.bias is None and "bias=False" in repr(m)
    assert m(torch.randn(2, 4)).shape == (2, 2)
    with pytest.raises(ValueError, match="pyops.nn.Maxout: pieces must be a positive int"):
        pnn.Maxout(4, 2, 0)
    with pytest.raises(ValueError, match="pyops.nn.Maxout: pieces must be at most 256"):
        pnn.Maxout(4, 2, 300)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.LeakyReLU(0.1),
        nn.Linear(32, 32),
        nn.ELU(),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.Sigmoid(),
    )


def test_convert_swaps_modules_and_keeps_results():
    ref = _model().double()
    ours = pyops.convert(_model().double())
    kinds = [type(m) for m in ours]
    assert pnn.ReLU in kinds and pnn.LeakyReLU in kinds and pnn.ELU in kinds and pnn.Tanh in kinds
    assert ours[3].negative_slope == 0.1
    x = torch.randn(5, 16, dtype=torch.float64)
    assert_close(ours(x), ref(x).detach(), torch.float64)
    ours.load_state_dict(ref.state_dict())  # the parameters are the torch model's


@pytest.mark.parametrize("backend", [b for b in pyops.available_backends("cpu") if b != "torch"])
def test_torch_compile_fullgraph(backend):
    """A model of pyops modules compiles with no graph break and matches eager, gradients included."""
    model = pyops.convert(_model())
    model.append(pnn.Maxout(8, 2, 4))
    x = torch.randn(6, 16)
    with pyops.backend(backend):
        eager = model(x)
        eager.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-6)


def test_training_matches_torch():
    """The same model trained with torch and with pyops modules: losses match step by step."""
    torch.manual_seed(0)
    ref = _model()
    ours = pyops.convert(_model())
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    data = [(torch.randn(32, 16), torch.rand(32, 8)) for _ in range(10)]
    for x, target in data:
        losses = []
        for model, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-6 * max(1.0, abs(losses[0]))


def test_maxout_reference_matches_definition():
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(maxout_reference(x, 3, 1), torch.tensor([[2.0, 5.0], [8.0, 11.0]]))


@pytest.mark.parametrize("module", [pyops.functional, pnn], ids=lambda m: m.__name__)
def test_all_lists_every_public_callable(module):
    """`from pyops.functional import *` (or pyops.nn's) gets every public function or class, and every
    name __all__ lists exists."""
    import types

    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and callable(value) and not isinstance(value, types.ModuleType)
    }
    assert public == set(module.__all__)
    assert len(module.__all__) == len(set(module.__all__))
    assert all(callable(getattr(module, name)) for name in module.__all__)

"""Whole models: the lectures' networks built from pyops and from torch, trained side by side on the
digits; convert() of torch-built models; pyops.optim.convert; the demo's other jobs; distributed
training on two processes."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import pyops
import pyops.nn as pnn
from pyops import data as pdata
from pyops import demo
from pyops import models as pmodels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = list(pmodels.MODELS)


@pytest.fixture(scope="module")
def digits():
    return pdata.split()


def _steps(model, side, split, steps, dtype, batch=64):
    """Losses of `steps` Adam steps of model on the first batches of the digits, in dtype."""
    model = model.to(dtype)
    opt = demo._optimizer(side, model.parameters(), 1e-3)
    loss_fn = demo._loss(side)
    batches = pdata.batches(len(split.y_train), batch, 0)[:steps]
    losses = []
    for idx in batches:
        opt.zero_grad()
        loss = loss_fn(model(split.x_train[idx].to(dtype)), split.y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name", MODELS)
def test_both_libs_build_the_same_network(name):
    ours, theirs = pmodels.pair(name)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    kinds = {type(m) for m in ours.modules()}
    assert not kinds & {nn.ReLU, nn.Conv2d, nn.BatchNorm2d}, kinds  # pyops' modules, not torch's
    assert not {type(m) for m in theirs.modules()} & {pnn.ReLU, pnn.Maxout}
    assert ours(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 32, 32)])
def test_models_build_for_digits_and_cifar_sizes(name, input_shape):
    """Every network takes input_shape (C, H, W): the digits' 1x8x8 and CIFAR's 3x32x32, from both libs,
    forward and backward."""
    x = torch.randn(2, *input_shape)
    for model in pmodels.pair(name, input_shape=input_shape):
        out = model(x)
        assert out.shape == (2, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def _cnn_cifar_steps(x, y, compiled, steps=3):
    """Losses and final parameters of `steps` training steps of the pyops CNN on CIFAR-sized x."""
    from pyops import optim as popt

    model = pmodels.build("cnn", input_shape=tuple(x.shape[1:])).double()
    opt = popt.Adam(model.parameters(), lr=1e-3)
    loss_fn = pmodels.loss_module("pyops")

    def loss(x, y):
        return loss_fn(model(x), y)

    if compiled:
        torch._dynamo.reset()
        loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(x, y)
        value.backward()
        opt.step()
        losses.append(value.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def test_compile_fullgraph_training_step():
    """torch.compile(fullgraph=True) of a pyops model's training step, as bench/models.py times it
    (forward and loss compiled, backward through the compiled graph, pyops' Adam step): no graph break,
    and the same losses and parameters as eager after three steps."""
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    eager, eager_params = _cnn_cifar_steps(x, y, compiled=False)
    comp, comp_params = _cnn_cifar_steps(x, y, compiled=True)
    torch.testing.assert_close(comp, eager, rtol=1e-9, atol=1e-12)
    for p, q in zip(comp_params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_training_parity_float64(name, digits):
    """Same initialisation and batches, 20 steps: pyops' kernels (native backend) and torch's agree step
    by step in float64."""
    ours, theirs = pmodels.pair(name)
    with pyops.backend("native"):
        mine = _steps(ours, "pyops", digits, 20, torch.float64)
    ref = _steps(theirs, "torch", digits, 20, torch.float64)
    torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
    for (k, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=k)


@pytest.mark.parametrize("name", ["cnn", "resnext"])
def test_training_parity_float32(name, digits):
    ours, theirs = pmodels.pair(name)
    with pyops.backend("native"):
        mine = _steps(ours, "pyops", digits, 20, torch.float32)
    ref = _steps(theirs, "torch", digits, 20, torch.float32)
    torch.testing.assert_close(mine, ref, rtol=2e-3, atol=1e-4)


def test_cnn_learns_the_digits(digits):
    model = pmodels.build("cnn")
    run = demo.train(model, "pyops", digits.x_train, digits.y_train, epochs=8, progress=False)
    m = demo.metrics(run.model, digits.x_test, digits.y_test)
    assert m["accuracy"] >= 0.95, m["accuracy"]
    assert run.losses[-1] < run.losses[0] / 5


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph_matches_eager(name):
    """torch.compile(fullgraph=True) of each network of pyops modules: no graph break, forward and
    backward as in eager."""
    model = pmodels.build(name).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model.eval()  # the running statistics do not move, so both runs see the same model
    eager = model(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-9, atol=1e-12)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", [True, False])
def test_convert_of_torch_models(name, training):
    """convert() of a torch-built network: pyops modules holding the same state, batch norm (or
    convolution) fused with the activation that follows it, same outputs and gradients."""
    theirs = pmodels.build(name, "torch").double().train(training)
    ours = pyops.convert(theirs)
    assert ours is not theirs and ours.state_dict().keys() == theirs.state_dict().keys()
    kinds = [type(m) for m in ours.modules()]
    assert nn.ReLU not in kinds and nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds
    fused = [m for m in ours.modules() if getattr(m, "activation", None) is not None]
    expected = sum(
        isinstance(a, (nn.Conv2d, nn.BatchNorm2d)) and isinstance(b, nn.ReLU)
        for seq in theirs.modules()
        if isinstance(seq, nn.Sequential)
        for a, b in zip(seq, list(seq)[1:])
    )
    assert len(fused) == expected
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with pyops.backend("native"):
        y = ours(x)
        y.square().sum().backward()
    r = theirs(x)
    r.square().sum().backward()
    torch.testing.assert_close(y, r, rtol=1e-9, atol=1e-12)
    for (k, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=k)
    for (k, b), c in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=k)


def test_convert_fuses_only_what_it_may():
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda *a: None)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 1),
        hooked,
        nn.ELU(0.5),
        nn.Conv2d(4, 4, 1),
        nn.LeakyReLU(0.3),
    )
    ours = pyops.convert(model)
    assert ours[0].activation == "relu" and isinstance(ours[1], nn.Identity)
    assert ours[2].activation == "leaky_relu" and ours[2].negative_slope == 0.2 and isinstance(ours[3], nn.Identity)
    assert ours[4].activation is None and isinstance(ours[5], pnn.ReLU) and isinstance(ours[6], pnn.ELU)
    if not hasattr(ours[7], "negative_slope"):  # a convolution's epilogue has the default slope only
        assert ours[7].activation is None and isinstance(ours[8], pnn.LeakyReLU)
    plain = pyops.convert(model, fuse=False)
    assert plain[0].activation is None and isinstance(plain[1], pnn.ReLU)
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(ours(x), model(x))


def test_convert_fuses_only_modules_used_once_in_chained_sequentials():
    """A batch norm or convolution used at two places keeps its activation out of the kernel (it would
    apply at both), and a Sequential subclass with a forward of its own is not fused (its children
    need not run in order)."""
    bn, conv = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)
    shared = nn.Sequential(bn, nn.ReLU(), bn, conv, nn.ReLU(), conv)
    x = torch.randn(3, 2, 4, 4)
    ours = pyops.convert(shared)
    assert ours[0].activation is None and ours[3].activation is None and isinstance(ours[1], pnn.ReLU)
    torch.testing.assert_close(ours(x), shared(x))

    class Skip(nn.Sequential):  # runs its last child only
        def forward(self, x):
            return self[-1](x)

    class Plain(nn.Sequential):  # a subclass that keeps Sequential's forward may be fused
        pass

    skip = Skip(nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2))
    fused = pyops.convert(Plain(nn.BatchNorm2d(2), nn.ReLU()))
    assert pyops.convert(skip)[0].activation is None and fused[0].activation == "relu"
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(pyops.convert(skip)(x), skip(x))


def test_convert_maps_sync_batch_norm():
    sync = nn.SyncBatchNorm(4, momentum=0.2)
    ours = pyops.convert(nn.Sequential(nn.Conv2d(2, 4, 1), sync, nn.ReLU()))
    bn = ours[1]
    assert type(bn) is pnn.SyncBatchNorm and bn.activation == "relu" and bn.momentum == 0.2
    assert bn.process_group is sync.process_group and isinstance(ours[2], nn.Identity)
    assert ours.state_dict().keys() == {"0.weight", "0.bias"} | {f"1.{k}" for k in sync.state_dict()}
    x = torch.randn(3, 2, 5, 5)
    ref = torch.relu(nn.functional.batch_norm(ours[0](x), None, None, sync.weight, sync.bias, training=True))
    torch.testing.assert_close(ours(x), ref)  # one process: SyncBatchNorm is a batch norm


def test_optim_convert_keeps_the_state():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    twin = nn.Linear(6, 3).double()
    twin.load_state_dict(model.state_dict())
    data = [(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)) for _ in range(6)]
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True) for m in (model, twin)]

    def step(m, opt, x, t):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), t).backward()
        opt.step()

    for x, t in data[:3]:
        for m, opt in zip((model, twin), opts):
            step(m, opt, x, t)
    converted = pyops.optim.convert(opts[0])
    assert type(converted) is pyops.optim.Adam and converted.param_groups[0]["amsgrad"]
    assert converted.state[model.weight]["step"] == 3
    for x, t in data[3:]:
        step(model, converted, x, t)
        step(twin, opts[1], x, t)
    torch.testing.assert_close(model.weight, twin.weight, rtol=1e-12, atol=1e-14)
    assert pyops.optim.convert(converted) is converted
    with pytest.raises(TypeError, match="pyops.optim.convert: no pyops drop-in for LBFGS"):
        pyops.optim.convert(torch.optim.LBFGS(model.parameters()))


def _args(**kw):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--no-progress", "--epochs", "1"])
    args.device, args.dtype, args.data_name = "cpu", torch.float32, "digits"
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_demo_model_comparison_table(digits, capsys):
    rows = demo.compare_models(_args(epochs=3), digits)
    names = [r[0] for r in rows]
    assert names == ["k-NN (k=3)", "linear (logistic regression)", "mlp2", "mlp3", "maxout", "cnn"]
    assert all(0.5 < acc <= 1 for _, acc, _, _ in rows), rows
    assert "test accuracy" in capsys.readouterr().out


def test_demo_imbalance_and_transfer(digits, capsys):
    results = demo.imbalance(_args(epochs=3), digits)
    (_, plain), (_, weighted) = results
    cut = [1, 4, 7]
    assert weighted["per_class_recall"][cut].mean() >= plain["per_class_recall"][cut].mean()
    rows = demo.transfer(_args(epochs=2))
    assert [r[0] for r in rows] == ["transfer (frozen 0-4 features, new head)", "from scratch"]
    assert "cut classes" in capsys.readouterr().out


def test_data_accepts_tensors_and_datasets():
    images, labels = torch.rand(40, 8, 8), torch.arange(40) % 4
    split = pdata.split((images, labels), test_fraction=0.5)
    assert split.x_train.shape == (20, 1, 8, 8) and split.classes == 4
    dataset = [(images[i], int(labels[i])) for i in range(40)]
    x, y = pdata.as_tensors(dataset)
    assert torch.equal(x[:, 0], images) and torch.equal(y, labels)
    with pytest.raises(TypeError, match="pyops.data"):
        pdata.as_tensors(5)


def _torchrun(tmp_path, nproc, name):
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone"]
    cmd += ["-m", "pyops", "demo", "--epochs", "1", "--dtype", "float64", "--only", "pyops", "--sync-bn"]
    cmd += ["--no-progress", "--batch-size", "64", "--device", "cpu", "--save", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return torch.load(out)["pyops"]


def test_distributed_training_equals_one_process(tmp_path):
    """Two processes on gloo with DistributedDataParallel and SyncBatchNorm, each taking half of every
    batch, train as one process on the whole batch: same losses, same final parameters and running
    statistics."""
    two = _torchrun(tmp_path, 2, "two")
    one = _torchrun(tmp_path, 1, "one")
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-9, atol=1e-12)
    assert two["state"].keys() == one["state"].keys()
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-8, atol=1e-10, msg=k)


# One process, a one-rank gloo group: torch's DistributedDataParallel refuses a CPU module holding any
# SyncBatchNorm through its private _passing_sync_batchnorm_handle; pyops.nn.DistributedDataParallel
# overrides that method to let pyops' SyncBatchNorm through. A torch that renames the method, stops calling
# it or refuses elsewhere fails here.
_DDP = r"""
import torch, torch.distributed as dist
from torch import nn
import pyops.nn as pnn
from pyops import demo

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
TorchDDP = nn.parallel.DistributedDataParallel
assert callable(getattr(TorchDDP, "_passing_sync_batchnorm_handle", None)), "the private hook is gone"
assert pnn.DistributedDataParallel._passing_sync_batchnorm_handle is not TorchDDP._passing_sync_batchnorm_handle
assert demo.DistributedDataParallel is pnn.DistributedDataParallel


def model(bn):
    return nn.Sequential(nn.Conv2d(2, 3, 1), bn(3), nn.ReLU())


calls = []


class Recording(TorchDDP):
    def _passing_sync_batchnorm_handle(self, module):
        calls.append(module)


net = model(pnn.SyncBatchNorm)
Recording(net)
assert calls == [net], "torch's constructor no longer hands the module to the hook"
refused = [(TorchDDP, pnn.SyncBatchNorm), (TorchDDP, nn.SyncBatchNorm), (pnn.DistributedDataParallel, nn.SyncBatchNorm)]
for cls, bn in refused:
    try:
        cls(model(bn))
    except ValueError as e:
        assert "SyncBatchNorm layers only work with GPU modules" in str(e), e
    else:
        raise AssertionError(f"{cls.__module__}.{cls.__name__} took {bn.__module__}.{bn.__name__} on the CPU")
ddp = pnn.DistributedDataParallel(model(pnn.SyncBatchNorm))
x = torch.randn(4, 2, 3, 3)
ddp(x).sum().backward()
assert all(p.grad is not None for p in ddp.parameters())
dist.destroy_process_group()
print("ddp ok")
"""


def test_ddp_lets_pyops_sync_batch_norm_through_on_cpu():
    """pyops.nn.DistributedDataParallel (pyops.demo's name for it too) takes a CPU model with pyops'
    SyncBatchNorm, which torch's refuses, and still refuses torch's; torch's constructor still calls the
    private method it overrides."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _DDP], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert res.returncode == 0 and "ddp ok" in res.stdout, res.stdout + res.stderr


def test_optimizers_step_fsdp2_sharded_parameters():
    """pyops optimizers on fully_shard's DTensor parameters (2 processes, gloo): each rank steps its
    shard in the kernel, the state stays sharded, and the result is torch's on the whole model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(
        cmd + [os.path.join(ROOT, "tests", "fsdp_worker.py")], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0 and "fsdp ok" in res.stdout, res.stdout + res.stderr

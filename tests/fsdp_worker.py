"""Run under torchrun by test_models.py: every pyops optimizer steps FSDP2's sharded (DTensor)
parameters as torch's optimizer steps the whole model in one process."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import pyops

CONFIGS = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01, "amsgrad": True}),
    ("Adagrad", {"lr": 0.1}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
]


def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).double()


def main():
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    for name, config in CONFIGS:
        torch.manual_seed(0)
        model, ref = _net(), _net()
        ref.load_state_dict(model.state_dict())
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        opt = getattr(pyops.optim, name)(model.parameters(), **config)
        ropt = getattr(torch.optim, name)(ref.parameters(), **config)
        torch.manual_seed(1)
        for _ in range(4):
            x = torch.randn(2 * size, 8, dtype=torch.float64)
            model(x.chunk(size)[rank]).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ref(x).square().mean().backward()
            ropt.step()
            ropt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.full_tensor(), q, rtol=1e-12, atol=1e-14, msg=name)
        state = opt.state[next(iter(model.parameters()))]
        kinds = {k for k, v in state.items() if k != "step" and type(v).__name__ != "DTensor"}
        assert not kinds, f"{name}: state {kinds} not sharded"
    assert not pyops.optim.fallback_counts(), pyops.optim.fallback_counts()
    # Every check passed. The exit is made deterministic: the barrier drains gloo's pending work on
    # both ranks before the group goes, and os._exit skips the interpreter's teardown, where gloo's
    # threads and FSDP's references can still be released in either order (under load that order
    # aborted a rank with "terminate called without an active exception" after this point).
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("fsdp ok")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""The optim family's spec: per optimizer the pyops class against torch's for-loop, its configurations,
steps and tolerance (OptimSpec, OPTIMIZERS), and the parameters and gradients a check steps over
(OPTIM_SHAPES, OPTIM_NONFINITE)."""

import dataclasses
import math

import torch

from .. import optim as popt
from .oracle import Comparison, compare, failed, labelled, tolerance
from .spec import spec_table

FAMILY = "optim"


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One optimizer: the pyops class against torch's (run as its for-loop, foreach=False), for each
    of `configs` (constructor keyword arguments) over `steps` steps; the tolerance is TOL times
    `scale` (the steps' rounding adds up). `dtypes`: those torch's for-loop is the reference for. For
    float16/bfloat16 parameters pyops computes in float32 while torch's for-loop computes in the half
    dtype, where its state underflows (v = (1 - beta2) g^2 of a gradient below ~1e-3, and eps = 1e-8,
    round to 0 in float16: torch's step turns inf), so it is no reference there."""

    family: str
    name: str
    cls: type
    reference: type
    configs: tuple
    steps: int = 12
    scale: float = 20
    dtypes: tuple = (torch.float64, torch.float32)

    @property
    def function(self):
        return self.cls

    @property
    def samples(self):
        """The configurations, by the label check gives their results."""
        return {f"config {i} {config}": config for i, config in enumerate(self.configs)}

    def tolerance(self, dtype, reduced=1):
        return tolerance(dtype, reduced, self.scale)

    def check(self, dtype, device, seed=0):
        """Every configuration on the current backend, against the oracle (values drawn from `seed`)."""
        return [
            labelled(label, c)
            for label, config in self.samples.items()
            for c in check_optimizer(self, config, dtype, device, torch.Generator().manual_seed(seed))
        ]


def _optimizer(name, configs):
    """pyops.optim.<name> against torch.optim.<name>."""
    return OptimSpec(FAMILY, name, getattr(popt, name), getattr(torch.optim, name), tuple(configs))


OPTIMIZERS = spec_table(
    _optimizer(
        "SGD",
        [
            {},
            {"momentum": 0.9},
            {"momentum": 0.9, "nesterov": True},
            {"momentum": 0.9, "dampening": 0.5},
            {"weight_decay": 0.1, "momentum": 0.5},
            {"maximize": True, "momentum": 0.3},
            {"lr": torch.tensor(0.01)},
        ],
    ),
    _optimizer(
        "Adam",
        [
            {},
            {"amsgrad": True},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"maximize": True, "betas": (0.8, 0.9)},
            {"lr": torch.tensor(0.01), "eps": 1e-6},
        ],
    ),
    _optimizer("AdamW", [{}, {"amsgrad": True, "weight_decay": 0.3}, {"maximize": True}]),
    _optimizer(
        "Adagrad",
        [{}, {"lr_decay": 0.1}, {"weight_decay": 0.1, "initial_accumulator_value": 0.5}, {"maximize": True}],
    ),
    _optimizer(
        "RMSprop",
        [
            {},
            {"centered": True},
            {"momentum": 0.9},
            {"momentum": 0.5, "centered": True, "weight_decay": 0.1},
            {"maximize": True, "alpha": 0.9},
        ],
    ),
)
# Parameter shapes of an optimizer check: several tensors, a 0-d and an empty one, and one whose gradient
# turns infinite and NaN at one step (OPTIM_NONFINITE).
OPTIM_SHAPES = ((5, 3), (7,), (), (0, 4), (3, 2, 2), (1,), (4,))
OPTIM_NONFINITE = (2, len(OPTIM_SHAPES) - 1, (math.inf, -math.inf, math.nan, 1.0))  # (step, parameter, gradient)


def run_optimizer(cls, params, config, grads):
    """Step `cls` over `params` once per entry of `grads` (a list per step). Two parameter groups (the
    second with lr 0.02) unless the config sets lr; parameter 1 has no gradient every third step."""
    if "lr" in config:
        opt = cls(params, **config)
    else:
        opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.02}], **config)
    for k, step_grads in enumerate(grads):
        for j, p in enumerate(params):
            p.grad = None if (j == 1 and k % 3 == 2) else step_grads[j].clone()
        opt.step()
    return opt


def check_optimizer(spec, config, dtype, device, generator=None):
    """spec.cls (on the current backend) against spec.reference in float64 from the same dtype-rounded
    parameters and gradients, with torch's own for-loop in `dtype` as the rounding allowance: the
    parameters and every state tensor. Returns Comparisons."""
    on_device = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
    start = [(torch.randn(s, dtype=torch.float64, generator=generator)).to(dtype) for s in OPTIM_SHAPES]
    grads = [
        [torch.randn(s, dtype=torch.float64, generator=generator).to(dtype) for s in OPTIM_SHAPES]
        for _ in range(spec.steps)
    ]
    step, index, values = OPTIM_NONFINITE
    grads[step][index] = torch.tensor(values, dtype=dtype)

    def run(cls, run_dtype, config, reference):
        params = [p.to(device, run_dtype, copy=True).requires_grad_() for p in start]
        extra = {"foreach": False} if reference else {}
        gs = [[g.to(device, run_dtype) for g in step] for step in grads]
        return params, run_optimizer(cls, params, {**config, **extra}, gs)

    p64, o64 = run(spec.reference, torch.float64, on_device, True)
    pt, ot = run(spec.reference, dtype, on_device, True)
    ours, opt = run(spec.cls, dtype, on_device, False)
    results = []
    for i, (a, e, t) in enumerate(zip(ours, p64, pt)):
        results.append(compare(a, e, dtype, t, what=f"param {i}", scale=spec.scale))
        state, s64, st = opt.state[a], o64.state[e], ot.state[t]
        if state.keys() != st.keys():
            results.append(failed(f"state {i}", f"keys {sorted(state)} != torch's {sorted(st)}"))
            continue
        for key in st:
            what = f"state {i} {key}"
            if not isinstance(st[key], torch.Tensor):
                ok = state[key] == st[key]
                results.append(Comparison(what, 0.0, 0.0) if ok else failed(what, f"{state[key]!r} != {st[key]!r}"))
            elif state[key].dtype != st[key].dtype:
                results.append(failed(what, f"dtype {state[key].dtype} != torch's {st[key].dtype}"))
            else:
                results.append(compare(state[key], s64[key], st[key].dtype, st[key], what=what, scale=spec.scale))
    return results

"""Optimizer benchmark cases: one step of each pyops optimizer against torch's for-loop, foreach
and fused implementations of the same optimizer.

Parameter sets: ResNet-18's 62 tensors (11.7M float32 parameters) and 1000 tensors of 4096; on
GPU also 100M parameters in 10 tensors (the bandwidth floor: Adam moves 28 bytes a parameter).
Minimum bytes per step: every tensor read once and every updated one written once.

The fixed cost of step() (the "overhead" sets): as many tensors as ResNet-18 has, and 1000, of 64
elements each, so that the time is what a step costs besides moving the data (torch's _init_group,
list building, the call, the per-tensor setup), against torch's fused and foreach steps.

Adam and AdamW also time quantized states beside the float32 step, interleaved with it (rows "8bit":
state_dtype="8bit", 8-bit blockwise states, ~16 bytes moved a parameter instead of 28; "bf16":
state_dtype=torch.bfloat16, 20 bytes). Their GB/s column counts the float32 step's bytes.
"""

import torch

import pyops.optim as popt

from .harness import Case

# name -> (constructor arguments, state tensors per parameter). Bytes per element: the parameter,
# gradient and state read, the parameter and state written.
OPTIMIZERS = {
    "SGD": ({"momentum": 0.9}, 1),
    "Adam": ({}, 2),
    "AdamW": ({}, 2),
    "Adagrad": ({}, 1),
    "RMSprop": ({}, 1),
}
REFERENCES = [("torch for-loop", "forloop"), ("torch foreach", "foreach"), ("torch fused", "fused")]
OVERHEAD_REFERENCES = [("torch fused", "fused"), ("torch foreach", "foreach")]
OVERHEAD_NUMEL = 64  # elements per tensor of the fixed-cost sets
# (row label, impl) -> state_dtype of the quantized-state rows (Adam, AdamW)
STATE_VARIANTS = {("8bit", "pyops_8bit"): "8bit", ("bf16", "pyops_bf16"): torch.bfloat16}


def resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            c = cin if block == 0 else cout
            shapes += [(cout, c, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and c != cout:
                shapes += [(cout, c, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(1000, 512), (1000,)]


def _fused_supported(name):
    return name in ("SGD", "Adam", "AdamW", "Adagrad")


def _case(name, label, shapes, device, references=REFERENCES, shape_label=None):
    kwargs, states = OPTIMIZERS[name]
    n = sum(torch.Size(s).numel() for s in shapes)
    opts = {}

    def make_inputs():
        params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        return (params,)

    def iteration(impl):
        def step(params):
            key = (impl, id(params))
            if key not in opts:
                cls = getattr(popt if impl.startswith("pyops") else torch.optim, name)
                extra = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
                extra.update({i: {"state_dtype": sd} for (_, i), sd in STATE_VARIANTS.items()})
                opts[key] = cls(params, **kwargs, **extra.get(impl, {}))
            opts[key].step()

        return step

    refs = [r for r in references if r[1] != "fused" or _fused_supported(name)]
    quantized = name in ("Adam", "AdamW") and references is REFERENCES
    variants = [(label, impl, "auto") for label, impl in STATE_VARIANTS] if quantized else None
    return Case(
        "optim",
        name,
        "step",
        (shape_label or f"{label}:{len(shapes)}t:{n / 1e6:.1f}M",),
        torch.float32,
        device,
        (2 + states) * n * 4 + (1 + states) * n * 4,
        make_inputs,
        iteration,
        references=refs,
        variants=variants,
    )


def cases(device, quick=False):
    for label, count in (("overhead-resnet18", len(resnet18_shapes())), ("overhead", 1000)):
        for name in OPTIMIZERS:
            shapes = [(OVERHEAD_NUMEL,)] * count
            yield _case(name, label, shapes, device, OVERHEAD_REFERENCES, f"{label}:{count}x{OVERHEAD_NUMEL}")
    sets = [("resnet18", resnet18_shapes())]
    if not quick:
        sets.append(("1000x4096", [(4096,)] * 1000))
        if device == "cuda":
            sets.append(("100M", [(10_000_000,)] * 10))
    for label, shapes in sets:
        for name in OPTIMIZERS:
            yield _case(name, label, shapes, device)

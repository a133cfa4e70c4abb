"""Optimizer benchmark cases: one step of each pyops optimizer against torch's for-loop, foreach
and fused implementations of the same optimizer.

Parameter sets: ResNet-18's 62 tensors (11.7M float32 parameters) and 1000 tensors of 4096; on
GPU also 100M parameters in 10 tensors (the bandwidth floor: Adam moves 28 bytes a parameter).
Minimum bytes per step: every tensor read once and every updated one written once.

The fixed cost of step() (the "overhead" sets): as many tensors as ResNet-18 has, and 1000, of 64
elements each, so that the time is what a step costs besides moving the data (torch's _init_group,
list building, the call, the per-tensor setup), against torch's fused and foreach steps.

The step inside backward (pyops.optim.step_in_backward): one training step (forward, cross-entropy,
backward, zero_grad) of demo models (pyops.models, 1x8x8 images; the MLPs at batch 1, where the
gradients outweigh the activations, the CNN and ResNeXt at 64) with pyops Adam stepping each
parameter in backward, against the same optimizer stepping after backward, both under `auto`; the
table gives both times and, on the CPU, both peaks (the profiler's allocation events over one steady
step, the optimizer's state already made).

Adam and AdamW also time quantized states beside the float32 step, interleaved with it (rows "8bit":
state_dtype="8bit", 8-bit blockwise states, ~16 bytes moved a parameter instead of 28; "bf16":
state_dtype=torch.bfloat16, 20 bytes). Their GB/s column counts the float32 step's bytes.
"""

import torch

import pyops
import pyops.optim as popt
from pyops import models

from .harness import Case
from .harness import print_table as _print_table

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


def _step_cases(device, quick):
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


IN_BACKWARD_SETS = [("mlp3", 1), ("maxout", 1), ("cnn", 64), ("resnext", 64)]  # (demo model, batch)


def _in_backward_case(name, batch, device):
    made = {}

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 1, 8, 8, generator=g).to(device), (torch.arange(batch) % 10).to(device)

    def iteration(impl):
        inside = impl == "pyops"

        @pyops.backend("auto")  # both sides alike: the case compares where the step runs, not backends
        def step(x, y):
            if impl not in made:  # each side its own model, optimizer and first step (its state)
                model = models.build(name).to(device)
                opt = popt.Adam(model.parameters(), lr=1e-3)
                made[impl] = (model, opt, popt.step_in_backward(opt) if inside else None, models.loss_module())
                step(x, y)
            model, opt, _, loss_fn = made[impl]
            loss_fn(model(x), y).backward()
            if not inside:
                opt.step()
            opt.zero_grad()

        return step

    params = sum(p.numel() for p in models.build(name).parameters())
    return Case(
        "optim",
        "Adam",
        "train step in backward",
        (f"{name}:batch {batch}:{params / 1e3:.0f}K params",),
        torch.float32,
        device,
        0,
        make_inputs,
        iteration,
        references=[("step after backward", "after")],
    )


def cases(device, quick=False):
    yield from _step_cases(device, quick)
    for name, batch in IN_BACKWARD_SETS:
        yield _in_backward_case(name, batch, device)


def print_table(results, file=None):
    """The harness's table, with the peak memory of one training step of the step-in-backward cases
    filled in on the CPU."""
    from .loss import cpu_peak_mb

    peaks = []
    for r in results:
        c = r.case
        if c.device == "cpu" and c.mode == "train step in backward" and r.peak_mb is None:
            inputs = c.make_inputs()
            step = c.iteration("after" if r.backend == "step after backward" else "pyops")
            step(*inputs)  # the side's model and optimizer state made before the measured step
            r.peak_mb = cpu_peak_mb(step, inputs)
            peaks.append((c.shape[0], r.backend, r.peak_mb))
    _print_table(results, file=file)
    if peaks:
        print("# peak of one training step, KB (step in backward: the pyops backend's rows)", file=file)
        for shape, backend, mb in peaks:
            print(f"{shape:<32} {backend:<20} {mb * 1e3:10.1f}", file=file)

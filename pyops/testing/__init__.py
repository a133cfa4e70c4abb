"""The op spec table and the float64 oracle: per op its pyops function, the torch reference, its keyword
arguments, sample inputs (shapes, layouts, edge values) and the tolerance per dtype; per optimizer its
pyops and torch classes, configurations and tolerance. The tests, `python -m pyops check`, the demo
tour and the bench all read it, so a new op (or optimizer) is one new entry in its family's module.

- oracle.py: the tolerances (TOL), the comparison against the float64 oracle (compare, Comparison),
  gradcheck, the inputs every family draws (Sample, the layouts) and the oracle of a one-input op.
- spec.py: what every family's spec entry supplies (Spec) and a family's table of them (spec_table).
- activation.py, batch_norm.py, conv.py, loss.py, optim.py: each family's spec class, samples and table.

The oracle is the torch reference computed in float64 from the same (dtype-rounded) inputs; a result
passes when every element is within `atol + rtol * |oracle|` (TOL), NaN and inf exactly where the
oracle has them.
"""

from .activation import ACTIVATIONS, EDGE_VALUES, ELEMENTWISE_SAMPLES, OpSpec, check_op_sample
from .batch_norm import (
    BATCH_NORM_CORE_SAMPLES,
    BATCH_NORM_FULL,
    BATCH_NORM_SAMPLES,
    BATCH_NORM_TRITON_SAMPLES,
    BATCH_NORM_ZERO_CHANNELS,
    BATCH_NORMS,
    BatchNormSpec,
    batch_norm_inputs,
    check_batch_norm,
)
from .conv import CONV_CASES, CONV_GRADCHECK, CONV_INTERPRETED, CONVS, ConvCase, ConvSpec, check_conv_case
from .loss import CROSS_ENTROPY_SAMPLES, LOSSES, REGRESSION_SAMPLES, LossSpec, compare_loss
from .optim import OPTIM_NONFINITE, OPTIM_SHAPES, OPTIMIZERS, OptimSpec, check_optimizer, run_optimizer
from .oracle import (
    DTYPES,
    TOL,
    Comparison,
    Sample,
    assert_close,
    compare,
    compare_op,
    forward_backward,
    gradcheck,
    tolerance,
    unreliable,
)
from .spec import Spec, spec_table

# ---- families ---------------------------------------------------------------------------------------

# Every op family that exists, with its spec entries: `check` covers each and the bench has a module
# of cases per family (bench/<family>.py).
SPECS = {
    "activation": ACTIVATIONS,
    "optim": OPTIMIZERS,
    "batch_norm": BATCH_NORMS,
    "conv": CONVS,
    "loss": LOSSES,
}
FAMILIES = tuple(SPECS)
# The bench's families: one per op family, `overhead` (the fixed cost of a call of each activation) and
# `models` (a training step of each reference network).
BENCH_FAMILIES = FAMILIES + ("overhead", "models")

__all__ = [
    "ACTIVATIONS",
    "BATCH_NORMS",
    "BATCH_NORM_CORE_SAMPLES",
    "BATCH_NORM_FULL",
    "BATCH_NORM_SAMPLES",
    "BATCH_NORM_TRITON_SAMPLES",
    "BATCH_NORM_ZERO_CHANNELS",
    "BENCH_FAMILIES",
    "CONVS",
    "CONV_CASES",
    "CONV_GRADCHECK",
    "CONV_INTERPRETED",
    "CROSS_ENTROPY_SAMPLES",
    "DTYPES",
    "EDGE_VALUES",
    "ELEMENTWISE_SAMPLES",
    "FAMILIES",
    "LOSSES",
    "OPTIMIZERS",
    "OPTIM_NONFINITE",
    "OPTIM_SHAPES",
    "REGRESSION_SAMPLES",
    "SPECS",
    "TOL",
    "BatchNormSpec",
    "Comparison",
    "ConvCase",
    "ConvSpec",
    "LossSpec",
    "OpSpec",
    "OptimSpec",
    "Sample",
    "Spec",
    "assert_close",
    "batch_norm_inputs",
    "check_batch_norm",
    "check_conv_case",
    "check_op_sample",
    "check_optimizer",
    "compare",
    "compare_loss",
    "compare_op",
    "forward_backward",
    "gradcheck",
    "run_optimizer",
    "spec_table",
    "tolerance",
    "unreliable",
]

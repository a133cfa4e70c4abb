"""The activation family's spec: per op (relu, leaky_relu, elu, sigmoid, tanh, maxout) its pyops function,
the torch reference, keyword arguments, samples (shapes, layouts) and edge values, and what backward
saves (OpSpec, ACTIVATIONS)."""

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as TF

from .. import functional as F
from ..ops.activation import maxout_reference
from .oracle import DTYPES, Sample, channels_last, compare_op, gradcheck, labelled, tolerance, transposed
from .spec import spec_table

FAMILY = "activation"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One differentiable op. `saves` is what backward keeps: "mask" (1 bit an output element),
    "input", "output" or "indices" (uint8, one an output element). `fit(shape, kwargs)` adapts the
    keyword arguments to an input shape they do not fit (None: they fit every shape). `reduced(x, kwargs)`
    is the number of input elements each output element sums over (None: none, an elementwise op or an
    exact max)."""

    family: str
    name: str
    fn: Callable
    reference: Callable
    kwargs: dict
    samples: dict
    edge: Sample
    saves: str
    inplace: bool = False
    fit: Optional[Callable] = None
    reduced: Optional[Callable] = None
    dtypes: tuple = DTYPES

    @property
    def function(self):
        return self.fn

    def tolerance(self, dtype, reduced=1):
        return tolerance(dtype, reduced)

    def sample_kwargs(self, sample):
        """The keyword arguments for one of the samples."""
        return {**self.kwargs, **sample.kwargs}

    def kwargs_for(self, shape):
        """The keyword arguments for an input of `shape` (kwargs, fitted to it where needed)."""
        return self.kwargs if self.fit is None else self.fit(tuple(shape), dict(self.kwargs))

    def reduction(self, x, kwargs):
        return 1 if self.reduced is None else self.reduced(x, kwargs)

    def output_shape(self, shape, kwargs=None):
        """The output's shape for an input of `shape` (the reference run on the meta device)."""
        kwargs = self.kwargs if kwargs is None else kwargs
        return tuple(self.reference(torch.empty(shape, device="meta"), **kwargs).shape)

    def saved_bytes(self, numel_in, numel_out, itemsize):
        """Bytes backward keeps for one input of numel_in elements (of itemsize bytes) giving numel_out."""
        return {
            "mask": (numel_out + 7) // 8,
            "input": numel_in * itemsize,
            "output": numel_out * itemsize,
            "indices": numel_out,
        }[self.saves]

    def check(self, dtype, device, seed=0):
        """Every sample and the edge values on the current backend, against the oracle; each sample drawn
        from a generator seeded with `seed` (the values the tests draw after torch.manual_seed(seed)).
        In float64, also torch.autograd.gradcheck of the op on its first sample of 2 to 256 elements."""
        results = [
            labelled(label, c)
            for label, sample in {**self.samples, "edge": self.edge}.items()
            for c in check_op_sample(self, sample, dtype, device, torch.Generator().manual_seed(seed))
        ]
        if dtype == torch.float64:
            small = [v for v in self.samples.values() if v.values is None and 1 < math.prod(v.shape) <= 256]
            sample = (small or list(self.samples.values()))[0]
            kwargs = self.sample_kwargs(sample)
            x = sample.make(dtype, device, torch.Generator().manual_seed(seed)).requires_grad_()
            results.append(gradcheck(lambda t: self.fn(t, **kwargs), (x,)))
        return results


def check_op_sample(spec, sample, dtype, device, generator=None):
    """compare_op on one sample of an OpSpec, on the current backend."""
    kwargs = spec.sample_kwargs(sample)
    x = sample.make(dtype, device, generator)
    g = sample.grad(spec.output_shape(x.shape, kwargs), dtype, device, generator)
    return compare_op(spec.fn, spec.reference, kwargs, x, g, spec.reduction(x, kwargs))


# Empty, 0-d, one element, sizes that are not a multiple of 8 (the vector/mask width), several Triton
# programs, and non-contiguous layouts.
ELEMENTWISE_SAMPLES = {
    "0d": Sample(()),
    "one": Sample((1,)),
    "empty": Sample((0, 3)),
    "odd": Sample((13, 9)),
    "blocks": Sample((3, 1001)),
    "transposed": Sample((9, 21), transposed, grad_view=lambda g: g.t().contiguous().t()),
    "sliced": Sample((6, 34), lambda t: t[1:, ::3]),
    "channels_last": Sample((2, 5, 3, 7), channels_last),
    "expanded": Sample((1, 37), lambda t: t.expand(4, 37)),
}


def _floats(text):
    return tuple(float(v) for v in text.split())


# Exact zeros at the kinks, tiny and huge values, inf and NaN. NaN comes last, in a sample of odd length:
# torch's elu gradient at NaN is g in its scalar loops and CUDA kernel (pyops' rule) but NaN in its
# vectorized CPU loop, and the last element of an odd-length tensor is always in the scalar tail, whatever
# the vector width of the machine and dtype.
EDGE_VALUES = Sample(
    values=_floats("0 -0 1e-30 -1e-30 1e-5 -1e-5 0.5 -0.5 1 -1 20 -20 80 -80 1e30 -1e30 inf -inf")
    + _floats("3 -3 0.1499 -0.1501 1e-8 -1e-8 nan")
)


def _fit_pieces(shape, kwargs):
    """maxout on `shape`: the most pieces up to kwargs' that divide the size along dim."""
    size = shape[kwargs["dim"]]
    return {**kwargs, "pieces": max(p for p in range(1, kwargs["pieces"] + 1) if size % p == 0)}


def _elementwise(name, fn, reference, kwargs, saves, inplace=False):
    return OpSpec(FAMILY, name, fn, reference, kwargs, ELEMENTWISE_SAMPLES, EDGE_VALUES, saves, inplace)


ACTIVATIONS = spec_table(
    _elementwise("relu", F.relu, TF.relu, {}, "mask", inplace=True),
    _elementwise("leaky_relu", F.leaky_relu, TF.leaky_relu, {"negative_slope": 0.2}, "mask", inplace=True),
    _elementwise("elu", F.elu, TF.elu, {"alpha": 1.3}, "input", inplace=True),
    _elementwise("sigmoid", F.sigmoid, torch.sigmoid, {}, "output"),
    _elementwise("tanh", F.tanh, torch.tanh, {}, "output"),
    OpSpec(
        family=FAMILY,
        name="maxout",
        fn=F.maxout,
        reference=maxout_reference,
        kwargs={"pieces": 4, "dim": 1},
        samples={
            "dim1": Sample((4, 12, 3), kwargs={"pieces": 3, "dim": 1}),
            "last": Sample((5, 20), kwargs={"pieces": 4, "dim": -1}),
            "first": Sample((6, 7), kwargs={"pieces": 2, "dim": 0}),
            "1d": Sample((9,), kwargs={"pieces": 9, "dim": 0}),
            "pieces1": Sample((3, 4), kwargs={"pieces": 1, "dim": 1}),
            "empty": Sample((0, 6), kwargs={"pieces": 3, "dim": 1}),
            "big": Sample((2, 1030, 2), kwargs={"pieces": 2, "dim": 1}),
            "channels_last": Sample((2, 8, 3, 5), channels_last, kwargs={"pieces": 4, "dim": 1}),
            "transposed": Sample((6, 10), transposed, kwargs={"pieces": 5, "dim": 0}),
        },
        # Groups of 4: ties (the gradient goes to the first maximal piece), NaN (wins, the first NaN of a
        # group), -inf, signed zeros.
        edge=Sample(
            values=_floats("1 3 3 2  nan 5 nan 1  -inf -inf -inf -inf  0 -0 0 0  4 nan 9 9  2 2 2 2"),
            kwargs={"pieces": 4, "dim": 0},
        ),
        saves="indices",
        fit=_fit_pieces,
    ),
)

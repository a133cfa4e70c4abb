"""Test helpers over pyops.testing, which holds the op spec table, the per-dtype tolerances (TOL) and
the float64 oracle comparison (assert_close): the (device, backend) pairs to parametrize over and the
skip for what cannot be checked here."""

import torch

import pyops
from pyops.testing import DTYPES, TOL, assert_close, unreliable  # noqa: F401  (re-exported for the tests)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends():
    """(device, backend) pairs that can run here, plus the CUDA ones (marked, skipped without a GPU)."""
    import pytest

    pairs = [("cpu", b) for b in pyops.available_backends("cpu")]
    cuda = pyops.available_backends("cuda") if torch.cuda.is_available() else ["native", "triton", "torch"]
    pairs += [pytest.param("cuda", b, marks=pytest.mark.cuda) for b in cuda]
    return pairs


def kernel_device_backends():
    """device_backends() without torch: the backends that have primitives."""
    return [p for p in device_backends() if "torch" not in str(p)]


def opcheck_primitive(backend, name, samples, limit=None):
    """torch.library.opcheck of the primitive `name` of `backend` on each sample (at least one; the
    first `limit` only when given)."""
    from pyops.ops import PRIMITIVES

    samples = list(samples)
    assert samples, f"no opcheck samples for the primitive {name}"
    for args in samples[:limit]:
        torch.library.opcheck(PRIMITIVES[backend][name], args)


def skip_unreliable(device, backend, dtype):
    """Skip what pyops.testing.unreliable names (Triton bfloat16 under the interpreter: GPU only)."""
    import pytest

    if unreliable(device, backend, dtype):
        pytest.skip("bfloat16 arithmetic is unreliable in the Triton interpreter")

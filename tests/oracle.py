"""The float64 torch oracle and the one table of per-dtype tolerances."""
import torch

import pyops

# dtype -> (rtol, atol): float64 ~1e-10 relative, float32 ~1e-5, float16 ~1e-3, bfloat16 ~1.6e-2.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}
DTYPES = list(TOL)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends():
    """(device, backend) pairs that can run here, plus the CUDA ones (marked, skipped without a GPU)."""
    import pytest

    pairs = [("cpu", b) for b in pyops.available_backends("cpu")]
    cuda = pyops.available_backends("cuda") if torch.cuda.is_available() else ["native", "triton", "torch"]
    pairs += [pytest.param("cuda", b, marks=pytest.mark.cuda) for b in cuda]
    return pairs


def skip_unreliable(device, backend, dtype):
    """bfloat16 arithmetic is wrong in the Triton interpreter: test Triton bfloat16 on GPU only."""
    import pytest

    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 arithmetic is unreliable in the Triton interpreter")


def assert_close(actual, expected64, dtype, torch_result=None, what="output"):
    """actual (any dtype) against the float64 oracle within TOL[dtype], NaNs where the oracle has
    them. Where torch's own result in `dtype` (torch_result) is further from the oracle than the
    tolerance (rounding the dtype itself forces, e.g. a saved float16 output), pyops may be as far
    as torch is, times 2, and no further."""
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    rtol, atol = TOL[dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero()[:5].tolist()} vs oracle {nan_e.nonzero()[:5].tolist()}"
    inf_e = e.isinf()
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinities differ from the oracle"
    fin = ~nan_e & ~inf_e
    err = (a - e).abs()[fin]
    bound = atol + rtol * e.abs()[fin]
    if torch_result is not None:
        t = torch_result.detach().to("cpu", torch.float64)
        bound = torch.maximum(bound, 2 * (t - e).abs()[fin])
    bad = err > bound
    assert not bad.any(), (f"{what} ({dtype}): {int(bad.sum())} of {err.numel()} elements off; worst error "
                           f"{float((err - bound).max()):.3g} over bound")

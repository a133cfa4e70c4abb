"""Convolution benchmark cases: grouped and depthwise conv2d, forward and forward+backward (input,
weight and bias gradients), pyops.functional.conv2d against torch.nn.functional.conv2d.

CPU (float32): the ResNeXt grouped 3x3 (16, 128, 28, 28) with groups=32 and the depthwise 3x3
(16, 64, 56, 56) and (32, 256, 14, 14), all padding 1; targets (native, median ratio against torch
eager): forward+backward >= 2.0x, 1.5x and 1.2x, forward alone >= 1.0x on all three.
GPU (float32 and bfloat16): ResNeXt-50 32x4d grouped 3x3 convolutions and MobileNet-v2 depthwise ones.
Overhead: a tiny depthwise convolution (1, 8, 8, 8), fwd+bwd and no_grad, many calls an iteration, one
thread on the CPU.
GFLOP/s counts 2 * N * K * OH * OW * (C / groups) * KH * KW per convolution (three of them fwd+bwd);
minimum bytes: forward reads input and weight and writes the output; backward reads grad_out (twice:
input and weight gradients), the input and the weight and writes both gradients.

The roofline (CPU): the table's header gives this machine's measured FMA peak (one core's
register-only vector FMAs, times torch's threads) and copy bandwidth (a 128 MB dst.copy_(src)), and each row, pyops' and
torch's alike, its share of both (%peak, %bw). Depthwise is memory-bound: 9 multiply-adds (18 flops)
per output element against 8 bytes moved (its input and output element), about 2 flops a byte, several
times below the machine balance (FMA peak / copy bandwidth: ~14 flops a byte on a 2-core Zen 5), so its
target is the copy bandwidth (%bw). Grouped with 4-8 channels a group (the ResNeXt case: 4) does 72-144
flops per output element for the same 8 bytes, 9-18 flops a byte, about the balance counting memory
traffic alone, and its 6.4 MB planes stay in cache, whose bandwidth is several times the copy
bandwidth: it is compute-bound, and its target is the FMA throughput (%peak).
"""

import torch
import torch.nn.functional as TF

import pyops.functional as PF

from .harness import Case
from .harness import print_table as _print_table

# (label, input shape, out_channels, groups, stride)
CPU_SHAPES = [
    ("resnext_grouped", (16, 128, 28, 28), 128, 32, 1),
    ("depthwise", (16, 64, 56, 56), 64, 64, 1),
    ("depthwise", (32, 256, 14, 14), 256, 256, 1),
]
GPU_SHAPES = [
    ("resnext50_grouped", (32, 128, 56, 56), 128, 32, 1),
    ("resnext50_grouped", (32, 256, 28, 28), 256, 32, 1),
    ("resnext50_grouped", (32, 512, 14, 14), 512, 32, 1),
    ("mobilenetv2_dw", (32, 96, 112, 112), 96, 96, 2),
    ("mobilenetv2_dw", (32, 144, 56, 56), 144, 144, 1),
    ("mobilenetv2_dw", (32, 384, 14, 14), 384, 384, 1),
]
OVERHEAD_SHAPE = (1, 8, 8, 8)
OVERHEAD_CALLS = {True: 50, False: 200}


def _sizes(shape, k, groups, stride):
    n, c, h, w = shape
    oh, ow = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    flops = 2 * n * k * oh * ow * (c // groups) * 9
    return (n, k, oh, ow), flops


def _case(label, shape, k, groups, stride, mode, dtype, device, calls=1, family="conv"):
    out_shape, flops = _sizes(shape, k, groups, stride)
    es = dtype.itemsize
    n_in, n_w, n_out = torch.Size(shape).numel(), k * (shape[1] // groups) * 9, torch.Size(out_shape).numel()
    fwd_bytes = (n_in + n_w + n_out) * es
    min_bytes = fwd_bytes if mode != "fwd+bwd" else fwd_bytes + (2 * n_out + 2 * n_in + 2 * n_w) * es
    kw = {"stride": stride, "padding": 1, "groups": groups}
    compiled = {}

    def fn(impl):
        if impl == "pyops":
            return lambda x, w, b: PF.conv2d(x, w, b, **kw)
        if impl == "eager":
            return lambda x, w, b: TF.conv2d(x, w, b, **kw)
        if "fn" not in compiled:
            torch._dynamo.reset()
            compiled["fn"] = torch.compile(lambda x, w, b: TF.conv2d(x, w, b, **kw), dynamic=False)
        return compiled["fn"]

    def make_inputs():
        grad = mode == "fwd+bwd"
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
        w = torch.randn(k, shape[1] // groups, 3, 3, device=device, dtype=dtype, requires_grad=grad)
        b = torch.randn(k, device=device, dtype=dtype, requires_grad=grad)
        return x, w, b, torch.randn(out_shape, device=device, dtype=dtype)

    def iteration(impl):
        f = fn(impl)
        if mode != "fwd+bwd":  # "fwd" and the overhead's "no_grad"

            def run(x, w, b, g):
                with torch.no_grad():
                    for _ in range(calls):
                        f(x, w, b)

            return run

        def run(x, w, b, g):
            for _ in range(calls):
                torch.autograd.grad(f(x, w, b), (x, w, b), g)

        return run

    def forward(impl):
        return lambda x, w, b, g: fn(impl)(x, w, b)

    overhead = family == "overhead"
    return Case(
        "conv",
        f"{label}" + (f" g={groups}" if not overhead else ""),
        mode,
        shape,
        dtype,
        device,
        0 if overhead else min_bytes,
        make_inputs,
        iteration,
        forward=forward if mode == "fwd+bwd" and not overhead else None,
        flops=None if overhead else flops * (3 if mode == "fwd+bwd" else 1),
        compile_baseline=False,
        references=[("torch eager", "eager")],
        calls=calls,
        threads=1 if overhead and device == "cpu" else None,
        auto=True,
    )


def _conv_bn_case(label, shape, groups, dtype, device):
    """A training step's depthwise/grouped 3x3 -> batch norm -> relu (input, weight and batch norm
    gradients): pyops with the batch statistics gathered in the convolution's epilogue
    (conv2d_stats -> batch_norm_given_stats, what pyops.convert links), pyops as two ops ("unfused"),
    torch eager."""
    k = shape[1]
    out_shape, _ = _sizes(shape, k, groups, 1)
    kw = {"padding": 1, "groups": groups}

    def make_inputs():
        def leaf(*size):
            return torch.randn(size, device=device, dtype=dtype, requires_grad=True)

        stats = (torch.zeros(k, device=device, dtype=dtype), torch.ones(k, device=device, dtype=dtype))
        g = torch.randn(out_shape, device=device, dtype=dtype)
        return (leaf(*shape), leaf(k, shape[1] // groups, 3, 3), leaf(k), leaf(k), *stats, g)

    def iteration(impl):
        def run(x, w, bw, bb, rm, rv, g):
            if impl == "pyops":
                y, mean, var = PF.conv2d_stats(x, w, None, **kw)
                out = PF.batch_norm_given_stats(y, mean, var, rm, rv, bw, bb, activation="relu")
            elif impl == "unfused":
                out = PF.batch_norm(PF.conv2d(x, w, None, **kw), rm, rv, bw, bb, True, activation="relu")
            else:
                out = torch.relu(TF.batch_norm(TF.conv2d(x, w, None, **kw), rm, rv, bw, bb, True))
            torch.autograd.grad(out, (x, w, bw, bb), g)

        return run

    return Case(
        "conv",
        f"{label}+bn+relu g={groups}",
        "fwd+bwd",
        shape,
        dtype,
        device,
        0,
        make_inputs,
        iteration,
        compile_baseline=False,
        references=[("torch eager", "eager")],
        variants=[("native unfused", "unfused", "native")],
        auto=True,
    )


def cases(device, quick=False):
    if device == "cpu":
        shapes, dtypes = CPU_SHAPES, [torch.float32]
    else:
        shapes, dtypes = GPU_SHAPES[:2] + GPU_SHAPES[3:5] if quick else GPU_SHAPES, [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for label, shape, k, groups, stride in shapes:
            for mode in ("fwd", "fwd+bwd"):
                yield _case(label, shape, k, groups, stride, mode, dtype, device)
    # conv -> batch norm in training, the statistics gathered in the convolution's epilogue
    if device == "cpu":
        for label, shape, _, groups, _ in CPU_SHAPES:
            yield _conv_bn_case(label, shape, groups, torch.float32, device)
    # the fixed cost of a call: a tiny depthwise convolution, many calls an iteration
    for mode in ("fwd+bwd", "no_grad"):
        c, calls = OVERHEAD_SHAPE[1], OVERHEAD_CALLS[quick]
        yield _case("overhead", OVERHEAD_SHAPE, c, c, 1, mode, torch.float32, device, calls, family="overhead")


COLUMNS = [
    "op",
    "mode",
    "shape",
    "dtype",
    "backend",
    "median_ms",
    "GFLOP/s",
    "pct_peak",
    "GB/s",
    "pct_copy_bw",
    "vs_eager",
    "saved_MB",
    "peak_MB",
    "median_us",
]
HEADERS = {"pct_peak": "%peak", "pct_copy_bw": "%bw", "median_us": "us/call"}


def print_table(results, file=None):
    """The harness's table with the roofline: GFLOP/s and its share of the FMA peak, GB/s and its share
    of the copy bandwidth (the ceilings in the header line), and microseconds per call where they apply."""
    peaks = sorted({r.peak_gflops for r in results if r.peak_gflops})
    bws = sorted({r.copy_gbps for r in results if r.copy_gbps and r.case.min_bytes})
    if peaks or bws:
        threads = sorted({r.case.threads or torch.get_num_threads() for r in results if r.peak_gflops})
        print(
            "# roofline: FMA peak "
            + (" / ".join(f"{p:.1f}" for p in peaks) or "-")
            + " GFLOP/s (one core's register-only vector FMAs x "
            + "/".join(map(str, threads))
            + " threads), copy bandwidth "
            + (" / ".join(f"{b:.1f}" for b in bws) or "-")
            + " GB/s (read + write)",
            file=file,
        )
    _print_table(results, file=file, columns=COLUMNS, headers=HEADERS)

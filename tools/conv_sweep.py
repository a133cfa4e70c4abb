"""The sweep behind `auto`'s CPU conv2d rule: 3x3 convolutions (padding 1) over channels per group,
plane size, stride, layout and batch, timed native against torch eager (float32, forward alone and
forward+backward, the two interleaved, median of rounds), each row beside what `auto`'s static rule
(`pyops.backend.auto_rule`, csrc/backend.cpp) picks for it. `--markdown` prints the table for
bench/RESULTS.md.

Usage: python tools/conv_sweep.py [--quick] [--markdown] [--repeats N]

A row is "wrong" when the rule hands the call to the side whose forward+backward is more than 10%
slower (training is what `auto` is tuned for; the forward-alone column is for reading). Timings on a
shared machine drift: rerun the rows that sit near 1.0x before moving the rule.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyops.functional as PF
from bench.harness import _in_backend, machine_name, steady_malloc, time_cpu
from pyops.backend import auto_rule

# (batch, channels, plane, channels per group, stride)
FULL = [
    (n, c, hw, cpg, s)
    for cpg in (1, 2, 4, 8)
    for (n, c, hw) in ((16, 64, 56), (16, 128, 28), (32, 256, 14), (64, 256, 7), (4, 32, 28), (1, 16, 14))
    for s in ((1, 2) if cpg == 1 else (1,))
]
QUICK = [(16, 64, 56, 1, 1), (32, 256, 14, 1, 1), (16, 64, 56, 1, 2), (16, 128, 28, 4, 1), (16, 128, 28, 2, 1)]


def measure(n, c, hw, cpg, stride, layout, repeats):
    """(torch's time over native's) forward alone and forward+backward, and the rule's pick."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    groups = c // cpg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(memory_format=fmt).requires_grad_()
    w = torch.randn(c, cpg, 3, 3, generator=g).to(memory_format=fmt).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()
    kw = {"stride": stride, "padding": 1, "groups": groups}
    y = TF.conv2d(x, w, b, **kw)
    grad = torch.randn(y.shape, generator=g).to(memory_format=fmt)

    def fwd(conv):
        def run(x, w, b):
            with torch.no_grad():
                conv(x, w, b, **kw)

        return run

    def train(conv):
        return lambda x, w, b: torch.autograd.grad(conv(x, w, b, **kw), (x, w, b), grad)

    ours_f, torch_f = time_cpu([_in_backend(fwd(PF.conv2d), "native"), fwd(TF.conv2d)], [(x, w, b)], repeats)
    ours_t, torch_t = time_cpu([_in_backend(train(PF.conv2d), "native"), train(TF.conv2d)], [(x, w, b)], repeats)
    pick = auto_rule(
        "conv2d",
        "cpu",
        x.numel(),
        groups=groups,
        in_per_group=cpg,
        kh=3,
        kw=3,
        sh=stride,
        sw=stride,
        out_plane=y.shape[2] * y.shape[3],
        channels_last=layout == "channels_last",
    )
    return torch_f / ours_f, torch_t / ours_t, pick


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="five shapes, NCHW and channels_last")
    ap.add_argument("--markdown", action="store_true", help="a markdown table")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    steady_malloc()
    torch.manual_seed(0)
    rows = []
    for n, c, hw, cpg, stride in QUICK if args.quick else FULL:
        for layout in ("nchw", "channels_last"):
            fwd, train, pick = measure(n, c, hw, cpg, stride, layout, args.repeats)
            winner = "pyops" if train > 1.1 else "torch" if train < 1 / 1.1 else "either"
            ok = "" if winner in ("either", pick) else "wrong"
            rows.append((f"({n}, {c}, {hw}, {hw})", cpg, stride, layout, fwd, train, pick, ok))
            if not args.markdown:
                print(
                    f"{rows[-1][0]:>18} cpg={cpg} s={stride} {layout:>13}  fwd {fwd:5.2f}x  "
                    f"fwd+bwd {train:5.2f}x  auto: {pick:5s} {ok}",
                    flush=True,
                )
    if args.markdown:
        print(
            f"CPU conv2d sweep, {machine_name('cpu')}, float32, torch {torch.__version__}; "
            "torch eager's time over native's.\n"
        )
        print("| input | in/group | stride | layout | fwd | fwd+bwd | auto picks | |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for shape, cpg, stride, layout, fwd, train, pick, ok in rows:
            print(f"| {shape} | {cpg} | {stride} | {layout} | {fwd:.2f}x | {train:.2f}x | {pick} | {ok} |")
    wrong = sum(1 for r in rows if r[-1])
    print(f"\n{len(rows)} rows, {wrong} where auto's pick is >10% slower in training", file=sys.stderr)


if __name__ == "__main__":
    main()

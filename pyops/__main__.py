"""The pyops command line: demo, tour, bench, check, info, tune."""

import argparse
import os
import sys

import torch

from .testing import BENCH_FAMILIES, FAMILIES

DEVICES = ("cpu", "cuda")


def _bench(args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "bench")):
        sys.exit("pyops bench: the bench/ folder of a source checkout is needed (pip install -e .)")
    sys.path.insert(0, root)
    from bench import harness

    families = [args.family] if args.family else list(BENCH_FAMILIES)
    harness.run(
        families,
        args.device,
        args.quick,
        args.out or os.path.join(root, "bench", "out"),
        with_compile=not args.no_compile,
        keep_malloc=args.keep_malloc,
    )


def _tune(args):
    """Fill the autotune cache with a lecture model's shapes: a training step (forward, loss,
    backward) and an evaluation forward under pyops.autotune()."""
    from . import models
    from .autotune import autotune, cache_entries, cache_path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    shape = tuple(args.input_shape)
    model = models.build(args.model, "pyops", input_shape=shape, classes=args.classes).to(device, dtype)
    loss_fn = models.loss_module()
    x = torch.randn(args.batch_size, *shape, device=device, dtype=dtype)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    before = set(cache_entries())
    with autotune():
        model.train()
        for p in model.parameters():
            p.grad = None
        loss_fn(model(x), y).backward()
        model.eval()
        with torch.no_grad():
            model(x)
    model.zero_grad(set_to_none=True)
    entries = cache_entries()
    new = [k for k in entries if k not in before]
    print(
        f"pyops tune: {args.model}, batch {args.batch_size}, input {shape}, {dtype}, {device}: {len(new)} new choices"
    )
    for k in new:
        print(f"  {k} -> {entries[k]}")
    print(f"cache: {cache_path()} ({len(entries)} entries for this machine)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled kernels, backends per device")
    demo = sub.add_parser("demo", help="train a network on the digits with pyops and with torch, and compare")
    from . import demo as demo_job

    demo_job.add_arguments(demo)
    tour = sub.add_parser("tour", help="every op family and optimizer through every backend on digits")
    tour.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")
    check = sub.add_parser(
        "check", help="every op, optimizer, backend and dtype against the float64 oracle; exit 1 on a mismatch"
    )
    check.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")
    check.add_argument("--family", choices=FAMILIES, action="append", help="only this family (repeatable)")
    bench = sub.add_parser("bench", help="microbenchmarks: table, CSV and PNG")
    bench.add_argument("--family", choices=BENCH_FAMILIES, default=None, help="default: all of them")
    bench.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")
    bench.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    bench.add_argument("--out", default=None, help="folder for CSV and PNG (default bench/out)")
    bench.add_argument(
        "--keep-malloc",
        action="store_true",
        help="leave glibc's heap trimming on (CPU timings then swing with page faults)",
    )
    tune = sub.add_parser("tune", help="autotune auto's choices for a model's shapes and store them in the cache")
    from .models import MODELS

    tune.add_argument("--model", choices=list(MODELS), required=True, help="the network (pyops.models)")
    tune.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")
    tune.add_argument("--batch-size", type=int, default=64)
    tune.add_argument("--input-shape", type=int, nargs=3, default=(1, 8, 8), metavar=("C", "H", "W"))
    tune.add_argument("--classes", type=int, default=10)
    tune.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32")
    args = parser.parse_args(argv)

    if str(getattr(args, "device", None)).startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"pyops {args.command}: --device cuda, but no CUDA GPU is visible here")
    if args.command == "info":
        from .info import info

        info()
    elif args.command == "bench":
        _bench(args)
    elif args.command == "tune":
        _tune(args)
    elif args.command == "demo":
        sys.exit(0 if demo_job.main(args) else 1)
    else:
        from . import tour

        ok = tour.tour(args.device) if args.command == "tour" else tour.check(args.device, args.family)
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

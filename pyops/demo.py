"""`python -m pyops demo`: a network trained on the digits twice from the same initialisation and the
same batches, once with pyops modules and pyops.optim.Adam and once with torch modules and
torch.optim.Adam, then compared: test accuracy, macro precision / recall / F1 and per-class recall
(scikit-learn's metrics), final loss, time per epoch and memory.

    python -m pyops demo [--model cnn] [--epochs 15] [--plot FILE.png]
    python -m pyops demo --models all      # k-NN and a linear classifier against the networks
    python -m pyops demo --imbalance       # some classes cut to a tenth, with and without class weights
    python -m pyops demo --transfer        # features learned on digits 0-4 reused for 5-9
    torchrun --nproc-per-node 2 -m pyops demo [--sync-bn]   # DistributedDataParallel (gloo / nccl)

Under torchrun each rank takes its share of every batch (the same global batches as one process),
DistributedDataParallel averages the gradients, and rank 0 evaluates and prints.
"""

import dataclasses
import importlib
import os
import statistics
import sys
import time

import torch
from torch import nn

from . import data as pdata
from . import models as pmodels
from .nn.parallel import DistributedDataParallel  # also importable from here, where it first lived

SIDES = ("pyops", "torch")
# The distribution setup.py installs; its "demo" extra holds the packages the demo imports.
DISTRIBUTION = "pyops-kernels"


@dataclasses.dataclass
class Run:
    """One side's training: its model, the loss of every step (the global batch's, averaged over
    ranks), seconds per epoch, and memory (peak CUDA bytes, or on CPU the bytes one training step
    saves for backward)."""

    side: str
    model: nn.Module
    losses: list
    epoch_seconds: list
    memory: int
    memory_kind: str


# ---- distributed --------------------------------------------------------------------------------------


def world():
    """(rank, world size): from torch.distributed once initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl for CUDA, gloo for CPU) and return
    this rank's device; otherwise return `device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device


def _wrap(model, side, sync_bn):
    """model for this process: with --sync-bn its batch norms synchronised across ranks (pyops' or
    torch's SyncBatchNorm; torch's needs a GPU, so on the CPU torch's side keeps per-rank batch norm),
    and under more than one rank inside DistributedDataParallel."""
    _, size = world()
    if size == 1:
        return model
    device = next(model.parameters()).device
    if sync_bn:
        if side == "pyops":
            from . import nn as pnn

            model = pnn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _share(batch, y, weight):
    """This rank's part of a global batch (index tensor), and the factor that makes the mean of the
    ranks' losses the global batch's loss: a rank's mean cross-entropy is over its own targets'
    weight (their count, or the sum of their class weights), so with shares of unequal weight (the
    last batch of an epoch) each rank's loss is scaled by its share of the global weight, times the
    number of ranks that DistributedDataParallel divides by."""
    rank, size = world()
    if size == 1:
        return batch, 1.0
    parts = batch.tensor_split(size)
    w = [(float(len(p)) if weight is None else float(weight[y[p]].sum())) for p in parts]
    return parts[rank], w[rank] * size / sum(w)


def _mean_over_ranks(value, device):
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / size


# ---- training -------------------------------------------------------------------------------------------


# --state-dtype: the pyops side's Adam states (pyops.optim.Adam's state_dtype)
STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "8bit": "8bit"}


def _optimizer(side, params, lr, state_dtype=None):
    if side == "pyops":
        from . import optim as popt

        return popt.Adam(params, lr=lr, state_dtype=STATE_DTYPES[state_dtype or "float32"])
    return torch.optim.Adam(params, lr=lr)


def _loss(side, weight=None):
    return pmodels.loss_module(side, weight=weight)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model,
    side,
    x,
    y,
    epochs,
    batch_size=64,
    lr=1e-3,
    seed=0,
    weight=None,
    sync_bn=False,
    params=None,
    progress=True,
    desc=None,
    state_dtype=None,
):
    """Train `model` (built from `side`'s modules) on (x, y) with `side`'s Adam and cross-entropy (class
    weights `weight`), the batches drawn from `seed`; only `params` (default: all) are trained. Under
    torchrun each rank takes its share of every batch, and the ranks' losses and gradients combine to
    the global batch's (see _share). state_dtype: the pyops Adam's states ("float32", "bfloat16" or
    "8bit"; see STATE_DTYPES). Returns a Run."""
    device = x.device
    rank, size = world()
    net = _wrap(model, side, sync_bn)
    trained = params if params is not None else [p for p in net.parameters() if p.requires_grad]
    opt = _optimizer(side, trained, lr, state_dtype)
    weight = None if weight is None else weight.to(device)
    loss_fn = _loss(side, weight)
    steps = [pdata.batches(len(y), batch_size, e, seed, device) for e in range(epochs)]
    bar = _progress(sum(map(len, steps)), desc or side, enabled=progress and rank == 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], []
    for epoch in range(epochs):
        net.train()
        _sync(device)
        start = time.perf_counter()
        for batch in steps[epoch]:
            idx, factor = _share(batch, y, weight)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            if factor != 1.0:
                loss = loss * factor
            loss.backward()
            opt.step()
            losses.append(_mean_over_ranks(loss.item(), device))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    bar.close()
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device), "peak CUDA memory"
    else:
        from .info import saved_bytes

        idx = steps[0][0].tensor_split(size)[rank]
        memory, kind = saved_bytes(lambda: loss_fn(net(x[idx]), y[idx])), "saved for backward, one step"
    return Run(side, model, losses, seconds, memory, kind)


def fit(args, model, x, y, desc, side="pyops", **kwargs):
    """train() with the command line's epochs, batch size, learning rate, seed and progress bar."""
    return train(model, side, x, y, args.epochs, args.batch_size, args.lr, args.seed,
                 progress=not args.no_progress, desc=desc, **kwargs)  # fmt: skip


def _progress(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; training does not depend on it
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


# ---- evaluation -----------------------------------------------------------------------------------------


def metrics(model, x, y):
    """scikit-learn's metrics of model on (x, y): accuracy, macro precision / recall / F1, per-class
    recall, and the class probabilities."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, recall_score

    proba = pmodels.predict_proba(model, x).float().cpu()
    pred, truth = proba.argmax(1).numpy(), y.cpu().numpy()
    labels = list(range(proba.shape[1]))
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, pred, labels=labels, average="macro", zero_division=0
    )
    return {
        "accuracy": accuracy_score(truth, pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "per_class_recall": recall_score(truth, pred, labels=labels, average=None, zero_division=0),
        "proba": proba,
    }


def _table(title, rows):
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * max(len(title), width + 20))
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print()


def _side_rows(run, m):
    mib = run.memory / 2**20
    return [
        ("test accuracy", f"{m['accuracy']:.4f}"),
        ("macro precision", f"{m['precision']:.4f}"),
        ("macro recall", f"{m['recall']:.4f}"),
        ("macro F1", f"{m['f1']:.4f}"),
        ("per-class recall", " ".join(f"{c}:{r:.2f}" for c, r in enumerate(m["per_class_recall"]))),
        ("final loss", f"{run.losses[-1]:.4f}"),
        ("time per epoch", f"{statistics.median(run.epoch_seconds) * 1e3:.1f} ms (median of {len(run.epoch_seconds)})"),
        (run.memory_kind, f"{mib:.2f} MiB"),
    ]


def plot(runs, evaluations, y_test, path):
    """Three panels: the loss curves of both sides, and their micro-averaged precision-recall and ROC
    curves on the test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, precision_recall_curve, roc_curve
    from sklearn.preprocessing import label_binarize

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for run in runs:
        axes[0].plot(run.losses, label=run.side, alpha=0.8)
    axes[0].set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    for run, m in zip(runs, evaluations):
        truth = label_binarize(y_test.cpu().numpy(), classes=range(m["proba"].shape[1])).ravel()
        score = m["proba"].numpy().ravel()
        p, r, _ = precision_recall_curve(truth, score)
        fpr, tpr, _ = roc_curve(truth, score)
        axes[1].plot(r, p, label=f"{run.side} (AP area {auc(r, p):.4f})")
        axes[2].plot(fpr, tpr, label=f"{run.side} (AUC {auc(fpr, tpr):.4f})")
    axes[1].set(title="precision-recall (micro-average)", xlabel="recall", ylabel="precision")
    axes[2].set(title="ROC (micro-average)", xlabel="false positive rate", ylabel="true positive rate")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the jobs ---------------------------------------------------------------------------------------------


def compare(args, split):
    """The main job: the model trained on both sides from the same start; a table per side."""
    rank, size = world()
    device = split.x_train.device
    ours, theirs = pmodels.pair(
        args.model, seed=args.seed, input_shape=tuple(split.x_train.shape[1:]), classes=split.classes
    )
    runs, evaluations = [], []
    for side, model in zip(SIDES, (ours, theirs)):
        if args.only and side != args.only:
            continue
        model = model.to(device=device, dtype=args.dtype)
        x = split.x_train.to(args.dtype)
        states = args.state_dtype if side == "pyops" else None
        run = fit(args, model, x, split.y_train, f"{side} {args.model}", side=side, sync_bn=args.sync_bn,
                  state_dtype=states)  # fmt: skip
        if states not in (None, "float32"):
            run.side = f"{side} ({states} Adam states)"
        runs.append(run)
        evaluations.append(metrics(run.model, split.x_test.to(args.dtype), split.y_test))
    if rank == 0:
        where = f"{device}" + (f", {size} processes (DistributedDataParallel)" if size > 1 else "")
        for run, m in zip(runs, evaluations):
            lib = "torch modules, torch.optim.Adam" if run.side == "torch" else "pyops modules, pyops.optim.Adam"
            _table(
                f"{run.side}: {args.model} ({lib}) on {args.data_name}, {args.epochs} epochs, batch "
                f"{args.batch_size}, on {where}",
                _side_rows(run, m),
            )
        if len(runs) == 2:
            a, b = (statistics.median(r.epoch_seconds) for r in runs)
            print(f"time per epoch, pyops / torch: {a / b:.2f}x")
        if args.plot:
            plot(runs, evaluations, split.y_test, args.plot)
            print(f"plot: {args.plot}")
        if args.save:
            torch.save({r.side: {"losses": r.losses, "state": r.model.state_dict()} for r in runs}, args.save)
    return runs, evaluations


def compare_models(args, split):
    """The lectures' comparison: k-NN and a linear classifier (scikit-learn) against the 2-layer,
    3-layer, maxout and convolutional networks (pyops), on the same split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    xtr, xte = split.x_train.flatten(1).cpu().numpy(), split.x_test.flatten(1).cpu().numpy()
    ytr, yte = split.y_train.cpu().numpy(), split.y_test.cpu().numpy()
    rows = []
    for name, clf in (
        ("k-NN (k=3)", KNeighborsClassifier(3)),
        ("linear (logistic regression)", LogisticRegression(max_iter=3000)),
    ):
        start = time.perf_counter()
        pred = clf.fit(xtr, ytr).predict(xte)
        rows.append(
            (name, accuracy_score(yte, pred), f1_score(yte, pred, average="macro"), time.perf_counter() - start)
        )
    for name in ("mlp2", "mlp3", "maxout", "cnn"):
        model = pmodels.build(
            name, "pyops", args.seed, input_shape=tuple(split.x_train.shape[1:]), classes=split.classes
        )
        model = model.to(split.x_train.device)
        start = time.perf_counter()
        run = fit(args, model, split.x_train, split.y_train, name)
        m = metrics(run.model, split.x_test, split.y_test)
        rows.append((name, m["accuracy"], m["f1"], time.perf_counter() - start))
    if world()[0] == 0:
        print(f"models on {args.data_name} ({len(ytr)} training, {len(yte)} test images), {args.epochs} epochs")
        head = f"{'model':<30} {'test accuracy':>13} {'macro F1':>9} {'fit s':>7}"
        print(head)
        print("-" * len(head))
        for name, acc, f1, sec in rows:
            print(f"{name:<30} {acc:13.4f} {f1:9.4f} {sec:7.2f}")
    return rows


def imbalance(args, split, cut=(1, 4, 7)):
    """Classes `cut` reduced to a tenth of their training images, the model trained with and without
    class weights (inverse class frequency) in the loss; per-class recall of both."""
    x, y = pdata.cut_classes(split.x_train, split.y_train, cut, keep=0.1, seed=args.seed)
    counts = torch.bincount(y.cpu(), minlength=split.classes).double()
    weight = (counts.sum() / (split.classes * counts.clamp_min(1))).float()
    results = []
    for label, w in (("no class weights", None), ("class weights", weight)):
        model = pmodels.build(args.model, "pyops", args.seed, input_shape=tuple(x.shape[1:]), classes=split.classes).to(
            x.device
        )
        run = fit(args, model, x, y, label, weight=w)
        results.append((label, metrics(run.model, split.x_test, split.y_test)))
    if world()[0] == 0:
        print(
            f"imbalance: {args.model} on {args.data_name} with classes {', '.join(map(str, cut))} cut to a tenth of "
            f"their training images (counts {counts.long().tolist()}); recall per class on the test set"
        )
        head = f"{'':<18}" + "".join(f"{c:>6}" for c in range(split.classes)) + f"{'macro F1':>10}{'accuracy':>10}"
        print(head)
        print("-" * len(head))
        for label, m in results:
            marks = "".join(f"{r:6.2f}" for r in m["per_class_recall"])
            print(f"{label:<18}{marks}{m['f1']:10.4f}{m['accuracy']:10.4f}")
        print("cut classes:      " + "".join(f"{'^' if c in cut else '':>6}" for c in range(split.classes)))
    return results


def transfer(args, data=None):
    """The CNN's features learned on digits 0-4, frozen, and a new head fitted on 5-9, against the same
    CNN trained from scratch on 5-9 for as many epochs."""
    device = args.device
    source = pdata.split(data, seed=args.seed, classes=range(5), device=device)
    target = pdata.split(data, seed=args.seed, classes=range(5, 10), device=device)
    shape = tuple(source.x_train.shape[1:])
    pre = pmodels.build("cnn", "pyops", args.seed, input_shape=shape, classes=5).to(device)
    fit(args, pre, source.x_train, source.y_train, "pretrain 0-4")
    for p in pre.features.parameters():
        p.requires_grad_(False)
    pre.features.eval()  # frozen: its batch norms keep the statistics learned on 0-4
    pre.features.train = lambda mode=True: pre.features  # stays in eval mode while the head trains
    torch.manual_seed(args.seed + 1)
    head = pre.classifier[-1]
    pre.classifier[-1] = pmodels.kaiming_(nn.Linear(head.in_features, 5)).to(device)
    start = time.perf_counter()
    tuned = fit(args, pre, target.x_train, target.y_train, "head on 5-9", params=list(pre.classifier.parameters()))
    tuned_s = time.perf_counter() - start
    scratch = pmodels.build("cnn", "pyops", args.seed, input_shape=shape, classes=5).to(device)
    start = time.perf_counter()
    fresh = fit(args, scratch, target.x_train, target.y_train, "scratch 5-9")
    fresh_s = time.perf_counter() - start
    rows = [
        ("transfer (frozen 0-4 features, new head)", metrics(tuned.model, target.x_test, target.y_test), tuned_s),
        ("from scratch", metrics(fresh.model, target.x_test, target.y_test), fresh_s),
    ]
    if world()[0] == 0:
        print(f"transfer learning on {args.data_name}: digits 5-9, {args.epochs} epochs each")
        head_line = f"{'':<42}{'test accuracy':>14}{'macro F1':>10}{'fit s':>8}{'trained params':>16}"
        print(head_line)
        print("-" * len(head_line))
        counts = (sum(p.numel() for p in pre.classifier.parameters()), sum(p.numel() for p in scratch.parameters()))
        for (label, m, sec), n in zip(rows, counts):
            print(f"{label:<42}{m['accuracy']:14.4f}{m['f1']:10.4f}{sec:8.2f}{n:16d}")
    return rows


def require_packages(args):
    """Exit with one line naming the package, and the extra that installs it, where one the run needs is
    missing: scikit-learn (the digits, the split, the metrics), matplotlib for --plot. tqdm is optional
    (without it there is no progress bar)."""
    needed = [("sklearn", "scikit-learn", "the digits and the metrics")]
    if args.plot:
        needed.append(("matplotlib", "matplotlib", "--plot"))
    for module, package, use in needed:
        try:
            importlib.import_module(module)
        except ImportError as e:
            if e.name != module:  # installed but broken: its own error says more
                raise
            sys.exit(f'pyops demo: {package} is not installed (needed for {use}): pip install "{DISTRIBUTION}[demo]"')


def main(args):
    """Run the job `args` asks for (see add_arguments); returns whether it ran."""
    require_packages(args)
    args.device = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = getattr(torch, args.dtype)
    data = None
    args.data_name = "scikit-learn digits"
    if args.data:
        data = torch.load(args.data)
        args.data_name = os.path.basename(args.data)
    if args.transfer:
        transfer(args, data)
        return True
    split = pdata.split(data, seed=args.seed, device=args.device)
    if args.models == "all":
        compare_models(args, split)
    elif args.imbalance:
        imbalance(args, split)
    else:
        compare(args, split)
    return True


def add_arguments(parser):
    parser.add_argument("--model", choices=list(pmodels.MODELS), default="cnn", help="the network (default cnn)")
    parser.add_argument("--models", choices=["all"], default=None, help="the lectures' comparison table")
    parser.add_argument("--imbalance", action="store_true", help="classes cut to a tenth, with/without weights")
    parser.add_argument("--transfer", action="store_true", help="features from digits 0-4 reused for 5-9")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--state-dtype", choices=list(STATE_DTYPES), default="float32", help="the pyops side's Adam states"
    )
    parser.add_argument("--data", default=None, help="a torch.save'd (images, labels) pair instead of the digits")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="loss, precision-recall and ROC curves")
    parser.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm across ranks")
    parser.add_argument("--only", choices=SIDES, default=None, help="train one side only")
    parser.add_argument("--save", default=None, help="torch.save the losses and final state of each side here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

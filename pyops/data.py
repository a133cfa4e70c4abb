"""Data for the models and the demo: the digits images bundled with scikit-learn (no download) by
default, or any `(images, labels)` tensors or torchvision-style dataset a user passes.

A split is a `Split(x_train, y_train, x_test, y_test, classes)` of tensors: images as float32
(N, C, H, W), standardised with the training set's mean and standard deviation, labels as int64.
"""

import collections

import torch

Split = collections.namedtuple("Split", "x_train y_train x_test y_test classes")


def as_tensors(data):
    """(images, labels) as tensors from a pair of tensors/arrays or a dataset (indexable, each item an
    (image, label) pair, as torchvision's datasets are). Images get a channel dimension if they have
    none ((N, H, W) -> (N, 1, H, W))."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        images, labels = (torch.as_tensor(v) for v in data)
    else:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise TypeError(
                f"pyops.data: expected (images, labels) or an indexable dataset of (image, label) pairs, "
                f"got {type(data).__name__}"
            )
        items = [data[i] for i in range(len(data))]
        images = torch.stack([torch.as_tensor(item[0]) for item in items])
        labels = torch.as_tensor([int(item[1]) for item in items])
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(
            f"pyops.data: expected images (N, C, H, W) or (N, H, W) and labels (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    return images.float(), labels.long()


def digits():
    """The 1797 8x8 images of handwritten digits bundled with scikit-learn, as (1797, 1, 8, 8) float32
    (pixel values 0..16) and their labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1), torch.as_tensor(d.target, dtype=torch.int64)


def split(data=None, test_fraction=0.25, seed=0, classes=None, device="cpu"):
    """A stratified train/test split of `data` (default: the digits), standardised with the training
    set's statistics. `classes` keeps only those labels, renumbered 0.. in the given order."""
    from sklearn.model_selection import train_test_split

    images, labels = digits() if data is None else as_tensors(data)
    if classes is not None:
        classes = list(classes)
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
        labels = torch.tensor([classes.index(int(v)) for v in labels], dtype=torch.int64)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    train, test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    mean, std = images[train].mean(), images[train].std().clamp_min(1e-12)
    images = (images - mean) / std
    return Split(
        images[train].to(device), labels[train].to(device), images[test].to(device), labels[test].to(device), n_classes
    )


def cut_classes(x, y, classes, keep=0.1, seed=0):
    """x, y with each class in `classes` cut to `keep` of its examples (at least one): an imbalanced
    copy of a training set."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    labels = y.cpu()
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        mask[idx[max(1, int(len(idx) * keep)) :]] = False
    mask = mask.to(y.device)
    return x[mask], y[mask]


def batches(n, batch_size, epoch, seed=0, device="cpu"):
    """The index batches of one epoch: a permutation of range(n) drawn from (seed, epoch), so that two
    runs with the same seed see the same batches in the same order."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).to(device)
    return list(perm.split(batch_size))

"""The lectures' networks, built from `pyops.nn` (lib="pyops") or from plain torch modules
(lib="torch") with the same structure, parameter names and initialisation, so both can be compared:

    model = pyops.models.build("cnn")                  # pyops modules, batch norm + ReLU fused
    ours, theirs = pyops.models.pair("resnext")        # same initial parameters on both sides

Every network takes images (N, C, H, W) (the MLPs flatten them) and returns class logits; softmax
is applied by the loss (cross-entropy) or by `predict_proba`. Initialisation is Kaiming's
(normal, std sqrt(2 / fan) for the ReLU family), batch norm scale 1 and shift 0, biases 0.

    mlp2      flatten -> linear -> ReLU -> linear
    mlp3      flatten -> linear -> ReLU -> linear -> ReLU -> linear
    maxout    flatten -> maxout -> maxout -> linear
    cnn       [conv -> BN -> ReLU -> max-pool] x 2 -> flatten -> linear
    resnext   stem, then bottleneck blocks whose 3x3 convolution is grouped (cardinality 8),
              identity or projected shortcut, then global average pool -> linear
    densenet  stem, dense blocks (each layer BN -> ReLU -> conv, its output concatenated to its
              input), a transition (BN -> ReLU -> 1x1 conv -> avg-pool) between them, pool -> linear
    mobilenet stem, depthwise-separable blocks (3x3 depthwise conv -> BN -> ReLU -> 1x1 conv -> BN
              -> ReLU), pool -> linear
"""

import types

import torch
from torch import nn

__all__ = ["MODELS", "build", "pair", "predict_proba"]


class TorchMaxout(nn.Module):
    """pyops.nn.Maxout's math in plain torch ops (the lib="torch" side): y_j = max_k (W x + b)[j * pieces
    + k]. Same parameters and names as pyops.nn.Maxout."""

    def __init__(self, in_features, out_features, pieces, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.pieces = in_features, out_features, pieces
        self.weight = nn.Parameter(torch.empty(out_features * pieces, in_features))
        self.bias = nn.Parameter(torch.empty(out_features * pieces)) if bias else None

    def forward(self, input):
        z = nn.functional.linear(input, self.weight, self.bias)
        return z.unflatten(-1, (self.out_features, self.pieces)).amax(-1)


def _lib(lib):
    """The module classes a network is built from."""
    if lib == "torch":
        return types.SimpleNamespace(
            Conv2d=nn.Conv2d,
            BatchNorm2d=nn.BatchNorm2d,
            ReLU=nn.ReLU,
            Maxout=TorchMaxout,
            Linear=nn.Linear,
            fuses_residual=False,
        )
    if lib == "pyops":
        from . import nn as pnn

        return types.SimpleNamespace(
            Conv2d=pnn.Conv2d,
            BatchNorm2d=pnn.BatchNorm2d,
            ReLU=pnn.ReLU,
            Maxout=pnn.Maxout,
            Linear=nn.Linear,
            fuses_residual=True,  # a batch norm adds the residual and applies its activation in one pass
        )
    raise ValueError(f"pyops.models: lib must be 'pyops' or 'torch', got {lib!r}")


def _conv_bn_relu(L, cin, cout, kernel=3, stride=1, groups=1, relu=True):
    layers = [
        L.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        L.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, L.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def _features(input_shape):
    c, h, w = input_shape
    return c * h * w


def mlp2(L, input_shape=(1, 8, 8), classes=10, hidden=128):
    return nn.Sequential(nn.Flatten(), L.Linear(_features(input_shape), hidden), L.ReLU(), L.Linear(hidden, classes))


def mlp3(L, input_shape=(1, 8, 8), classes=10, hidden=128):
    return nn.Sequential(
        nn.Flatten(),
        L.Linear(_features(input_shape), hidden),
        L.ReLU(),
        L.Linear(hidden, hidden),
        L.ReLU(),
        L.Linear(hidden, classes),
    )


def maxout(L, input_shape=(1, 8, 8), classes=10, hidden=64, pieces=4):
    return nn.Sequential(
        nn.Flatten(),
        L.Maxout(_features(input_shape), hidden, pieces),
        L.Maxout(hidden, hidden, pieces),
        L.Linear(hidden, classes),
    )


class CNN(nn.Module):
    """[conv 3x3 -> BN -> ReLU -> max-pool 2] x 2 -> flatten -> linear. `features` and `classifier`
    are separate so the features can be frozen and the classifier replaced (transfer learning)."""

    def __init__(self, L, input_shape=(1, 8, 8), classes=10, width=16):
        super().__init__()
        in_channels, h, w = input_shape
        self.features = nn.Sequential(
            *_conv_bn_relu(L, in_channels, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(L, width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), L.Linear(2 * width * (h // 4) * (w // 4), classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class Bottleneck(nn.Module):
    """ResNeXt's block: 1x1 conv -> BN -> ReLU -> grouped 3x3 conv -> BN -> ReLU -> 1x1 conv -> BN, plus
    the shortcut (identity, or 1x1 conv -> BN where the shape changes), then ReLU. With pyops the last
    batch norm adds the shortcut and applies the ReLU itself (relu(bn(h) + shortcut) in one pass)."""

    def __init__(self, L, cin, cout, width, cardinality, stride):
        super().__init__()
        self.reduce = _conv_bn_relu(L, cin, width, kernel=1)
        self.grouped = _conv_bn_relu(L, width, width, stride=stride, groups=cardinality)
        self.expand = _conv_bn_relu(L, width, cout, kernel=1, relu=False)
        self.shortcut = (
            _conv_bn_relu(L, cin, cout, kernel=1, stride=stride, relu=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = L.ReLU(inplace=True)
        self.fused = L.fuses_residual
        if self.fused:
            self.expand[1].activation = "relu"

    def forward(self, x):
        h = self.grouped(self.reduce(x))
        if self.fused:
            conv, bn = self.expand
            return bn(conv(h), residual=self.shortcut(x))
        return self.relu(self.expand(h) + self.shortcut(x))


class ResNeXt(nn.Module):
    def __init__(
        self, L, input_shape=(1, 8, 8), classes=10, stem=32, cardinality=8, stages=((64, 64, 1), (128, 128, 2))
    ):
        super().__init__()
        blocks, cin = [_conv_bn_relu(L, input_shape[0], stem)], stem
        for cout, width, stride in stages:
            blocks.append(Bottleneck(L, cin, cout, width, cardinality, stride))
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), L.Linear(cin, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class DenseLayer(nn.Module):
    """BN -> ReLU -> 3x3 conv giving `growth` channels, concatenated to the input."""

    def __init__(self, L, cin, growth):
        super().__init__()
        self.layer = nn.Sequential(
            L.BatchNorm2d(cin), L.ReLU(inplace=True), L.Conv2d(cin, growth, 3, padding=1, bias=False)
        )

    def forward(self, x):
        return torch.cat([x, self.layer(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, L, input_shape=(1, 8, 8), classes=10, growth=12, layers=(3, 3)):
        super().__init__()
        c = 2 * growth
        blocks = [L.Conv2d(input_shape[0], c, 3, padding=1, bias=False)]
        for i, n in enumerate(layers):
            for _ in range(n):
                blocks.append(DenseLayer(L, c, growth))
                c += growth
            if i + 1 < len(layers):
                blocks.append(
                    nn.Sequential(
                        L.BatchNorm2d(c), L.ReLU(inplace=True), L.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)
                    )
                )
                c //= 2
        blocks += [L.BatchNorm2d(c), L.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), L.Linear(c, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MobileNet(nn.Module):
    """Stem, then depthwise-separable blocks: 3x3 depthwise conv (groups = channels) -> BN -> ReLU ->
    1x1 pointwise conv -> BN -> ReLU."""

    def __init__(self, L, input_shape=(1, 8, 8), classes=10, stem=32, blocks=((64, 1), (128, 2), (128, 1))):
        super().__init__()
        layers, c = [_conv_bn_relu(L, input_shape[0], stem)], stem
        for cout, stride in blocks:
            layers.append(
                nn.Sequential(*_conv_bn_relu(L, c, c, stride=stride, groups=c), *_conv_bn_relu(L, c, cout, kernel=1))
            )
            c = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), L.Linear(c, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {
    "mlp2": mlp2,
    "mlp3": mlp3,
    "maxout": maxout,
    "cnn": CNN,
    "resnext": ResNeXt,
    "densenet": DenseNet,
    "mobilenet": MobileNet,
}


def kaiming_(model):
    """Kaiming's initialisation (normal, std sqrt(2 / fan_in) for linear and maxout layers, fan_out
    for convolutions, as the ReLU family wants), batch norm scale 1 and shift 0, biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.Linear, TorchMaxout)) or type(m).__name__ == "Maxout":
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return model


def build(name, lib="pyops", seed=0, fuse=True, **kwargs):
    """The network `name` (a key of MODELS) built from `lib`'s modules, Kaiming-initialised from
    `seed`. For lib="pyops" with `fuse`, every batch norm directly followed by its activation is one
    fused pyops batch norm (pyops.convert's fusion; parameter names unchanged). Keyword arguments
    go to the network: input_shape (C, H, W) of one image (default the digits' (1, 8, 8)), classes
    (default 10), and its widths."""
    if name not in MODELS:
        raise ValueError(f"pyops.models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    L = _lib(lib)
    torch.manual_seed(seed)
    model = kaiming_(MODELS[name](L, **kwargs))
    if lib == "pyops" and fuse:
        from .convert import convert

        model = convert(model, inplace=True, fuse=True)
    return model


def loss_module(lib="pyops", **kwargs):
    """Cross-entropy as `lib` provides it (softmax and the negative log-likelihood in one)."""
    if lib == "pyops":
        from . import nn as pnn

        return pnn.CrossEntropyLoss(**kwargs)
    return nn.CrossEntropyLoss(**kwargs)


def pair(name, seed=0, **kwargs):
    """(pyops model, torch model) of `name` holding the same initial parameters and buffers."""
    theirs = build(name, "torch", seed, **kwargs)
    ours = build(name, "pyops", seed, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@torch.no_grad()
def predict_proba(model, x, batch_size=512):
    """softmax(model(x)) in eval mode, batch by batch; the model's mode is restored."""
    was = model.training
    model.eval()
    try:
        return torch.cat([torch.softmax(model(b), -1) for b in x.split(batch_size)])
    finally:
        model.train(was)

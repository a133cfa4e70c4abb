"""Activation modules: subclasses of torch's (same constructor, isinstance holds) that run pyops."""

import math

import torch
from torch import nn

from .. import functional as F

__all__ = ["ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Maxout"]


class ReLU(nn.ReLU):
    """torch.nn.ReLU on pyops kernels."""

    def forward(self, input):
        if torch.jit.is_scripting():  # TorchScript calls the op itself (registered in C++)
            return torch.ops.pyops.relu_(input) if self.inplace else torch.ops.pyops.relu(input)
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(nn.LeakyReLU):
    """torch.nn.LeakyReLU on pyops kernels."""

    def forward(self, input):
        if torch.jit.is_scripting():
            if self.inplace:
                return torch.ops.pyops.leaky_relu_(input, self.negative_slope)
            return torch.ops.pyops.leaky_relu(input, self.negative_slope)
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(nn.ELU):
    """torch.nn.ELU on pyops kernels."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyops.elu_(input, self.alpha) if self.inplace else torch.ops.pyops.elu(input, self.alpha)
        return F.elu(input, self.alpha, self.inplace)


class Sigmoid(nn.Sigmoid):
    """torch.nn.Sigmoid on pyops kernels."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyops.sigmoid(input)
        return F.sigmoid(input)


class Tanh(nn.Tanh):
    """torch.nn.Tanh on pyops kernels."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyops.tanh(input)
        return F.tanh(input)


class Maxout(nn.Module):
    """The maxout unit: y_j = max_k (w_{j,k}^T x + b_{j,k}), k < pieces.

    A linear map from in_features to out_features * pieces (row j * pieces + k holds w_{j,k}),
    initialised as torch.nn.Linear, followed by maxout over the last dimension.
    """

    def __init__(self, in_features, out_features, pieces, bias=True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("pieces", pieces)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pyops.nn.Maxout: {name} must be a positive int, got {value!r}")
        if pieces > 256:
            raise ValueError(f"pyops.nn.Maxout: pieces must be at most 256, got {pieces}")
        self.in_features, self.out_features, self.pieces = in_features, out_features, pieces
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features * pieces, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features * pieces, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # as torch.nn.Linear
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        z = torch.nn.functional.linear(input, self.weight, self.bias)
        if torch.jit.is_scripting():
            return torch.ops.pyops.maxout(z, self.pieces, -1)
        return F.maxout(z, self.pieces, dim=-1)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pieces={self.pieces}, "
            f"bias={self.bias is not None}"
        )

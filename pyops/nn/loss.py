"""Loss modules: subclasses of torch's (same constructor and state, isinstance holds) that run pyops,
and RMSELoss."""

import torch
from torch import nn

from .. import functional as F

__all__ = ["L1Loss", "MSELoss", "HuberLoss", "RMSELoss", "CrossEntropyLoss"]


class L1Loss(nn.L1Loss):
    """torch.nn.L1Loss on pyops kernels."""

    def forward(self, input, target):
        if torch.jit.is_scripting():
            # TorchScript calls the op itself (registered in C++), with the reduction's enum
            return torch.ops.pyops.l1_loss(input, target, F._reduction_enum("l1_loss", self.reduction))
        return F.l1_loss(input, target, reduction=self.reduction)


class MSELoss(nn.MSELoss):
    """torch.nn.MSELoss on pyops kernels."""

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return torch.ops.pyops.mse_loss(input, target, F._reduction_enum("mse_loss", self.reduction))
        return F.mse_loss(input, target, reduction=self.reduction)


class HuberLoss(nn.HuberLoss):
    """torch.nn.HuberLoss on pyops kernels."""

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return torch.ops.pyops.huber_loss(
                input, target, F._reduction_enum("huber_loss", self.reduction), self.delta
            )
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class RMSELoss(nn.modules.loss._Loss):
    """Root mean squared error: sqrt(mean((input - target)^2) + eps) (sum: of the sum); reduction
    "none" gives |input - target|. Its gradient is 0 where the loss is 0."""

    def __init__(self, reduction="mean", eps=0.0):
        super().__init__(reduction=reduction)
        self.eps = eps

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return torch.ops.pyops.rmse_loss(input, target, F._reduction_enum("rmse_loss", self.reduction), self.eps)
        return F.rmse_loss(input, target, reduction=self.reduction, eps=self.eps)

    def extra_repr(self):
        return f"reduction={self.reduction}, eps={self.eps}"


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on pyops kernels."""

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return torch.ops.pyops.cross_entropy(
                input,
                target,
                self.weight,
                F._reduction_enum("cross_entropy", self.reduction),
                self.ignore_index,
                self.label_smoothing,
            )
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

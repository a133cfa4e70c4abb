"""Convolution modules: subclasses of torch's (same constructor, parameters and state_dict) that run
pyops, with an optional activation fused into the convolution's epilogue."""

from typing import Optional

import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.modules.utils import _pair

from .. import functional as F

__all__ = ["Conv2d"]


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d on pyops kernels. `activation` (None, "relu", "leaky_relu" or "elu") is applied
    to the output inside the convolution's epilogue. A padding_mode other than "zeros" pads the input
    first (as torch does), then convolves without padding."""

    activation: Optional[str]

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        device=None,
        dtype=None,
        *,
        activation=None,
    ):
        if activation not in F.FUSED_ACTIVATIONS:
            raise ValueError(
                f"pyops.nn.Conv2d: activation must be None, 'relu', 'leaky_relu' or 'elu', got {activation!r}"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.activation = activation

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        if torch.jit.is_scripting():  # TorchScript calls the op itself (registered in C++)
            if self.padding_mode != "zeros":
                padded = TF.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                return torch.ops.pyops.conv2d(
                    padded, weight, bias, self.stride, _pair(0), self.dilation, self.groups, activation=self.activation
                )
            return torch.ops.pyops.conv2d(
                input, weight, bias, self.stride, self.padding, self.dilation, self.groups, activation=self.activation
            )
        if self.padding_mode != "zeros":
            padded = TF.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(
                padded, weight, bias, self.stride, _pair(0), self.dilation, self.groups, activation=self.activation
            )
        return F.conv2d(
            input, weight, bias, self.stride, self.padding, self.dilation, self.groups, activation=self.activation
        )

    def forward(self, input):
        if not torch.jit.is_scripting():
            bn = getattr(self, "_batch_norm", None)
            if bn is not None and bn.training:
                return self._forward_gathering(input, bn)
        return self._conv_forward(input, self.weight, self.bias)

    @torch.jit.unused
    def _forward_gathering(self, input, bn):
        """Linked by pyops.convert to the batch norm `bn` that follows: the epilogue gathers the output's
        batch statistics, which bn uses if it is called on this very output."""
        out, mean, var = F.conv2d_stats(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        bn._given_stats = (out, mean, var)
        return out

    def extra_repr(self):
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation!r}"

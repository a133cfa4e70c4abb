"""pyops optimizers: drop-ins for torch.optim, each step one fused kernel call per (device, dtype) group."""

from .convert import convert
from .fused import SGD, Adagrad, Adam, AdamW, RMSprop, fallback_counts
from .in_backward import StepInBackward, step_in_backward

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "fallback_counts",
    "convert",
    "step_in_backward",
    "StepInBackward",
]

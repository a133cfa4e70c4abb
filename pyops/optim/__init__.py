"""pyops optimizers: drop-ins for torch.optim, each step one fused kernel call per (device, dtype) group."""

from .convert import convert
from .fused import SGD, Adagrad, Adam, Adam8bit, AdamW, AdamW8bit, RMSprop, fallback_counts
from .in_backward import StepInBackward, step_in_backward
from .quantized import dequantized_state_dict

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Adam8bit",
    "AdamW8bit",
    "Adagrad",
    "RMSprop",
    "fallback_counts",
    "convert",
    "step_in_backward",
    "StepInBackward",
    "dequantized_state_dict",
]

"""pyops modules: drop-ins for their torch.nn counterparts."""

from .activation import ELU, LeakyReLU, Maxout, ReLU, Sigmoid, Tanh
from .conv import Conv2d

__all__ = ["ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Maxout", "Conv2d"]

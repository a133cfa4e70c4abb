"""pyops modules: drop-ins for their torch.nn counterparts."""

from .activation import ELU, LeakyReLU, Maxout, ReLU, Sigmoid, Tanh

__all__ = ["ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Maxout"]
from .loss import CrossEntropyLoss, HuberLoss, L1Loss, MSELoss, RMSELoss

__all__ += ["L1Loss", "MSELoss", "HuberLoss", "RMSELoss", "CrossEntropyLoss"]

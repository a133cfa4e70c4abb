"""pyops modules: drop-ins for their torch.nn counterparts."""

from .activation import ELU, LeakyReLU, Maxout, ReLU, Sigmoid, Tanh
from .batch_norm import BatchNorm1d, BatchNorm2d, SyncBatchNorm
from .conv import Conv2d
from .loss import CrossEntropyLoss, HuberLoss, L1Loss, MSELoss, RMSELoss
from .parallel import DistributedDataParallel

__all__ = ["ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Maxout"]
__all__ += ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"]
__all__ += ["Conv2d"]
__all__ += ["L1Loss", "MSELoss", "HuberLoss", "RMSELoss", "CrossEntropyLoss"]
__all__ += ["DistributedDataParallel"]

"""pyops.convert(model): swap torch modules for their pyops drop-ins, in place."""
from torch import nn

from . import nn as pnn


def _activation(m):
    return {
        nn.ReLU: lambda: pnn.ReLU(m.inplace),
        nn.LeakyReLU: lambda: pnn.LeakyReLU(m.negative_slope, m.inplace),
        nn.ELU: lambda: pnn.ELU(m.alpha, m.inplace),
        nn.Sigmoid: lambda: pnn.Sigmoid(),
        nn.Tanh: lambda: pnn.Tanh(),
    }.get(type(m))


def convert(model):
    """Replace every torch module that has a pyops drop-in (exact type match) by it; returns model.
    Parameters and buffers are shared, not copied, and training mode is kept."""
    for name, child in model.named_children():
        make = _activation(child)
        if make is not None:
            new = make()
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert(child)
    return model

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


def _loss(m):
    def cross_entropy():
        new = pnn.CrossEntropyLoss(
            None, ignore_index=m.ignore_index, reduction=m.reduction, label_smoothing=m.label_smoothing
        )
        new.weight = m.weight  # the buffer itself, shared
        return new

    return {
        nn.L1Loss: lambda: pnn.L1Loss(reduction=m.reduction),
        nn.MSELoss: lambda: pnn.MSELoss(reduction=m.reduction),
        nn.HuberLoss: lambda: pnn.HuberLoss(reduction=m.reduction, delta=m.delta),
        nn.CrossEntropyLoss: cross_entropy,
    }.get(type(m))


# What a replacement takes over from the module it replaces: its hooks and flags, as they are.
_CARRIED = (
    "training",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _replacement(m, done):
    """The pyops module standing for m (the same one for every place m is used), or None."""
    if id(m) in done:
        return done[id(m)]
    make = _activation(m)
    if make is None:
        make = _loss(m)
    new = None
    if make is not None:
        new = make()
        for attr in _CARRIED:
            if hasattr(m, attr):
                setattr(new, attr, getattr(m, attr))
    done[id(m)] = new
    return new


def convert(model):
    """Replace every torch module that has a pyops drop-in (exact type match) by it and return the
    model (a replaced root comes back as its replacement). Parameters and buffers are shared, not
    copied; training mode and hooks are kept; a module used at several places becomes one pyops
    module used at the same places."""
    done = {}
    root = _replacement(model, done)
    if root is not None:
        return root
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):  # named_children() skips a repeated child
            new = _replacement(child, done) if child is not None else None
            if new is not None:
                setattr(module, name, new)
    return model

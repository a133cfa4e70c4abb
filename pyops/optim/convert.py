"""pyops.optim.convert(optimizer): a torch optimizer swapped for its pyops drop-in, state included."""

import inspect

from torch import optim

from .fused import SGD, Adagrad, Adam, Adam8bit, AdamW, AdamW8bit, RMSprop

_DROP_INS = {optim.SGD: SGD, optim.Adam: Adam, optim.AdamW: AdamW, optim.Adagrad: Adagrad, optim.RMSprop: RMSprop}
_OURS = (*_DROP_INS.values(), Adam8bit, AdamW8bit)


def convert(optimizer):
    """The pyops optimizer standing for `optimizer` (a torch SGD, Adam, AdamW, Adagrad or RMSprop, exact
    type): the same parameters, param groups and hyper-parameters, and its state (step counts,
    moment buffers) loaded through state_dict, so training continues where it stood. A pyops
    optimizer comes back as it is; any other type raises TypeError."""
    if type(optimizer) in _OURS:
        return optimizer
    cls = _DROP_INS.get(type(optimizer))
    if cls is None:
        names = ", ".join(f"torch.optim.{t.__name__}" for t in _DROP_INS)
        raise TypeError(f"pyops.optim.convert: no pyops drop-in for {type(optimizer).__name__}; have {names}")
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [dict(group) for group in optimizer.param_groups]
    new = cls(groups, **defaults)
    new.load_state_dict(optimizer.state_dict())
    return new

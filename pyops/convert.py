"""pyops.convert(model): swap torch modules for their pyops drop-ins, and fuse a batch norm or
convolution with the activation that directly follows it."""

import copy

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


def _batch_norm(m):
    """A pyops BatchNorm1d/2d or SyncBatchNorm sharing m's parameters and buffers (built on the meta
    device, then given m's tensors; a SyncBatchNorm keeps its process group)."""
    cls = {nn.BatchNorm1d: pnn.BatchNorm1d, nn.BatchNorm2d: pnn.BatchNorm2d, nn.SyncBatchNorm: pnn.SyncBatchNorm}
    cls = cls.get(type(m))
    if cls is None:
        return None

    def make():
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if cls is pnn.SyncBatchNorm:
            args += (m.process_group,)
        new = cls(*args, device="meta")
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        return new

    return make


def _conv(m):
    """torch.nn.Conv2d -> pyops.nn.Conv2d holding the same parameters (no activation)."""
    if type(m) is not nn.Conv2d:
        return None

    def make():
        new = pnn.Conv2d.__new__(pnn.Conv2d)
        new.__dict__.update(m.__dict__)
        new._parameters = type(m._parameters)(m._parameters)  # the same Parameter objects
        new._buffers = type(m._buffers)(m._buffers)
        new._modules = type(m._modules)(m._modules)
        new.activation = None
        return new

    return make


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
    make = _activation(m) or _batch_norm(m) or _conv(m) or _loss(m)
    new = None
    if make is not None:
        new = make()
        for attr in _CARRIED:
            if hasattr(m, attr):
                setattr(new, attr, getattr(m, attr))
    done[id(m)] = new
    return new


def _fusable(m):
    """The (activation, its keyword arguments) a ReLU/LeakyReLU/ELU module computes, else None. A module
    with hooks is left alone: fusing it would hide the value its hooks see."""
    if _has_hooks(m):
        return None
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": m.negative_slope}
    if isinstance(m, nn.ELU):
        return "elu", {"alpha": m.alpha}
    return None


def _has_hooks(m):
    return any(getattr(m, attr, None) for attr in _CARRIED if attr.endswith("hooks"))


def _fuse_into(m, act, kwargs):
    """Give the pyops module m the activation `act` if it has none and can take it; whether it did."""
    if type(m) not in _FUSES_ACTIVATION or _has_hooks(m):
        return False
    if getattr(m, "activation", None) is not None:
        return False
    for k, v in kwargs.items():  # a parameter the module cannot hold must be the kernel's fixed one
        if not hasattr(m, k) and v != _FIXED_PARAMETERS[k]:
            return False
    m.activation = act
    for k, v in kwargs.items():
        if hasattr(m, k):
            setattr(m, k, v)
    return True


# The activation parameters of a fused kernel that takes none (torch's defaults).
_FIXED_PARAMETERS = {"negative_slope": 0.01, "alpha": 1.0}


def _uses(model):
    """How many places (child slots, the root included) hold each module of model, by id."""
    uses = {id(model): 1}
    for module in model.modules():  # each module once, its slots all counted
        for child in module._modules.values():
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1
    return uses


def _links_batch_norm(conv, bn, uses):
    """Whether the pyops Conv2d `conv`, followed by `bn`, gathers bn's batch statistics in its epilogue:
    bn a pyops BatchNorm2d used at one place, neither with hooks, conv with zero padding given as numbers
    and no activation of its own."""
    return (
        type(conv) is pnn.Conv2d
        and type(bn) is pnn.BatchNorm2d
        and uses.get(id(bn), 0) == 1
        and conv.activation is None
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not _has_hooks(conv)
        and not _has_hooks(bn)
    )


def fuse_activations(model):
    """In every nn.Sequential of model whose forward is nn.Sequential's own (its children chained in
    order), a pyops batch norm or convolution directly followed by a ReLU/LeakyReLU/ELU takes the
    activation into its kernel (`activation=...`) and the activation's place becomes nn.Identity, so
    indices and state_dict keys stay the same. A module used at more than one place is left alone (the
    activation would apply at every place), and so is a Sequential subclass with a forward of its own
    (its children need not run in order). A convolution directly followed by a batch norm keeps no
    activation (the batch norm takes it) and is linked to that batch norm: in training, its epilogue
    gathers the output's per-channel mean and variance (pyops.functional.conv2d_stats), which the batch
    norm uses instead of its own pass over the output when it is called on that output (else it computes
    its own). Returns model."""
    uses = _uses(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        if type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            m = seq._modules[first]
            if m is None or uses.get(id(m), 0) != 1:
                continue
            if _links_batch_norm(m, seq._modules[second], uses):
                object.__setattr__(m, "_batch_norm", seq._modules[second])  # not a child: state_dict unchanged
                continue
            act = _fusable(seq._modules[second]) if seq._modules[second] is not None else None
            if act is not None and _fuse_into(m, *act):
                seq._modules[second] = nn.Identity()
    return model


def convert(model, inplace=False, fuse=True):
    """The model with every torch module that has a pyops drop-in (exact type match) replaced by it
    (a replaced root comes back as its replacement); with `fuse`, batch norms and convolutions are
    then fused with the activation that follows them (see `fuse_activations`). With inplace=False (the default)
    the model is deep-copied first; with inplace=True the replacements share the original's
    parameters and buffers, and the model itself is changed. Training mode and hooks are kept; a
    module used at several places becomes one pyops module used at the same places. state_dict keys
    are unchanged either way."""
    if not inplace:
        model = copy.deepcopy(model)
    done = {}
    root = _replacement(model, done)
    if root is not None:
        return root
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):  # named_children() skips a repeated child
            new = _replacement(child, done) if child is not None else None
            if new is not None:
                setattr(module, name, new)
    if fuse:
        fuse_activations(model)
    return model


# pyops modules that take an activation into their kernel (filled in as those families exist).
_FUSES_ACTIVATION = tuple(
    getattr(pnn, name) for name in ("BatchNorm1d", "BatchNorm2d", "SyncBatchNorm", "Conv2d") if hasattr(pnn, name)
)

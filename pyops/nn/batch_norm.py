"""Batch normalization modules: subclasses of torch's (same constructor, parameters, buffers, state_dict
keys and versions, reset_running_stats, repr) running pyops.functional.batch_norm, with two more
keywords: `activation` (None, "relu", "leaky_relu" with `negative_slope`, "elu" with `alpha`) fused
after the normalization (and after `residual`, which forward also takes), and `memory_efficient` (save
the output instead of the input; invertible activations only)."""

import weakref

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as F
from ..ops import PRIMITIVES

__all__ = ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"]


def _check_options(name, activation, negative_slope, alpha, memory_efficient):
    if activation not in F.FUSED_ACTIVATIONS:
        raise ValueError(f"pyops.nn.{name}: activation must be one of {F.FUSED_ACTIVATIONS}, got {activation!r}")
    if memory_efficient:
        invertible = (
            activation is None
            or (activation == "leaky_relu" and negative_slope > 0)
            or (activation == "elu" and alpha > 0)
        )
        if not invertible:
            raise ValueError(
                f"pyops.nn.{name}: memory_efficient=True needs an invertible activation (None, leaky_relu with "
                f"negative_slope > 0, elu with alpha > 0), got activation={activation!r}"
                + (": relu's output cannot be inverted" if activation == "relu" else "")
            )


class _FusedBatchNorm:
    """What BatchNorm1d/2d and SyncBatchNorm add to torch's modules."""

    def _init_fused(self, activation, negative_slope, alpha, memory_efficient):
        _check_options(type(self).__name__, activation, negative_slope, alpha, memory_efficient)
        self.activation = activation
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.memory_efficient = memory_efficient

    def _fused_kwargs(self):
        return {
            "activation": self.activation,
            "negative_slope": self.negative_slope,
            "alpha": self.alpha,
            "memory_efficient": self.memory_efficient,
        }

    def _factor_and_mode(self):
        """torch's _BatchNorm.forward: the running average's factor (and num_batches_tracked counted),
        whether batch statistics are used, and the running buffers to pass. Under torch.compile the
        cumulative average (momentum=None) is "cumulative": its factor 1 / num_batches_tracked is data, not
        a constant to trace (see _cumulative)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = "cumulative" if torch.compiler.is_compiling() else 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return (
            factor,
            bn_training,
            (self.running_mean if use_buffers else None),
            (self.running_var if use_buffers else None),
        )

    def extra_repr(self):
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
            if self.activation == "elu":
                text += f", alpha={self.alpha}"
        if self.memory_efficient:
            text += ", memory_efficient=True"
        return text

    def _cumulative(self, call, running_mean, running_var):
        """call(momentum, mean, var) with the running statistics moved by 1 / num_batches_tracked, a tensor:
        the op sets copies of them to the batch's (momentum 1), then the buffers move toward those (no host
        synchronisation). The op gets the copies, so that what it saves for backward (torch's batch norm
        saves the running statistics) is not changed in place afterwards."""
        batch_mean, batch_var = running_mean.clone(), running_var.clone()
        out = call(1.0, batch_mean, batch_var)
        with torch.no_grad():
            weight = 1.0 / self.num_batches_tracked.to(running_mean.dtype)
            running_mean.lerp_(batch_mean, weight)
            running_var.lerp_(batch_var, weight)
        return out


class _BatchNormMixin(_FusedBatchNorm):
    """BatchNorm1d/2d: torch's constructor (the next class in the MRO) and forward, fused."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        activation=None,
        negative_slope=0.01,
        alpha=1.0,
        memory_efficient=False,
        **kwargs,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self._init_fused(activation, negative_slope, alpha, memory_efficient)

    def forward(self, input, residual=None):
        """act(batch_norm(input) + residual) (see pyops.functional.batch_norm)."""
        self._check_input_dim(input)
        factor, bn_training, running_mean, running_var = self._factor_and_mode()
        # the batch statistics of the convolution linked before it (pyops.convert), for its very output
        given = getattr(self, "_given_stats", None)
        if given is not None:
            self._given_stats = None
            if not (bn_training and given[0] is input and given[1].numel()):  # (empty: torch's convolution)
                given = None

        def call(momentum, running_mean=running_mean, running_var=running_var):
            if given is not None:
                return F.batch_norm_given_stats(
                    input,
                    given[1],
                    given[2],
                    running_mean,
                    running_var,
                    self.weight,
                    self.bias,
                    momentum,
                    self.eps,
                    residual=residual,
                    **self._fused_kwargs(),
                )
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                momentum,
                self.eps,
                residual=residual,
                **self._fused_kwargs(),
            )

        if factor == "cumulative":
            return self._cumulative(call, running_mean, running_var)
        return call(factor)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on pyops kernels, (N, C) or (N, C, L) input; optionally fused with a residual add
    and an activation."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on pyops kernels, (N, C, H, W) input (channels_last kept); optionally fused
    with a residual add and an activation."""


# ---- SyncBatchNorm ---------------------------------------------------------------------------------


def _kernel_backend():
    """The backend whose primitives this thread's selection runs: triton when selected, native otherwise."""
    from ..backend import current

    return "triton" if current() == "triton" else "native"


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch statistics over every rank of a process group: each rank's count, mean and biased variance
    gathered (ranks may hold different batch sizes) and combined, n = sum n_r, mean = sum n_r m_r / n,
    var = sum n_r (v_r + (m_r - mean)^2) / n; backward all-reduces sum(dz) and sum(dz xhat) between its
    reduction and elementwise passes. Weight and bias gradients stay local (DDP reduces them), as torch's.
    The derivative is the C++ node's (csrc/autograd/batch_norm.cpp): the same two backward primitives,
    with the all-reduce between them; the backend is fixed at forward (ctx.backend), so a backward that
    runs on autograd's worker thread, under another selection, still runs the forward's kernels."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, eps, momentum, group, world, kw):
        ctx.backend = _kernel_backend()
        P = PRIMITIVES[ctx.backend]
        mean, var = P["batch_norm_stats"](input)
        c = input.shape[1]
        count = torch.full((1,), input.numel() // max(c, 1), dtype=mean.dtype, device=mean.device)
        local = torch.cat([count, mean, var])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
        counts, means, vars_ = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
        # a rank with an empty batch has no statistics (NaN): it weighs nothing
        means, vars_ = torch.where(counts > 0, means, 0), torch.where(counts > 0, vars_, 0)
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (counts * (vars_ + (means - mean) ** 2)).sum(0) / n
        invstd = (var + eps).rsqrt()
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1)) * momentum).to(running_var.dtype))
        act, param, memory_efficient = kw
        out = P["batch_norm_elemt"](input, mean, invstd, weight, bias, residual, act, param)
        saved_input = None if memory_efficient else input
        saved_output = out if (memory_efficient or act != "none") else None
        saved_residual = residual if memory_efficient else None
        ctx.save_for_backward(saved_input, saved_output, saved_residual, mean, invstd, weight, bias, n)
        # The group by weak reference: the graph lives as long as its outputs, and a strong reference
        # would keep the group, its gloo worker threads and its store alive past destroy_process_group()
        # into interpreter shutdown, where they abort the process.
        ctx.group, ctx.kw = weakref.ref(group), kw
        return out

    @staticmethod
    def backward(ctx, grad):
        P = PRIMITIVES[ctx.backend]
        x, y, r, mean, invstd, weight, bias, n = ctx.saved_tensors
        act, param, _ = ctx.kw
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        kernel_r = need_r and act != "none"
        sum_dz, sum_dz_xhat, dr = P["batch_norm_bwd_reduce"](
            grad, x, y, r, mean, invstd, weight, bias, act, param, kernel_r
        )
        gw = sum_dz_xhat.to(weight.dtype) if need_w and weight is not None else None
        gb = sum_dz.to(bias.dtype) if need_b and bias is not None else None
        gr = (dr if kernel_r else grad) if need_r else None
        gx = None
        if need_x:
            group = ctx.group()
            if group is None:
                raise RuntimeError(
                    "pyops.nn.SyncBatchNorm: backward needs the process group its forward used, which was "
                    "destroyed since (destroy_process_group() before backward)"
                )
            both = torch.cat([sum_dz, sum_dz_xhat])
            dist.all_reduce(both, group=group)
            c = sum_dz.numel()
            gx = P["batch_norm_bwd_elemt"](
                grad, x, y, r, mean, invstd, weight, bias, both[:c] / n, both[c:] / n, act, param
            )
        return gx, gw, gb, gr, None, None, None, None, None, None, None


class SyncBatchNorm(_FusedBatchNorm, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on pyops kernels: in training under an initialized process group of more than
    one rank, statistics are combined across ranks (any device the kernels run on, the CPU with gloo
    included); otherwise it is pyops' BatchNorm. Optionally fused with a residual add and an activation."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        activation=None,
        negative_slope=0.01,
        alpha=1.0,
        memory_efficient=False,
        **kwargs,
    ):
        nn.SyncBatchNorm.__init__(
            self, num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, **kwargs
        )
        self._init_fused(activation, negative_slope, alpha, memory_efficient)

    def forward(self, input, residual=None):
        """act(batch_norm(input) + residual) with statistics over the process group."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor, bn_training, running_mean, running_var = self._factor_and_mode()
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world = dist.get_world_size(group) if bn_training and self.training and group is not None else 1
        if world <= 1:

            def call(momentum, running_mean=running_mean, running_var=running_var):
                return F.batch_norm(
                    input,
                    running_mean,
                    running_var,
                    self.weight,
                    self.bias,
                    bn_training,
                    momentum,
                    self.eps,
                    residual=residual,
                    **self._fused_kwargs(),
                )

            return self._cumulative(call, running_mean, running_var) if factor == "cumulative" else call(factor)
        if factor == "cumulative":  # (traced without syncing: the factor is read here)
            factor = 1.0 / float(self.num_batches_tracked)
        act = self.activation or "none"
        param = self.negative_slope if act == "leaky_relu" else self.alpha if act == "elu" else 0.0
        if (act == "leaky_relu" and param < 0) or (act == "elu" and param < 0):
            raise ValueError(f"pyops.nn.SyncBatchNorm: {act} with a negative parameter ({param}) is not supported")
        return _SyncBatchNormFn.apply(
            input,
            self.weight,
            self.bias,
            residual,
            running_mean,
            running_var,
            self.eps,
            factor,
            group,
            world,
            (act, param, self.memory_efficient),
        )

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every BatchNorm1d/2d/3d (torch's or pyops') of `module` by a pyops SyncBatchNorm sharing
        its parameters and buffers (activation settings carried over); returns the module (or the new one
        when `module` itself is a batch norm)."""
        output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            fused = {}
            if isinstance(module, _FusedBatchNorm):
                fused = {
                    "activation": module.activation,
                    "negative_slope": module.negative_slope,
                    "alpha": module.alpha,
                    "memory_efficient": module.memory_efficient,
                }
            output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                **fused,
            )
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output

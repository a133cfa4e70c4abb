"""DistributedDataParallel that lets pyops' SyncBatchNorm run on the CPU."""

from torch import nn

from .batch_norm import SyncBatchNorm

__all__ = ["DistributedDataParallel"]


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """torch.nn.parallel.DistributedDataParallel, except that it accepts pyops.nn.SyncBatchNorm layers in a
    CPU module.

    Why it exists: torch's constructor refuses a CPU module holding any SyncBatchNorm ("SyncBatchNorm
    layers only work with GPU modules"), by type, because torch's own SyncBatchNorm needs a GPU. pyops'
    SyncBatchNorm subclasses torch's (so isinstance and convert_sync_batchnorm work as users expect) yet
    combines the ranks' statistics through any process group, gloo on the CPU included, so torch's check
    refuses it for nothing.

    What it relies on: torch's constructor calls the private method
    `DistributedDataParallel._passing_sync_batchnorm_handle(module)` for that check (torch 2.6 to 2.14 at
    least). This class overrides it to hand torch every SyncBatchNorm layer except pyops' ones, so torch's
    own SyncBatchNorm is still refused on the CPU. tests/test_models.py fails if torch renames the method,
    stops calling it, or moves the refusal elsewhere.
    """

    def _passing_sync_batchnorm_handle(self, module):
        for layer in module.modules():
            if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm):
                super()._passing_sync_batchnorm_handle(layer)

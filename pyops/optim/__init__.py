"""pyops optimizers (drop-ins for torch.optim): none yet."""
__all__ = []

"""Drop-ins for torch.optim: change the import, keep the rest."""

from pyoptim.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]

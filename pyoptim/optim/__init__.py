"""Drop-ins for torch.optim: change the import, keep the rest."""

from pyoptim.optim.adam import Adam, AdamW
from pyoptim.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]

"""Drop-ins for torch.nn."""

from pyoptim.nn import utils

__all__ = ["utils"]

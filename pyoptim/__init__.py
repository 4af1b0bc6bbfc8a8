"""pyoptim: fused kernels for the optimizer step, as drop-ins for torch.optim.

`torch.optim.AdamW` becomes `pyoptim.optim.AdamW`; `pyoptim.backend_info()`
(or `python -m pyoptim info`) says what was built and what serves each op.
"""

from pyoptim import _backends
from pyoptim._backends import backend_info
from pyoptim import functional, nn, optim, reference
from pyoptim.optim import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "SGD", "backend_info", "functional", "nn", "optim", "reference", "__version__"]

"""pyoptim: fused kernels for the optimizer step, as drop-ins for torch.optim.

`torch.optim.AdamW` becomes `pyoptim.optim.AdamW`; `pyoptim.backend_info()`
(or `python -m pyoptim info`) says what was built and what serves each op.
"""

from pyoptim import _backends
from pyoptim._backends import backend_info
from pyoptim import functional, optim, reference
from pyoptim.optim import Adam, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "backend_info", "functional", "optim", "reference", "__version__"]

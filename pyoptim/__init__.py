"""pyoptim: fused kernels for the optimizer step and the norm layers, as drop-ins for torch.optim and torch.nn.

`torch.optim.AdamW` becomes `pyoptim.optim.AdamW`, `torch.nn.LayerNorm`
becomes `pyoptim.nn.LayerNorm`; `pyoptim.backend_info()`
(or `python -m pyoptim info`) says what was built and what serves each op.
"""

from pyoptim import _backends  # noqa: F401  (loads the extension first, warns once if missing)
from pyoptim._backends import backend_info
from pyoptim import functional, nn, optim, reference
from pyoptim.optim import SGD, Adam, AdamW
from pyoptim.optim import LAMB, Adagrad, Lion, RMSprop

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "SGD", "Lion", "LAMB", "Adagrad", "RMSprop", "backend_info", "functional", "nn",
           "optim", "reference", "__version__"]

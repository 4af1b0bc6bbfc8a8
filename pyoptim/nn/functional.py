"""pyoptim.nn.functional: drop-ins for torch.nn.functional's norms (`F.layer_norm` -> `layer_norm`)."""

from pyoptim.functional import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]

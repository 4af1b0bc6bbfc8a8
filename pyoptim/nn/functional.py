"""pyoptim.nn.functional: drop-ins for torch.nn.functional's norms (`F.layer_norm` -> `layer_norm`)."""

from pyoptim.functional import batch_norm, instance_norm, layer_norm, rms_norm

__all__ = ["batch_norm", "instance_norm", "layer_norm", "rms_norm"]

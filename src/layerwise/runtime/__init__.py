"""The runtime: stages on worker processes, activations and gradients over torch.distributed."""

from layerwise.runtime.pipeline import Pipeline
from layerwise.runtime.transport import PeerError

__all__ = ["PeerError", "Pipeline"]

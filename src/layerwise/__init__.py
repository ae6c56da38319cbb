"""layerwise: layer-wise model parallelism for PyTorch."""

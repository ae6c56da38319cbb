"""Hybrid parallelism: layer-wise stages combined with data and tensor parallelism."""

from layerwise.parallel.mesh import Layout, build_mesh, check_layout, describe_mesh

__all__ = ["Layout", "build_mesh", "check_layout", "describe_mesh"]

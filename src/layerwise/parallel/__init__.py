"""Hybrid parallelism: layer-wise stages combined with data and tensor parallelism."""

from layerwise.parallel.mesh import Grid, build_mesh, check_grid, describe_mesh

__all__ = ["Grid", "build_mesh", "check_grid", "describe_mesh"]

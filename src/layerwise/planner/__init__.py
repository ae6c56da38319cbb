"""Planner: choose data/tensor/pipeline degrees, the layers of each stage, micro-batching,
recomputation, ZeRO and optimizer-state savers for a model on a cluster and a training mode,
predict memory and step time, and explain the choice.

Pure Python; the pipeline bubble comes from the core simulator (layerwise.simulate).
"""

from layerwise.planner.evaluate import Evaluation, check_layout, evaluate
from layerwise.planner.search import Fixed, PlanResult, plan
from layerwise.planner.specs import (
    GPU_PRESETS,
    MODEL_PRESETS,
    ClusterSpec,
    GPUSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    gpu_preset,
    model_preset,
)
from layerwise.planner.stages import SplitRequest, default_split
from layerwise.planner.timing import DEFAULT_CALIBRATION, Calibration

__all__ = [
    "DEFAULT_CALIBRATION",
    "GPU_PRESETS",
    "MODEL_PRESETS",
    "Calibration",
    "ClusterSpec",
    "Evaluation",
    "Fixed",
    "GPUSpec",
    "Layout",
    "ModelSpec",
    "PlanError",
    "PlanResult",
    "SplitRequest",
    "TrainSpec",
    "check_layout",
    "default_split",
    "evaluate",
    "gpu_preset",
    "model_preset",
    "plan",
]

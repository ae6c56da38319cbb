"""Messages matched by tag: receives can be posted early and in any order (gloo)."""

from __future__ import annotations

from layerwise.runtime.transport.base import MAX_TENSORS, Transport


class TagTransport(Transport):
    """Every tensor of every message has a tag of its own, derived from (micro-batch, stage,
    direction, index), so nothing relies on the order in which messages match. gloo honours
    tags; NCCL ignores them, so this transport is for gloo (the CPU) only."""

    name = "tags"

    def _tag(self, stage: int, kind: int, microbatch: int, index: int = 0) -> int:
        if index >= MAX_TENSORS:
            raise ValueError(f"a stage may pass at most {MAX_TENSORS} tensors to the next one")
        return ((microbatch * self.num_streams + stage) * 3 + kind) * MAX_TENSORS + index

"""safetensors files written tensor by tensor, and one layer's tensors read back.

A safetensors file is an 8-byte header length, a JSON header giving each tensor's dtype,
shape and byte range, then the bytes. The header needs only shapes and dtypes, which are
known before any tensor is, so :class:`StreamWriter` writes it first and then each tensor
as it comes: exporting a model never holds more than the tensors in hand (one layer), not
the whole file. Files it writes are read by ``safetensors`` and ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Spec = tuple[str, torch.dtype, tuple[int, ...]]
"""(tensor name, dtype, shape), in the order the tensors will be written."""


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamWriter:
    """Writes one safetensors file whose tensors arrive one at a time, in ``specs`` order."""

    def __init__(self, path: str | Path, specs: list[Spec], metadata: dict[str, str]) -> None:
        self.path, self.specs, self.next = Path(path), specs, 0
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in specs:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}  # fmt: skip
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data on 8 bytes
        self.file: IO[bytes] = self.path.open("wb")
        self.file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the one ``specs`` names next, as described."""
        want, dtype, shape = self.specs[self.next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path.name}: expected {want} {dtype} {shape} next, got {name} "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.file.write(data.view(torch.uint8).reshape(-1).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.specs):
            raise ValueError(
                f"{self.path.name}: {len(self.specs) - self.next} tensors were never written"
            )


def load_prefixed(module: nn.Module, path: str | Path, prefix: str) -> None:
    """Copy into ``module`` the tensors of the safetensors file ``path`` named
    ``prefix + its state-dict names``, reading only those; ValueError names what is missing."""
    from safetensors import safe_open

    state = module.state_dict()
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = [prefix + k for k in state if prefix + k not in names]
        if missing:
            raise ValueError(
                f"{path} has no {', '.join(missing[:4])}; was it exported from a model of "
                f"these sizes?"
            )
        with torch.no_grad():
            for key, tensor in state.items():
                tensor.copy_(f.get_tensor(prefix + key))

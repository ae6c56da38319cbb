"""``layerwise export``: a run's checkpoint out as a model directory others can load.

The checkpoint (layout-free, :mod:`layerwise.job.checkpoints`) is read one pipeline layer at
a time through ``torch.distributed.checkpoint`` in this one process, whatever layout wrote
it (tensor-parallel shards come back whole), and each layer's tensors are written straight
into safetensors files (:mod:`layerwise.models.safetensors_io`) under the model's own names:
at no moment does the process hold more than one layer. A Hugging Face model comes out as
``save_pretrained`` writes it (``config.json``, ``generation_config.json``, weights sharded
with an index above ``--max-shard-size``, the tokenizer's files), for
``AutoModelForCausalLM.from_pretrained``; our GPT as a directory that ``layerwise train
--model``, ``layerwise generate`` and :meth:`Pipeline.from_pretrained` read back.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerwise.job.ckpt_files import newest_good, step_dirs, verify
from layerwise.job.config import TrainConfig, load_config
from layerwise.job.tokenizer import load_tokenizer
from layerwise.models.pretrained import GPT_FIELDS, GPT_TYPE
from layerwise.models.safetensors_io import Spec, StreamWriter, nbytes

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_OF_CONFIG = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
Entry = tuple[str, torch.dtype, tuple[int, ...]]  # (a layer's parameter name, dtype, shape)


def parse_size(text: str) -> int:
    """'5GB', '200MB', '20KB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: give a size such as 5GB, 200MB or 20KB")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}
    return int(float(match[1]) * scale[match[2]])


def choose_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint folder to export: step ``step``, or the newest whole one."""
    ckpt_dir = run_dir / "checkpoints"
    found = dict(step_dirs(ckpt_dir))
    if not found:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint to export (one is saved every --save-interval steps "
            f"and at the end); train it further with 'layerwise train --resume {run_dir}'"
        )
    if step is None:
        choice = newest_good(ckpt_dir)
        if choice.path is None:
            raise ValueError(f"no checkpoint of {run_dir} is whole: {'; '.join(choice.rejected)}")
        return choice.path
    if step not in found:
        raise ValueError(f"--step {step}: {run_dir} has checkpoints of steps {sorted(found)}")
    problem = verify(found[step])
    if problem is not None:
        raise ValueError(f"the checkpoint of step {step} is damaged: {problem}")
    return found[step]


def _layers_in(path: Path) -> dict[int, list[Entry]]:
    """{layer: [(its parameter name, dtype, shape)]} from the checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata  # no group
    layers: dict[int, list[Entry]] = {}
    for key, entry in meta.items():
        if not key.startswith("model."):
            continue
        index, _, local = key.removeprefix("model.").partition(".")
        layers.setdefault(int(index), []).append(
            (local, entry.properties.dtype, tuple(entry.size))  # type: ignore[union-attr]
        )
    return dict(sorted(layers.items()))


def _read_layer(path: Path, index: int, names: list[Entry]) -> dict[str, torch.Tensor]:
    """Layer ``index``'s tensors from the checkpoint, whole (one process, no group)."""
    import torch.distributed.checkpoint as dcp

    state = {f"{index}.{n}": torch.empty(shape, dtype=dtype) for n, dtype, shape in names}
    with warnings.catch_warnings():  # "assuming ... a single process": it is one, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(path))
    return state


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    max_shard_size: int = 5_000_000_000,
    dtype: str | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Write the run's checkpoint (step ``step``, or the newest) as a model directory in
    ``out_dir``; ``dtype`` (fp32 | bf16 | fp16) of the floating tensors, by default the one
    the run's starting weights had (fp32 for fresh ones). Return ``out_dir``."""
    run, out = Path(run_dir), Path(out_dir)
    cfg = load_config(run)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; export into a new or empty directory")
    ckpt = choose_checkpoint(run, step)
    family = cfg.family()
    hf = cfg.model.startswith("hf")
    target = DTYPE_NAMES[dtype or _default_dtype(cfg, family)]
    layers = _layers_in(ckpt)
    rename, skip = _names(cfg, family)
    specs: list[tuple[int, str, Spec]] = []
    for index, names in layers.items():
        for local, dt, shape in names:
            name = rename(f"{index}.{local}")
            if name in skip:
                continue
            kept = target if dt.is_floating_point else dt
            specs.append((index, local, (name, kept, shape)))
    shards = _cut(specs, max_shard_size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    writers = [StreamWriter(tmp / f, [s for _, _, s in shard], {"format": "pt"})
               for f, shard in zip(files, shards, strict=True)]  # fmt: skip
    where = {local_key: w for w, shard in zip(writers, shards, strict=True)
             for local_key in ((i, n) for i, n, _ in shard)}  # fmt: skip
    for index, names in layers.items():
        tensors = _read_layer(ckpt, index, names)  # one layer in memory, then written out
        for local, _, _ in names:
            key = (index, local)
            if key in where:
                name = rename(f"{index}.{local}")
                t = tensors[f"{index}.{local}"]
                where[key].write(name, t.to(target) if t.is_floating_point() else t)
        del tensors
    for w in writers:
        w.close()
    if len(files) > 1:
        total = sum(nbytes(dt, shape) for _, _, (_, dt, shape) in specs)
        weight_map = {s[0]: f for f, shard in zip(files, shards, strict=True)
                      for _, _, s in shard}  # fmt: skip
        (tmp / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))  # fmt: skip
    _write_config(cfg, family, tmp, target, hf)
    if cfg.tokenizer is not None:
        load_tokenizer(cfg.tokenizer).save(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    size = sum(nbytes(dt, shape) for _, _, (_, dt, shape) in specs)
    say(f"layerwise export: {ckpt.name} of {run} -> {out} ({len(files)} safetensors "
        f"file{'s' * (len(files) > 1)}, {size / 1e6:.1f} MB, {_DTYPE_NAME[target]})")  # fmt: skip
    return out


_DTYPE_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def _default_dtype(cfg: TrainConfig, family: Any) -> str:
    if cfg.weights is None or not cfg.model.startswith("hf"):
        return "fp32"
    saved = getattr(family.config, "dtype", None) or getattr(family.config, "torch_dtype", None)
    return _DTYPE_OF_CONFIG.get(str(saved).removeprefix("torch."), "fp32")


def _names(cfg: TrainConfig, family: Any) -> tuple[Callable[[str], str], set[str]]:
    """(pipeline name -> the model's name, names left out): a Hugging Face head tied to the
    embedding is saved once, as save_pretrained does."""
    if not cfg.model.startswith("hf"):
        return (lambda name: name), set()
    skip = set()
    for _, _, dst, dst_name in family.tied_parameters():
        skip.add(family.model_name(f"{dst}.{dst_name}"))
    return family.model_name, skip


def _cut(specs: list[tuple[int, str, Spec]], limit: int) -> list[list[tuple[int, str, Spec]]]:
    """Consecutive shards of at most ``limit`` bytes (a larger tensor gets its own)."""
    shards: list[list[tuple[int, str, Spec]]] = [[]]
    size = 0
    for item in specs:
        n = nbytes(item[2][1], item[2][2])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def _write_config(cfg: TrainConfig, family: Any, out: Path, dtype: torch.dtype, hf: bool) -> None:
    if not hf:
        sizes = {key: getattr(family.config, field) for key, field in GPT_FIELDS.items()}
        data = {"model_type": GPT_TYPE, **sizes, "dtype": _DTYPE_NAME[dtype]}
        (out / "config.json").write_text(json.dumps(data, indent=2))
        return
    import transformers

    config = family.config
    config.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                    torch.float16: "float16"}[dtype]  # fmt: skip
    if not getattr(config, "architectures", None):
        from layerwise.models.hf_weights import skeleton

        config.architectures = [type(skeleton(family.source)).__name__]  # built on meta
    config.save_pretrained(str(out))
    source = Path(cfg.weights or "", "generation_config.json")
    if cfg.weights is not None and source.exists():
        shutil.copy(source, out / "generation_config.json")
    else:
        transformers.GenerationConfig.from_model_config(config).save_pretrained(str(out))

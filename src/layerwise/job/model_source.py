"""``--model PATH``: a model directory in, the run's settings out.

A ``save_pretrained`` directory (or its ``config.json``) names its architecture; a supported
one becomes the ``hf:<type>`` family with the directory's configuration, its weights (each
worker later reads only its own stages' tensors) and its tokenizer, and the run records the
model's real sizes. A directory that ``layerwise export`` wrote from our own GPT is read the
same way. Everything is checked here, before any worker starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerwise.job.tokenizer import has_tokenizer
from layerwise.models.family import FAMILIES
from layerwise.models.pretrained import GPT_FIELDS, GPT_TYPE

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_path(model: str) -> bool:
    """Whether ``--model`` names a path rather than a registered family."""
    return model not in FAMILIES and (
        "/" in model or model.endswith(".json") or Path(model).exists()
    )


def supported_types() -> list[str]:
    return sorted(name.removeprefix("hf:") for name in FAMILIES if name.startswith("hf:"))


def read_model_config(path: Path) -> tuple[Path, dict[str, Any]]:
    """(the config.json, its contents) of a model directory or file; ValueError otherwise."""
    if not path.exists():
        raise ValueError(f"--model {str(path)!r} does not exist; give a save_pretrained directory")
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise ValueError(
            f"--model {str(path)!r} is not a save_pretrained directory: it holds no "
            f"config.json; give the directory that save_pretrained (or layerwise export) wrote"
        )
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not a JSON configuration ({err})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(
            f"{config} has no model_type, so its architecture is unknown; write it with "
            f"save_pretrained"
        )
    return config, data


def has_weights(directory: Path) -> bool:
    return directory.is_dir() and any((directory / f).exists() for f in WEIGHT_FILES)


def resolve(given: dict[str, Any]) -> dict[str, Any]:
    """Return the flags of a run with ``--model PATH`` (or ``--hf-config DIR``) turned into a
    family name, its configuration, weights, tokenizer and sizes. Flags the user gave win
    over what the directory says, except the sizes, which are the model's."""
    out = dict(given)
    model = str(out.get("model") or "gpt")
    if is_path(model):
        path = Path(model).resolve()
        config, data = read_model_config(path)
        directory = path if path.is_dir() else path.parent
        model_type = data["model_type"]
        if model_type == GPT_TYPE:
            out["model"] = "gpt"
            out.update({k: data[k] for k in GPT_FIELDS if k in data and k != "seq_len"})
            out.setdefault("seq_len", data.get("seq_len"))  # a --seq-len given wins
        elif f"hf:{model_type}" in FAMILIES:
            out["model"] = f"hf:{model_type}"
            out["hf_config"] = str(config)
        else:
            raise ValueError(
                f"--model {model}: architecture {model_type!r} is not supported; supported: "
                f"{', '.join(supported_types())} (or {GPT_TYPE}, exported by layerwise)"
            )
        if path.is_dir():
            if has_weights(path):
                out["weights"] = str(path)
            elif list(path.glob("pytorch_model*.bin")):
                raise ValueError(
                    f"--model {model} holds only pytorch_model.bin weights; save the model "
                    f"with safetensors (save_pretrained's default) and give that directory"
                )
        if out.get("tokenizer") is None and has_tokenizer(directory):
            out["tokenizer"] = str(directory)
    elif out.get("hf_config") is not None:
        config_path = Path(out["hf_config"]).resolve()
        config, _ = read_model_config(config_path)
        out["hf_config"] = str(config)
        directory = config.parent
        if has_weights(directory):
            print(
                f"layerwise train: --hf-config takes only the sizes of {directory}, which "
                f"also holds weights; to start from them, give --model {directory}",
                flush=True,
            )
        if out.get("tokenizer") is None and has_tokenizer(directory):
            out["tokenizer"] = str(directory)
    if out.get("hf_config") is not None and out.get("seq_len") is None:
        out["seq_len"] = _default_length(Path(out["hf_config"]))
    if out.get("tokenizer") is not None:
        out["tokenizer"] = str(Path(out["tokenizer"]).resolve())
    if out.get("seq_len") is None:
        out.pop("seq_len", None)
    return out


def _default_length(config: Path) -> int:
    """The job's default sequence length, or the model's context when that is shorter."""
    from layerwise.job.config import TrainConfig

    data = json.loads(config.read_text())
    limit = data.get("max_position_embeddings") or data.get("n_positions")
    return min(TrainConfig.seq_len, int(limit)) if limit else TrainConfig.seq_len


def hf_sizes(config: Any) -> dict[str, Any]:
    """The job's size fields of a Hugging Face configuration, for config.json."""
    return {
        "layers": int(config.num_hidden_layers),
        "d_model": int(config.hidden_size),
        "heads": int(config.num_attention_heads),
        "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }

"""Worker functions for the multi-process tests of Hugging Face models and of the runtime's
safety nets (module level, so spawn can import them).

Each function runs many cases inside one process group and returns plain data: for every
case, the list of what differs from the single-process reference (empty when all matches).
Every worker builds the same tiny models from the same seed; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from torch import nn

import layerwise as lw
from layerwise.models.hf import hf_family

VOCAB, ROWS, LENGTH = 128, 8, 8
SCHEDULES = ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b")
SMALL = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": VOCAB,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def tiny_config(kind: str, blocks: int = 4) -> Any:
    """A small configuration of ``kind``; sliding windows shorter than the sequence, so that
    the sliding-window masks differ from the causal ones."""
    auto = transformers.AutoConfig.for_model
    if kind == "gpt2":  # tied embeddings, learned positions
        return auto(
            "gpt2",
            n_embd=32,
            n_layer=blocks,
            n_head=4,
            n_positions=32,
            vocab_size=VOCAB,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=True,
            **NO_DROPOUT,
        )
    extra: dict[str, Any] = {
        "mistral": {"sliding_window": 4},
        "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
        "gemma2": {"sliding_window": 4, "head_dim": 8, "query_pre_attn_scalar": 8},
        "phi3": {"resid_pdrop": 0.0, "embd_pdrop": 0.0},
    }.get(kind, {})
    return auto(kind, num_hidden_layers=blocks, **SMALL, **extra)


def build_model(config: Any, seed: int = 0) -> nn.Module:
    """The same model on every worker: built from ``config`` after seeding."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def batch(padded: bool, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(inputs, labels) of ROWS x LENGTH tokens; padded: rows of different lengths, padded on
    the right or the left, labels -100 on the pads (so micro-batches count different tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    if padded:
        for row, length in enumerate([8, 5, 8, 3, 6, 8, 2, 7]):
            mask[row] = 0
            if row % 3 == 1:
                mask[row, LENGTH - length :] = 1
            else:
                mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def reference(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, **options: Any
) -> tuple[float, dict[str, torch.Tensor]]:
    """The model's own loss and gradients (on a copy), by the model's parameter names."""
    ref = copy.deepcopy(model)
    loss = ref(**inputs, labels=labels, **options).loss
    loss.backward()
    named = ref.named_parameters(remove_duplicate=False)  # a tied head by its own name too
    return loss.item(), {n: p.grad.clone() for n, p in named if p.grad is not None}


def compare(
    pipe: lw.Pipeline, family: Any, loss: float, ref_loss: float, ref_grads: dict[str, torch.Tensor]
) -> list[str]:
    """What differs from the reference: loss, and every gradient this worker holds, each
    within 1e-5 of the reference relative to the largest entry of that gradient."""
    errors = []
    if abs(loss - ref_loss) > 1e-5 * abs(ref_loss):
        errors.append(f"loss {loss} != {ref_loss}")
    for name, p in pipe.named_parameters():
        expected = ref_grads[family.model_name(name)]
        if p.grad is None:
            errors.append(f"{name}: no gradient")
            continue
        scale = float(expected.abs().max())
        try:
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-5 * scale)
        except AssertionError as err:
            errors.append(f"{name}: {str(err).splitlines()[0]}")
    return errors


def run_case(model: nn.Module, schedule: str, padded: bool) -> list[str]:
    """One pipeline step of ``model`` (a fresh copy) against the model's own."""
    inputs, labels = batch(padded)
    ref_loss, ref_grads = reference(model, inputs, labels)
    mine = copy.deepcopy(model)
    pipe = lw.Pipeline.from_hf(mine, schedule=schedule, microbatches=4)
    loss = pipe.train_step(inputs if pipe.is_first else None, labels if pipe.is_last else None)
    return compare(pipe, hf_family(mine), loss, ref_loss, ref_grads)


def hf_equivalence(rank: int, world: int, kinds: list[str], blocks: int) -> dict[str, Any]:
    """Every model kind x schedule x padding; returns case -> errors."""
    torch.set_num_threads(1)  # workers share few cores: more threads only contend
    results: dict[str, Any] = {}
    for kind in kinds:
        model = build_model(tiny_config(kind, blocks))
        for schedule in SCHEDULES:
            for padded in (False, True):
                case = f"{kind} {schedule} {'padded' if padded else 'full'}"
                results[case] = run_case(model, schedule, padded)
    return results


def checkpoint_cases(rank: int, world: int, directories: list[str]) -> dict[str, Any]:
    """Each save_pretrained directory loaded stage by stage against from_pretrained: the loss,
    the gradients, which layers this worker materialized and which tensors it read."""
    results: dict[str, Any] = {}
    for directory in directories:
        pipe, built, read = _recorded_build(directory)
        family = hf_family(directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        inputs, labels = batch(padded=True)
        ref_loss, ref_grads = reference(model, inputs, labels)
        loss = pipe.train_step(inputs if pipe.is_first else None, labels if pipe.is_last else None)
        own = sorted(
            i
            for st in pipe.stages.values()
            for i in range(st.first_layer, st.first_layer + len(st.layers))
        )
        # save_pretrained keeps a tied head as the token embedding: the head reads that
        head, embedding = f"{family.num_layers - 1}.head.weight", "0.tokens.weight"
        tied = {family.model_name(head): family.model_name(embedding)}
        tied = tied if family.tied_parameters() else {}
        wanted = {tied.get(n, n) for n in map(family.model_name, dict(pipe.named_parameters()))}
        results[Path(directory).name] = {
            "errors": compare(pipe, family, loss, ref_loss, ref_grads),
            "built": sorted(built) == own,
            "read": sorted(set(read)) == sorted(wanted),
            "own_params": sum(p.numel() for p in pipe.parameters()),
            "all_params": sum(p.numel() for p in model.parameters()),
        }
    return results


def _recorded_build(directory: str) -> tuple[lw.Pipeline, list[int], list[str]]:
    """Return (the pipeline of a checkpoint, the layers it materialized, the tensors it read)."""
    import safetensors

    from layerwise.models import hf_weights

    built: list[int] = []
    read: list[str] = []
    real_open, real_materialize = safetensors.safe_open, hf_weights.materialize

    def recording_materialize(layer: Any, source: Any, index: int, device: Any) -> Any:
        built.append(index)
        return real_materialize(layer, source, index, device)

    safetensors.safe_open = _recording_open(real_open, read)
    hf_weights.materialize = recording_materialize
    try:
        return lw.Pipeline.from_hf(directory, schedule="1f1b", microbatches=4), built, read
    finally:
        safetensors.safe_open, hf_weights.materialize = real_open, real_materialize


def _recording_open(real_open: Any, read: list[str]) -> Any:
    class Recording:
        """safe_open that notes every tensor read."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self.inner.__exit__(*exc)

        def keys(self) -> Any:
            return self.file.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.file.get_tensor(name)

    return Recording


def packed_batch(length: int, seed: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Documents of different lengths packed into ROWS rows of ``length`` tokens, no padding:
    position ids restart at 0 where a document begins, and the first token of each document
    is not predicted from the one before (label -100), as packing data loaders do."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (ROWS, length), generator=gen)
    pos = torch.zeros(ROWS, length, dtype=torch.long)
    labels = ids.clone()
    for row in range(ROWS):
        start = 0
        while start < length:
            size = int(torch.randint(2, length, (1,), generator=gen))
            pos[row, start : start + size] = torch.arange(min(size, length - start))
            if start:
                labels[row, start] = -100
            start += size
    return {"input_ids": ids, "position_ids": pos}, labels


def length_cases(rank: int, world: int, kinds: list[str]) -> dict[str, list[str]]:
    """One pipeline per family through steps of other lengths and kinds of batch: packed
    documents, no mask, padded; each step against the model's own loss and gradients.

    The model runs with ``use_cache=False``: with a cache (its default, even in training)
    Hugging Face's forward skips the document masks of packed rows, so documents would
    attend to each other; a pipeline has no cache and keeps each document to itself."""
    torch.set_num_threads(1)
    results: dict[str, list[str]] = {}
    for kind in kinds:
        model = build_model(tiny_config(kind))
        mine = copy.deepcopy(model)
        pipe = lw.Pipeline.from_hf(mine, schedule="1f1b", microbatches=2)
        family = hf_family(mine)
        plain = {"input_ids": torch.randint(0, VOCAB, (ROWS, 5))}
        steps = [("packed 16", packed_batch(16)), ("plain 5", (plain, plain["input_ids"])),
                 ("padded 8", batch(True)), ("packed 12", packed_batch(12, seed=3))]  # fmt: skip
        for name, (inputs, labels) in steps:
            ref_loss, ref_grads = reference(model, inputs, labels, use_cache=False)
            pipe.zero_grad()
            loss = pipe.train_step(inputs if pipe.is_first else None,
                                   labels if pipe.is_last else None)  # fmt: skip
            results[f"{kind} {name}"] = compare(pipe, family, loss, ref_loss, ref_grads)
    return results


def replica_cases(rank: int, world: int) -> list[str]:
    """Two data-parallel replicas (one worker each) whose halves of a padded batch count
    different numbers of tokens: their gradients and the mean of their losses equal the
    model's over the whole batch (every token counts once, wherever it was)."""
    import torch.distributed as dist

    from layerwise.parallel.data import GradReducer

    model = build_model(tiny_config("llama"))
    inputs, labels = batch(padded=True)
    ref_loss, ref_grads = reference(model, inputs, labels)
    own = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    mine = copy.deepcopy(model)
    pipe = lw.Pipeline.from_hf(mine, microbatches=2, group=own[rank],
                               grad_reducer=GradReducer(dist.group.WORLD))  # fmt: skip
    cuts = [0, 2, ROWS]  # 2 rows and 6: the replicas' batches differ in rows and tokens
    rows = slice(cuts[rank], cuts[rank + 1])
    loss = pipe.train_step({k: v[rows] for k, v in inputs.items()}, labels[rows])
    both = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(both)
    errors = compare(pipe, hf_family(mine), float(both) / world, ref_loss, ref_grads)
    counted = [int((labels[cuts[r] : cuts[r + 1], 1:] != -100).sum()) for r in range(world)]
    if counted[0] == counted[1]:
        errors.append(f"the halves count the same tokens ({counted}): the case tests nothing")
    return errors


def tensor_parallel_cases(rank: int, world: int, blocks: int) -> dict[str, list[str]]:
    """Llama on 2 pipeline stages x 2 tensor-parallel ranks, with 1F1B (padded or not), ZB-H1
    and interleaved 1F1B: the loss and every gradient (sharded ones gathered) against the
    model's own."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("pp", "tp"))
    model = build_model(tiny_config("llama", blocks))
    results: dict[str, list[str]] = {}
    cases = [("1f1b", False), ("1f1b", True), ("zb-h1", True), ("interleaved-1f1b", False)]
    for schedule, padded in cases:
        inputs, labels = batch(padded)
        ref_loss, ref_grads = reference(model, inputs, labels)
        mine = copy.deepcopy(model)
        family = hf_family(mine)
        pipe = lw.Pipeline.from_hf(
            mine, schedule=schedule, microbatches=4, group=mesh.get_group("pp"),
            parallelize=lambda i, m, f=family: f.parallelize(i, m, mesh["tp"]),
        )  # fmt: skip
        loss = pipe.train_step(inputs if pipe.is_first else None,
                               labels if pipe.is_last else None)  # fmt: skip
        for _, p in pipe.named_parameters():  # the whole of every sharded gradient
            if p.grad is not None and hasattr(p.grad, "full_tensor"):
                p.grad = p.grad.full_tensor()
        errors = compare(pipe, family, loss, ref_loss, ref_grads)
        sharded = [n for n, p in pipe.named_parameters() if hasattr(p, "full_tensor")]
        if not sharded:
            errors.append("no parameter was sharded")
        results[f"tp2 {schedule} {'padded' if padded else 'full'}"] = errors
    return results


def tied_cases(rank: int, world: int, blocks: int) -> dict[str, list[str]]:
    """GPT-2, whose head is tied to the token embedding, on ``world`` stages: the tied copies
    sit on the first and the last worker."""
    torch.set_num_threads(1)
    model = build_model(tiny_config("gpt2", blocks))
    cases = [("gpipe", True), ("1f1b", False), ("zb-h1", True), ("interleaved-1f1b", False)]
    return {f"gpt2 {s} {'padded' if padded else 'full'}": run_case(model, s, padded)
            for s, padded in cases}  # fmt: skip


def four_worker_cases(rank: int, world: int) -> dict[str, Any]:
    """Llama on four workers: four pipeline stages, then two stages x two tensor-parallel;
    and GPT-2 with its tied embedding and head on four stages."""
    return {
        "pipeline": hf_equivalence(rank, world, ["llama"], 6),
        "tensor parallel": tensor_parallel_cases(rank, world, 6),
        "tied": tied_cases(rank, world, 6),
    }


def two_worker_cases(rank: int, world: int, kinds: list[str], directories: list[str]) -> dict:
    """Everything the two-worker tests check, in one process group."""
    return {
        "equivalence": hf_equivalence(rank, world, kinds, blocks=4),
        "checkpoints": checkpoint_cases(rank, world, directories),
        "lengths": length_cases(rank, world, kinds),
        "replicas": replica_cases(rank, world),
    }

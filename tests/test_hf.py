"""Hugging Face decoders through Pipeline.from_hf and the hf:* model families: the pipeline's
loss and every gradient against the model's own, for several architectures, schedules and
worker counts, padded or not; checkpoints read stage by stage; the layers' own errors; and
the command line's use of the families. Nothing is downloaded: configurations are tiny and
checkpoints are written here."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # before any model code runs (spawned workers inherit it)

import torch
import transformers
from torch import nn

import _hf_workers as hw
import layerwise as lw
from layerwise.job.launcher import run_workers
from layerwise.models.family import get_family
from layerwise.models.hf import HFDecoderFamily, HFLlamaFamily, hf_family, label_tokens
from layerwise.models.hf_layers import Parts, check_block, find_parts, mask_kind
from layerwise.parallel.mesh import Grid

KINDS = ["gpt2", "llama", "mistral", "qwen2", "gemma2", "phi3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A sharded Llama and a single-file GPT-2 with tied embeddings, by save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    llama, gpt2 = root / "llama-sharded", root / "gpt2-tied"
    hw.build_model(hw.tiny_config("llama"), seed=5).save_pretrained(llama, max_shard_size="20KB")
    hw.build_model(hw.tiny_config("gpt2"), seed=6).save_pretrained(gpt2)
    assert (llama / "model.safetensors.index.json").exists()
    assert (gpt2 / "model.safetensors").exists()
    return [str(llama), str(gpt2)]


@pytest.fixture(scope="module")
def two_workers(checkpoints: list[str]) -> list[dict[str, Any]]:
    """One spawn of two workers for every two-worker case."""
    return run_workers(hw.two_worker_cases, 2, KINDS, checkpoints, timeout_s=240)


@pytest.mark.timeout(400)
def test_every_architecture_and_schedule_matches_the_model_on_two_workers(
    two_workers: list[dict[str, Any]],
) -> None:
    cases = [k for k in two_workers[0]["equivalence"]]
    assert len(cases) == len(KINDS) * len(hw.SCHEDULES) * 2
    for rank, res in enumerate(two_workers):
        for case in cases:
            assert res["equivalence"][case] == [], f"worker {rank}, {case}"


@pytest.mark.timeout(400)
def test_checkpoints_are_read_stage_by_stage(two_workers: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(two_workers):
        for name, got in res["checkpoints"].items():
            assert got["errors"] == [], f"worker {rank}, {name}: {got['errors']}"
            assert got["built"], f"worker {rank}, {name}: materialized another worker's layers"
            assert got["read"], f"worker {rank}, {name}: read tensors of another worker"
            assert got["own_params"] < got["all_params"]


@pytest.mark.timeout(400)
def test_llama_on_four_workers_matches_the_model() -> None:
    """Four stages, then two stages of two tensor-parallel ranks, then GPT-2's tied
    embedding and head on the first and last of four workers, in one process group."""
    results = run_workers(hw.four_worker_cases, 4, timeout_s=300)
    for rank, res in enumerate(results):
        assert len(res["pipeline"]) == len(hw.SCHEDULES) * 2
        assert len(res["tensor parallel"]) == len(res["tied"]) == 4
        for part in ("pipeline", "tensor parallel", "tied"):
            for case, errors in res[part].items():
                assert errors == [], f"worker {rank}, {case}: {errors}"


def test_layers_built_from_a_configuration_are_initialized_as_the_model_does() -> None:
    config = hw.tiny_config("gpt2")
    pipe = lw.Pipeline.from_hf(config, microbatches=2)
    params = {n: p.detach() for n, p in pipe.named_parameters()}
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    std = config.initializer_range
    assert abs(float(params["1.block.attn.c_attn.weight"].std()) - std) < 0.2 * std
    scaled = std / (2 * config.n_layer) ** 0.5  # GPT-2's residual projections
    assert abs(float(params["1.block.attn.c_proj.weight"].std()) - scaled) < 0.3 * scaled
    assert torch.equal(params["1.block.ln_1.weight"], torch.ones(32))
    # the head is tied to the token embedding: one Parameter on one worker
    assert pipe.stages[0].layers[-1].head.weight is pipe.stages[0].layers[0].tokens.weight
    inputs, labels = hw.batch(padded=True)
    assert torch.isfinite(torch.tensor(pipe.train_step(inputs, labels)))


def test_a_tensor_left_uninitialized_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from layerwise.models import hf_weights

    family = HFLlamaFamily(hw.tiny_config("llama", blocks=2))
    monkeypatch.setattr(hf_weights.skeleton(family.source), "_init_weights", lambda m: None)
    with pytest.raises(
        ValueError,
        match=r"layer 0: the model's _init_weights left "
        r"'tokens.weight' unset \(no checkpoint was given\)",
    ):
        lw.Pipeline(family.layers(), loss_fn=family.loss_fn)


def test_models_that_do_not_fit_are_refused_naming_what_is_missing() -> None:
    model = hw.build_model(hw.tiny_config("llama", blocks=2))
    model.model.extra = nn.Linear(2, 2)
    with pytest.raises(
        ValueError,
        match=r"'model.extra' \(Linear\).*cannot place.*"
        r"subclass of layerwise.models.hf.HFDecoderFamily that overrides find_parts",
    ):
        find_parts(model)

    class NeedsMore(nn.Module):
        def forward(self, hidden_states: Any, attention_mask: Any, cross_states: Any) -> Any:
            return hidden_states

    with pytest.raises(ValueError, match=r"NeedsMore.forward does not fit.*cross_states"):
        check_block(NeedsMore(), rotary=True)
    gemma3 = transformers.Gemma3TextConfig(num_hidden_layers=2, **hw.SMALL)
    needs = r"Gemma3RotaryEmbedding.forward also needs layer_type"
    with pytest.raises(ValueError, match=needs), pytest.warns(UserWarning, match="gemma3_text"):
        lw.Pipeline.from_hf(hw.build_model(gemma3))
    with pytest.raises(ValueError, match=r"'chunked_attention' attention"):
        mask_kind(argparse.Namespace(layer_types=["chunked_attention"]), 0)
    with pytest.raises(
        ValueError,
        match=r"hf:llama family got a configuration of model_type "
        r"'gpt2'; use hf:gpt2",
    ):
        HFLlamaFamily(hw.tiny_config("gpt2"))
    with pytest.warns(UserWarning, match="has not checked 'qwen3'"):
        HFDecoderFamily(transformers.Qwen3Config(num_hidden_layers=2, **hw.SMALL))
    with pytest.raises(ValueError, match=r"cohere models apply \{'logit_scale': 0.0625\}"):
        HFDecoderFamily(transformers.CohereConfig(num_hidden_layers=2, **hw.SMALL))


class NeoXFamily(HFDecoderFamily):
    """GPT-NeoX, which the default layout does not know, described in a few lines."""

    @classmethod
    def find_parts(cls, model: Any) -> Parts:
        base = "gpt_neox"
        return Parts(
            embed=f"{base}.embed_in",
            blocks=f"{base}.layers",
            head="lm_head",
            norm=f"{base}.final_layer_norm",
            dropout=f"{base}.emb_dropout",
            rotary=f"{base}.rotary_emb",
        )


def test_a_family_subclass_describes_a_model_the_default_cannot_place() -> None:
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, **hw.SMALL)
    model = hw.build_model(config)
    with pytest.raises(
        ValueError,
        match=r"GPTNeoXForCausalLM: found no final norm; .*"
        r"Pipeline.from_hf\(..., family=YourFamily\)",
    ):
        find_parts(model)
    inputs, labels = hw.batch(padded=True)
    ref_loss, ref_grads = hw.reference(model, inputs, labels)
    with pytest.warns(UserWarning, match="has not checked 'gpt_neox'"):
        pipe = lw.Pipeline.from_hf(model, family=NeoXFamily, schedule="1f1b", microbatches=4)
        names = hf_family(model, family=NeoXFamily)
    loss = pipe.train_step(inputs, labels)
    assert hw.compare(pipe, names, loss, ref_loss, ref_grads) == []
    with pytest.warns(UserWarning):  # from the configuration: layers cut from the meta model
        pipe = lw.Pipeline.from_hf(config, family=NeoXFamily, microbatches=2)
    assert pipe.train_step(inputs, labels) > 0


def test_registry_and_builtin_configurations() -> None:
    for kind in KINDS:
        family = get_family(f"hf:{kind}", seq_len=16, d_model=32, n_layers=2, n_heads=4)
        assert isinstance(family, HFDecoderFamily) and family.num_layers == 4
        assert family.config.vocab_size == 256 and family.config.model_type == kind
        assert family.describe_layers() == f"2 {kind} blocks plus the embedding and the head"
        family.check(Grid(1, 4, 1), world=4)
        if kind in ("gpt2", "phi3"):  # fused projections: refused before anything starts
            with pytest.raises(ValueError, match="splits Llama's separate projections"):
                family.check(Grid(1, 2, 2))
        else:
            family.check(Grid(1, 2, 2))
            with pytest.raises(ValueError, match=r"--tp 3 does not divide .* \(4\)"):
                family.check(Grid(1, 1, 3))
    tied = get_family("hf:gpt2", n_layers=2, tie_embeddings=True)
    assert tied.tied_parameters() == [(0, "tokens.weight", 3, "head.weight")]
    assert tied.model_name("1.block.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert tied.model_name("3.head.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="needs config="):
        get_family("hf")
    with pytest.raises(ValueError, match=r"no option \['heads'\]"):
        get_family("hf:llama", heads=4)
    assert label_tokens(torch.tensor([[5, 6, -100], [-100, 7, 8]])) == 3


def test_sample_layer_and_parameter_counts_need_no_whole_model() -> None:
    family = get_family("hf:llama", seq_len=16, d_model=32, n_layers=3, n_heads=4)
    layer, x = family.sample_layer(2)
    assert layer(x).shape == x.shape == (2, 16, 32)
    counts = family.parameter_counts()  # layers built on the meta device: no memory
    model = transformers.AutoModelForCausalLM.from_config(family.config)
    assert sum(counts) == sum(p.numel() for p in model.parameters())


def _train_args(*flags: str) -> argparse.Namespace:
    from layerwise.cli import build_parser

    base = [
        "train",
        "--workers",
        "2",
        "--layers",
        "2",
        "--d-model",
        "32",
        "--heads",
        "4",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--microbatches",
        "2",
    ]
    return build_parser().parse_args([*base, *flags])


def test_the_train_command_builds_hf_families(tmp_path: Path) -> None:
    from layerwise.cli.train import config_from_args

    cfg, resume = config_from_args(_train_args("--model", "hf:llama"))
    assert not resume and cfg.model == "hf:llama"
    family = cfg.family()
    assert isinstance(family, HFLlamaFamily) and family.num_layers == 4
    config_file = tmp_path / "gpt2.json"
    gpt2 = hw.tiny_config("gpt2", blocks=3)
    gpt2.vocab_size = 256
    config_file.write_text(gpt2.to_json_string())
    cfg, _ = config_from_args(_train_args("--model", "hf:gpt2", "--hf-config", str(config_file)))
    assert cfg.hf_config == str(config_file.resolve())
    assert cfg.family().num_layers == 5 and "hf_config" in cfg.architecture()
    bad = [
        (("--model", "gpt", "--hf-config", str(config_file)), "--hf-config is for the Hugging"),
        (("--model", "hf:llama", "--hf-config", str(config_file)), "use hf:gpt2"),
        (
            ("--model", "hf:gpt2", "--hf-config", str(config_file), "--seq-len", "64"),
            r"--seq-len 64 is longer than the model's max_position_embeddings \(32\)",
        ),
        (
            ("--model", "hf:gpt2", "--tp", "2", "--workers", "1", "--microbatches", "1"),
            "GPT2Block has no self_attn.q_proj",
        ),
        (
            (
                "--model",
                "hf:nope",
            ),
            "unknown model family 'hf:nope'",
        ),
    ]
    for flags, message in bad:
        with pytest.raises(ValueError, match=message):
            config_from_args(_train_args(*flags))


def test_a_job_family_trains_and_samples_bytes_in_one_process() -> None:
    from layerwise.job.config import TrainConfig

    cfg = TrainConfig(model="hf:qwen2", workers=1, layers=2, d_model=32, heads=4, seq_len=16)
    family = cfg.family()
    pipe = lw.Pipeline(
        family.layers(),
        microbatches=2,
        loss_fn=family.loss_fn,
        tied=family.tied_parameters(),
        loss_reduction=family.loss_reduction(),
    )
    text = torch.frombuffer(
        bytearray(b"layer-wise pipelines, byte by byte. " * 4), dtype=torch.uint8
    )
    tokens = text.long()[: 4 * 17].view(4, 17)
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = pipe.train_step(x, family.lm_targets(x, y))
    assert abs(loss - torch.log(torch.tensor(256.0)).item()) < 0.5  # about uniform at start
    logits = pipe.forward(x[:2, :5])  # what 'layerwise generate' asks of the last worker
    assert logits.shape == (2, 5, 256)


def test_config_json_is_what_the_job_saves(tmp_path: Path) -> None:
    from layerwise.job.config import TrainConfig, load_config

    cfg = TrainConfig(model="hf:mistral", hf_config=None, run_dir=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg.__dict__))
    assert load_config(tmp_path).family().config.model_type == "mistral"


@pytest.mark.timeout(400)
def test_packed_documents_and_changing_lengths_match_the_model(
    two_workers: list[dict[str, Any]],
) -> None:
    for rank, res in enumerate(two_workers):
        cases = res["lengths"]
        assert len(cases) == len(KINDS) * 4
        for case, errors in cases.items():
            assert errors == [], f"worker {rank}, {case}: {errors}"


def test_packed_rows_keep_each_document_to_itself() -> None:
    """Packing is not a no-op: the same tokens in one long document give another loss."""
    model = hw.build_model(hw.tiny_config("llama"))
    inputs, labels = hw.packed_batch(16)
    pipe = lw.Pipeline.from_hf(model, microbatches=2)
    packed = pipe.evaluate(inputs, labels)
    whole = pipe.evaluate({"input_ids": inputs["input_ids"]}, labels)
    assert abs(packed - whole) > 1e-4


@pytest.mark.timeout(400)
def test_replicas_count_tokens_not_batches(two_workers: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(two_workers):
        assert res["replicas"] == [], f"worker {rank}: {res['replicas']}"


def test_a_sequence_longer_than_learned_positions_says_so() -> None:
    model = hw.build_model(hw.tiny_config("gpt2"))  # 32 positions
    pipe = lw.Pipeline.from_hf(model, microbatches=1)
    ids = torch.randint(0, hw.VOCAB, (2, 40))
    with pytest.raises(RuntimeError, match="40 tokens is longer than the model's 32 positions"):
        pipe.train_step(ids, ids)

"""Turbo LoRA and Turbo: Medusa heads start as the LM head, learn within examples only, train with
(or on top of a frozen) LoRA, publish loadable files and resume exactly."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from training_support import TINY, Recorder, crash_and_resume, make_config, number_rows
from transformers import AutoModelForCausalLM, PreTrainedModel

from worker.training import speculator
from worker.training.base_models import resolve_base_model
from worker.training.batches import pack
from worker.training.config import TrainingConfig
from worker.training.data import IGNORE_INDEX, Example
from worker.training.loop import TrainingResult, train
from worker.training.speculator import MedusaHeads, SpeculatorConfig


def turbo_config(**overrides: Any) -> TrainingConfig:
    # These tests are about Medusa heads; the EAGLE-style draft (the default) has test_eagle_draft.py.
    return make_config(
        **({"adapter": "turbo_lora", "train_steps": 8, "speculator_architecture": "medusa"} | overrides)
    )


@pytest.fixture(scope="module")
def base(tiny_cache: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_base_model(TINY, tiny_cache)).eval()
    assert isinstance(model, PreTrainedModel)
    return model


@pytest.fixture(scope="module")
def turbo_lora_run(
    tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingResult, Recorder]:
    recorder = Recorder()
    out = tmp_path_factory.mktemp("turbo-lora")
    result = train(turbo_config(), number_rows(), output_dir=out, cache_dir=tiny_cache, callbacks=recorder)
    return result, recorder


# --- the heads ------------------------------------------------------------------------------------


def test_zero_initialised_heads_are_the_lm_head_at_the_start(base: PreTrainedModel) -> None:
    heads = MedusaHeads(SpeculatorConfig(hidden_size=base.config.hidden_size, num_heads=3))
    input_ids = torch.tensor([[1, 5, 9, 13, 17]])  # [1, S]
    lm_head = base.get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Module)
    with torch.no_grad():
        out = base(input_ids)
        hidden = base.get_decoder()(input_ids).last_hidden_state  # [1, S, H]
        for k in range(3):
            assert torch.equal(heads.head_logits(k, hidden, lm_head), out.logits.float())


def two_examples() -> list[Example]:
    first = Example(input_ids=[3, 4, 5, 6], labels=[IGNORE_INDEX, 4, 5, 6])
    second = Example(input_ids=[7, 8, 9, 10, 11], labels=[IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11])
    return [first, second]


def test_head_targets_never_cross_a_packed_boundary() -> None:
    batch = pack(two_examples())
    segments = speculator.segment_ids(batch.targets.shape, batch.cu_seq_lens, batch.targets.device)
    assert segments.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]
    # Head 0 at t predicts the token at t + 2, within t's example only.
    assert speculator.head_targets(batch.targets, segments, 0).tolist() == [
        [5, 6, IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11, IGNORE_INDEX, IGNORE_INDEX]
    ]
    assert speculator.head_targets(batch.targets, segments, 1).tolist() == [
        [6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    ]


def test_head_loss_of_a_packed_row_is_the_sum_of_its_examples_alone(base: PreTrainedModel) -> None:
    heads = MedusaHeads(SpeculatorConfig(hidden_size=base.config.hidden_size, num_heads=3))
    torch.manual_seed(0)
    for block in heads.heads:  # not the identity, so that each head's targets matter differently
        torch.nn.init.normal_(block.linear.weight, std=0.1)
    lm_head = base.get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Module)
    first, second = two_examples()
    hidden = torch.randn(1, 9, base.config.hidden_size)  # [1, T, H]: one packed row of both

    def loss(examples: list[Example], states: torch.Tensor, *, boundaries: bool = True) -> float:
        batch = pack(examples)
        cu = batch.cu_seq_lens if boundaries else None
        segments = speculator.segment_ids(batch.targets.shape, cu, batch.targets.device)
        stats = speculator.head_losses(heads, states, lm_head, batch.targets, segments)
        return float(speculator.weighted_sum(stats, heads.config.loss_weights))

    packed = loss([first, second], hidden)
    alone = loss([first], hidden[:, :4]) + loss([second], hidden[:, 4:])
    assert packed == pytest.approx(alone, rel=1e-6)
    # Ignoring the boundary, the first example's last positions would learn the second's tokens.
    assert loss([first, second], hidden, boundaries=False) > packed + 1e-3


# --- training -------------------------------------------------------------------------------------


def test_turbo_lora_trains_the_lora_and_the_heads(turbo_lora_run: tuple[TrainingResult, Recorder]) -> None:
    result, recorder = turbo_lora_run
    assert result.steps == 8 and result.adapter_dir is not None
    assert recorder.losses()[-1] < recorder.losses()[0] - 0.5
    lora = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())
    heads = load_file(result.adapter_dir / "speculator.safetensors")
    assert len([k for k in heads if k.endswith("linear.weight")]) == 3
    assert all(v.abs().max() > 0 for k, v in heads.items() if k.endswith("linear.weight"))
    # The draft vocabulary: the few distinct tokens the completions use ("The number is N." + EOS), not
    # the tokenizer's whole vocabulary.
    vocab = heads["draft_vocab"].tolist()
    assert vocab == sorted(set(vocab)) and 4 <= len(vocab) <= 40


def test_the_draft_vocabulary_keeps_the_most_frequent_targets_and_skips_ignored_positions() -> None:
    rows = [[IGNORE_INDEX, IGNORE_INDEX, 7, 7, 3], [IGNORE_INDEX, 7, 3, 9, 11], [5, 5, 5, 3, 9]]
    # counts: 3→3, 5→3, 7→3, 9→2, 11→1; ties broken by id; the result is sorted by id.
    assert speculator.frequent_tokens(rows, limit=3).tolist() == [3, 5, 7]
    assert speculator.frequent_tokens(rows, limit=4).tolist() == [3, 5, 7, 9]
    assert speculator.frequent_tokens([[IGNORE_INDEX]]).tolist() == []


def test_turbo_lora_artifact_loads_and_the_summary_reports_the_heads(
    turbo_lora_run: tuple[TrainingResult, Recorder], base: PreTrainedModel
) -> None:
    result, _ = turbo_lora_run
    assert result.adapter_dir is not None
    names = {path.name for path in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "speculator.safetensors",
            "speculator_config.json", "training_summary.json"} <= names  # fmt: skip
    config = SpeculatorConfig.load(result.adapter_dir)
    assert config.num_heads == 3 and config.hidden_size == base.config.hidden_size and config.format == 1
    heads = MedusaHeads(config)
    heads.load(result.adapter_dir)
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    assert summary["adapter_type"] == "turbo_lora"
    spec = summary["speculator"]
    assert len(spec["head_top1_accuracy"]) == 3 and all(0 <= a <= 1 for a in spec["head_top1_accuracy"])
    assert spec["head_top1_accuracy"][0] > 0.2  # the number rows are very predictable
    assert spec["estimated_accepted_length"] >= 1.0
    assert spec["loss_weights"] == pytest.approx([1.0, 0.8, 0.64])


def test_training_alone_measures_nothing_and_hands_back_held_out_prompts(
    turbo_lora_run: tuple[TrainingResult, Recorder],
) -> None:
    # Timing the heads in the serving engine is the worker's job (worker.artifact_checks), not the library's.
    result, _ = turbo_lora_run
    assert result.adapter_dir is not None
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    assert "measured" not in summary["speculator"] and "measured" not in result.summary["speculator"]
    assert 1 <= len(result.held_out_prompts) <= min(result.data.eval_rows, 8)
    assert (result.model_dir / "config.json").is_file()


def test_speculator_config_tolerates_unknown_keys(tmp_path: Path) -> None:
    SpeculatorConfig(hidden_size=8, num_heads=2).save(tmp_path)
    raw = json.loads((tmp_path / "speculator_config.json").read_text())
    (tmp_path / "speculator_config.json").write_text(json.dumps(raw | {"from_the_future": 1}))
    assert SpeculatorConfig.load(tmp_path) == SpeculatorConfig(hidden_size=8, num_heads=2)


def test_turbo_on_the_base_trains_only_the_heads(tiny_cache: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    config = make_config(adapter="turbo", train_steps=6, speculator_heads=2, speculator_architecture="medusa")
    result = train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    assert result.adapter_dir is not None
    names = {path.name for path in result.adapter_dir.iterdir()}
    assert names == {"speculator.safetensors", "speculator_config.json", "training_summary.json"}
    assert recorder.losses()[-1] < recorder.losses()[0]
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    assert summary["adapter_type"] == "turbo" and summary["method"]["frozen_parent_adapter"] is False
    heads = 2 * (64 * 64 + 64)  # tiny-random-llama's hidden size is 64
    assert summary["method"]["trainable_parameters"] == heads


def test_turbo_on_a_lora_leaves_the_lora_bit_identical(
    lora_dir: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    config = make_config(
        adapter="turbo", train_steps=4, speculator_distill=True, speculator_architecture="medusa"
    )
    result = train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, init_from=lora_dir)
    assert result.adapter_dir is not None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (result.adapter_dir / name).read_bytes() == (lora_dir / name).read_bytes()
    heads = load_file(result.adapter_dir / "speculator.safetensors")
    assert all(v.abs().max() > 0 for k, v in heads.items() if k.endswith("linear.weight"))
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    assert summary["method"]["frozen_parent_adapter"] is True and summary["speculator"]["distill"] is True


def test_self_distilled_heads_learn_the_models_own_tokens_not_the_datasets(
    tiny_cache: Path, tmp_path: Path
) -> None:
    # The random tiny model's greedy tokens are not the dataset's, so the two targets pull apart.
    def heads_after(distill: bool) -> dict[str, Any]:
        config = make_config(adapter="turbo", train_steps=40, learning_rate=3e-2, speculator_heads=1,
                             speculator_architecture="medusa",
                             speculator_distill=distill)  # fmt: skip
        result = train(config, number_rows(), output_dir=tmp_path / str(distill), cache_dir=tiny_cache)
        return result.summary["speculator"]

    dataset, distilled = heads_after(False), heads_after(True)
    assert dataset["head_top1_accuracy"][0] > dataset["head_top1_agreement"][0] + 0.3
    assert distilled["head_top1_agreement"][0] > distilled["head_top1_accuracy"][0] + 0.3


def test_turbo_on_a_lora_resumes_from_its_own_checkpoint_as_the_worker_does(
    lora_dir: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    config = make_config(adapter="turbo", train_steps=4, checkpoint_every_n_steps=2, speculator_heads=2,
                         speculator_architecture="medusa")  # fmt: skip
    straight = Recorder()
    train(config, number_rows(), output_dir=tmp_path / "a", cache_dir=tiny_cache, callbacks=straight,
          init_from=lora_dir)  # fmt: skip
    crashed = Recorder(crash_at_checkpoint=2)
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        train(config, number_rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache, callbacks=crashed,
              init_from=lora_dir)  # fmt: skip
    checkpoint = tmp_path / "b" / "checkpoints" / "step-2"
    resumed = Recorder()
    # worker/tasks.py resumes a continued run from its checkpoint alone: it is also the parent.
    result = train(config, number_rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache, callbacks=resumed,
                   resume_from=checkpoint, init_from=checkpoint)  # fmt: skip
    assert crashed.losses() + resumed.losses() == pytest.approx(straight.losses(), abs=1e-6)
    assert result.adapter_dir is not None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (result.adapter_dir / name).read_bytes() == (lora_dir / name).read_bytes()


def test_turbo_resume_from_a_checkpoint_continues_exactly(tiny_cache: Path, tmp_path: Path) -> None:
    config = turbo_config(train_steps=6, checkpoint_every_n_steps=3, lora_dropout=0.1, speculator_heads=2)
    run = crash_and_resume(config, number_rows(), tmp_path, tiny_cache, at=3)
    assert (tmp_path / "b" / "checkpoints" / "step-3" / "speculator.safetensors").is_file()
    assert run.crashed.losses() + run.resumed.losses() == pytest.approx(run.straight.losses(), abs=1e-6)
    for name in ("adapter_model.safetensors", "speculator.safetensors"):
        want, got = load_file(tmp_path / "a" / "adapter" / name), load_file(tmp_path / "b" / "adapter" / name)
        assert want.keys() == got.keys()
        assert all(torch.allclose(want[k], got[k], atol=1e-6, rtol=0) for k in want)


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"speculator_heads": 0}, "speculator_heads", "between 1 and 8"),
        ({"speculator_heads": 9}, "speculator_heads", "between 1 and 8"),
        ({"speculator_loss_weight_decay": 0}, "speculator_loss_weight_decay", "greater than 0"),
        ({"speculator_loss_weight_decay": 1.5}, "speculator_loss_weight_decay", "less than or equal to 1"),
        ({"speculator_distill": "maybe"}, "speculator_distill", "valid boolean"),
    ],
)
def test_speculator_config_errors_name_the_field(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(base_model=TINY, adapter="turbo_lora", **overrides)
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and message in error["msg"]


def test_turbo_types_are_accepted_with_their_defaults() -> None:
    turbo_lora = TrainingConfig(base_model=TINY, adapter="turbo_lora")
    assert turbo_lora.speculator_heads == 6 and turbo_lora.learning_rate == 2e-4
    assert turbo_lora.speculator_architecture == "eagle"
    assert turbo_lora.speculator_train_steps is None  # the speculator phase stops by itself
    medusa = TrainingConfig(base_model=TINY, adapter="turbo_lora", speculator_architecture="medusa")
    assert medusa.speculator_heads == 3
    turbo = TrainingConfig(base_model=TINY, adapter="turbo", quantization_bits=4)
    assert turbo.learning_rate == 1e-3 and turbo.speculator_loss_weight_decay == 0.8

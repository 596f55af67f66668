"""The LoRA training core really trains, masks the right tokens, resumes exactly and stops on request."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file
from training_support import TINY, Recorder, crash_and_resume, make_config, number_rows
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.training.base_models import resolve_base_model
from worker.training.batches import pad
from worker.training.config import TrainingConfig
from worker.training.data import IGNORE_INDEX, Example, prepare_data
from worker.training.loop import TrainingResult, train


@pytest.fixture(scope="session")
def tokenizer(tiny_cache: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_base_model(TINY, tiny_cache))


def target_text(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


# --- a real run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingResult, Recorder]:
    recorder = Recorder()
    config = make_config(train_steps=16, checkpoint_every_n_steps=8)
    out = tmp_path_factory.mktemp("trained")
    result = train(config, number_rows(), output_dir=out, cache_dir=tiny_cache, callbacks=recorder)
    return result, recorder


def test_loss_decreases_on_a_repetitive_dataset(trained: tuple[TrainingResult, Recorder]) -> None:
    result, recorder = trained
    assert result.steps == 16 and not result.stopped
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < result.eval_loss_before - 0.5
    assert recorder.losses()[-1] < recorder.losses()[0] - 0.5
    assert [step for step, _ in recorder.evals] == [8, 16]
    assert result.tokens_seen == recorder.steps[-1][1]["tokens_seen"] > 0


def test_saved_adapter_loads_with_peft_and_changes_the_logits(
    trained: tuple[TrainingResult, Recorder], tiny_cache: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    result, _ = trained
    assert result.adapter_dir is not None
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == TINY  # the name, not the cache path
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(resolve_base_model(TINY, tiny_cache)).eval()
    input_ids = torch.tensor([tokenizer("Say the number 2.")["input_ids"]])  # [1, S]
    with torch.no_grad():
        base_logits = base(input_ids).logits.clone()  # [1, S, V]
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        tuned_logits = tuned(input_ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2


# --- data: masks, truncation, padding --------------------------------------------------------------


def test_prompt_completion_learns_only_the_completion(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"prompt": "What is two plus two?", "completion": "Four."}] * 2
    templated = prepare_data(rows, tokenizer, make_config(eval_fraction=0)).train[0]
    assert target_text(tokenizer, templated) == "Four.<|im_end|>\n"
    assert "What is two plus two?" in tokenizer.decode(templated.input_ids)  # in the input, not the loss

    plain = prepare_data(rows, tokenizer, make_config(eval_fraction=0, apply_chat_template=False)).train[0]
    assert target_text(tokenizer, plain) == "Four." + tokenizer.eos_token
    assert plain.labels[: len(tokenizer("What is two plus two?")["input_ids"])] == [IGNORE_INDEX] * len(
        tokenizer("What is two plus two?")["input_ids"]
    )


def test_messages_learn_only_the_assistant_turns(tokenizer: PreTrainedTokenizerBase) -> None:
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye now"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    example = prepare_data([{"messages": chat}] * 2, tokenizer, make_config(eval_fraction=0)).train[0]
    assert target_text(tokenizer, example) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"


def test_text_rows_learn_every_token_and_truncation_is_counted(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"text": "short one"}, {"text": "word " * 100}, {"text": "another " * 50}, {"text": "tiny"}]
    data = prepare_data(rows, tokenizer, make_config(max_seq_length=16, eval_fraction=0))
    assert data.stats.truncated_rows == 2 and data.stats.train_rows == 4  # cut, never dropped
    assert all(len(e.input_ids) <= 16 and e.labels == e.input_ids for e in data.train)


def test_split_column_wins_and_the_holdout_is_seeded(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = number_rows(20)
    with_split = [row | {"split": "evaluation" if i < 3 else "train"} for i, row in enumerate(rows)]
    assert prepare_data(with_split, tokenizer, make_config()).stats.eval_rows == 3
    first, again = (prepare_data(rows, tokenizer, make_config(seed=7)) for _ in range(2))
    assert first.stats.eval_rows == 2 and first.eval == again.eval


def test_padding_masks_padding_and_shifts_targets_within_each_row() -> None:
    batch = pad([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask is not None and batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert (batch.useful_tokens, batch.target_count) == (4, 2)


# --- resume and cancel -----------------------------------------------------------------------------


def test_resume_after_a_crash_continues_exactly(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(train_steps=6, checkpoint_every_n_steps=3, lora_dropout=0.1)
    run = crash_and_resume(config, number_rows(), tmp_path, tiny_cache, at=3)
    assert [step for step, _ in run.resumed.steps] == [4, 5, 6] and run.result.steps == 6
    assert run.crashed.losses() + run.resumed.losses() == pytest.approx(run.straight.losses(), abs=1e-6)
    want = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6, rtol=0) for k in want)


def test_resume_refuses_a_checkpoint_of_another_config(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(train_steps=2, checkpoint_every_n_steps=1)
    train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    with pytest.raises(ValueError, match="learning_rate"):
        train(
            make_config(train_steps=2, learning_rate=1e-3), number_rows(), output_dir=tmp_path,
            cache_dir=tiny_cache, resume_from=tmp_path / "checkpoints" / "step-1",
        )  # fmt: skip


def test_should_stop_stops_within_one_step_and_writes_a_checkpoint(tiny_cache: Path, tmp_path: Path) -> None:
    recorder = Recorder(stop_after=2)
    result = train(make_config(train_steps=50), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache,
                   callbacks=recorder)  # fmt: skip
    assert result.stopped and result.steps == 2 and len(recorder.steps) == 2
    assert result.last_checkpoint == tmp_path / "checkpoints" / "step-2"
    assert recorder.checkpoints == [(2, result.last_checkpoint)]
    assert (result.last_checkpoint / "adapter_model.safetensors").is_file()
    assert result.adapter_dir is None and not (tmp_path / "adapter").exists()


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"adapter": "qlora"}, "adapter", "quantization_bits 4"),
        ({"adapter": "nonsense"}, "adapter", "use one of lora, dora, full, last_layer"),
        ({"rank": 0}, "rank", "between 1 and 1024 or 'auto'"),
        ({"task": "rlhf"}, "task", "sft"),
        ({"target_modules": []}, "target_modules", "at least one"),
        ({"learning_rate": 0}, "learning_rate", "greater than 0"),
        ({"epochs": 0}, "epochs", "greater than or equal to 1"),
        ({"unknown_knob": 1}, "unknown_knob", "Extra inputs"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(base_model=TINY, **overrides)
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and message in error["msg"]


def test_config_defaults() -> None:
    config = TrainingConfig(base_model=TINY, rank=8)
    assert config.lora_alpha == 16 and config.accumulation_steps == 4 and config.batch_size == 16
    assert TrainingConfig(base_model=TINY, rank=8, lora_alpha=4).lora_alpha == 4

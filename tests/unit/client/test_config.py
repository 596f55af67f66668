"""`FinetuningConfig`'s upper bounds on the fields that size a run's work: each refused past its bound."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from tuneforge import config as cfg
from tuneforge.config import FinetuningConfig
from tuneforge.config_errors import config_errors

BASE = {"base_model": "tiny-random-llama"}
# field -> its largest accepted value (what a demanding run may use), one past it is refused.
BOUNDS: dict[str, Any] = {
    "train_steps": cfg.MAX_STEPS,
    "epochs": cfg.MAX_EPOCHS,
    "effective_batch_size": cfg.MAX_BATCH_ROWS,
    "gradient_accumulation_steps": cfg.MAX_BATCH_ROWS,
    "micro_batch_size": 4096,
    "eval_batch_size": 4096,
    "max_seq_length": cfg.MAX_SEQ_LENGTH,
    "keep_n_checkpoints": cfg.MAX_KEPT_CHECKPOINTS,
    "max_eval_samples": cfg.MAX_EVAL_SAMPLES,
    "n_test_samples": 4096,
    "checkpoint_every_n_steps": cfg.MAX_STEPS,
    "checkpoint_every_n_minutes": cfg.MAX_CADENCE_MINUTES,
    "eval_every_n_steps": cfg.MAX_STEPS,
    "eval_every_n_minutes": cfg.MAX_CADENCE_MINUTES,
    "early_stopping_patience": cfg.MAX_EARLY_STOPPING_PATIENCE,
    "seed": cfg.MAX_SEED,
    "speculator_heads": cfg.MAX_SPECULATOR_HEADS,
}


def _past(value: Any) -> Any:
    return value + 1 if isinstance(value, int) else value * 1.5


def _fields_named(exc: ValidationError) -> list[str]:
    return [field for field, _ in config_errors(exc)]


@pytest.mark.parametrize(("field", "bound"), sorted(BOUNDS.items()))
def test_a_work_sizing_field_is_accepted_at_its_bound_and_refused_by_name_past_it(
    field: str, bound: Any
) -> None:
    # A huge effective batch needs micro batches large enough to reach it, but no more than 4096.
    extra = {"micro_batch_size": 4096} if field == "effective_batch_size" else {}
    assert getattr(FinetuningConfig(**BASE, **extra, **{field: bound}), field) == bound
    with pytest.raises(ValidationError) as caught:
        FinetuningConfig(**BASE, **extra, **{field: _past(bound)})
    assert _fields_named(caught.value) == [field]


def test_target_modules_are_bounded_in_count_and_name_length() -> None:
    many = [f"m{n}" for n in range(cfg.MAX_TARGET_MODULES + 1)]
    with pytest.raises(ValidationError) as caught:
        FinetuningConfig(**BASE, target_modules=many)
    assert _fields_named(caught.value) == ["target_modules"]
    with pytest.raises(ValidationError, match="at most 512 characters"):
        FinetuningConfig(**BASE, target_modules=["q" * (cfg.MAX_NAME_LENGTH + 1)])


def test_a_base_model_name_longer_than_any_model_id_or_path_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        FinetuningConfig(base_model="m" * (cfg.MAX_NAME_LENGTH + 1))
    assert _fields_named(caught.value) == ["base_model"]


def test_a_seed_past_numpys_range_is_refused_rather_than_overflowing_an_rng() -> None:
    with pytest.raises(ValidationError) as caught:
        FinetuningConfig(**BASE, seed=18446744073709551616)
    assert _fields_named(caught.value) == ["seed"]

"""The speculator phase: the heads train alone on the frozen model until the held-out accepted length
stops improving, publish their best, and cancel and resume inside the phase exactly."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from training_support import Recorder, crash_and_resume, make_config, number_rows

from worker.training import speculator_phase
from worker.training.config import TrainingConfig
from worker.training.draft_replay import ReplayCounts
from worker.training.loop import train

MODEL_STEPS, EVERY, PATIENCE = 4, 3, 2


def rows() -> list[dict[str, str]]:
    """Prompt/completion rows with an evaluation split: the phase's held-out prompts."""
    return [row | {"split": "evaluation" if i % 6 == 0 else "train"} for i, row in enumerate(number_rows(48))]


def phase_config(**overrides: Any) -> TrainingConfig:
    return make_config(
        **{
            "adapter": "turbo_lora",
            "train_steps": MODEL_STEPS,
            "speculator_train_steps": None,  # the stopping rule
            "speculator_eval_every": EVERY,
            "speculator_patience": PATIENCE,
            "speculator_max_steps": 30,
            "speculator_heads": 2,
        }
        | overrides
    )


class Phases(Recorder):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.phases: list[tuple[int, str, str]] = []

    def on_phase(self, step: int, phase: str, detail: str) -> None:
        self.phases.append((step, phase, detail))


def scripted(monkeypatch: pytest.MonkeyPatch, lengths: list[float]) -> None:
    """The held-out accepted length the phase measures, one value per measurement (the last repeats)."""
    values: Iterator[float] = iter(lengths)
    last = [lengths[-1]]

    def measure(run: Any) -> list[ReplayCounts]:
        value = next(values, last[0])
        # steps 100, accepted 100 * (value - 1): mean accepted length `value`
        return [ReplayCounts(steps=100, drafted=600, accepted=round(100 * (value - 1)))]

    monkeypatch.setattr(speculator_phase, "measure", measure)


def test_a_speculator_that_cannot_improve_stops_at_its_patience(
    monkeypatch: pytest.MonkeyPatch, tiny_cache: Path, tmp_path: Path
) -> None:
    scripted(monkeypatch, [1.5])
    recorder = Phases()
    result = train(phase_config(), rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    phase = result.summary["speculator"]["phase"]
    # A measurement at the phase's start, then PATIENCE more without a gain.
    assert phase["steps"] == EVERY * PATIENCE and result.steps == MODEL_STEPS + EVERY * PATIENCE
    assert phase["stop_reason"] == f"no gain in accepted length over {PATIENCE} evaluations"
    assert phase["best_step"] == MODEL_STEPS and [s for s, _ in phase["history"]] == [4, 7, 10]
    assert [step for step, _, _ in recorder.phases] == [MODEL_STEPS, MODEL_STEPS + EVERY * PATIENCE]
    assert "ended after 6 steps" in recorder.phases[-1][2]


def test_a_speculator_that_keeps_improving_trains_on_to_the_cap(
    monkeypatch: pytest.MonkeyPatch, tiny_cache: Path, tmp_path: Path
) -> None:
    scripted(monkeypatch, [1.0 + 0.1 * i for i in range(20)])
    result = train(phase_config(speculator_max_steps=12), rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    phase = result.summary["speculator"]["phase"]
    assert phase["steps"] == 12 and phase["stop_reason"] == "reached speculator_max_steps (12)"
    assert phase["best_step"] == MODEL_STEPS + 12 and phase["best_accepted_length"] == pytest.approx(1.4)


def test_the_best_heads_are_published_not_the_last(
    monkeypatch: pytest.MonkeyPatch, tiny_cache: Path, tmp_path: Path
) -> None:
    # Best at the first measurement after the start (phase step EVERY), worse after: the phase stops at
    # its patience and publishes the heads as they were at that measurement...
    scripted(monkeypatch, [1.2, 2.0, 1.5])
    auto = train(phase_config(), rows(), output_dir=tmp_path / "auto", cache_dir=tiny_cache)
    assert auto.summary["speculator"]["phase"]["best_step"] == MODEL_STEPS + EVERY
    assert auto.summary["speculator"]["phase"]["steps"] == EVERY * (1 + PATIENCE)
    # ...which are the heads a run of exactly that many phase steps publishes.
    scripted(monkeypatch, [1.0 + i for i in range(10)])
    exact = train(phase_config(speculator_train_steps=EVERY), rows(), output_dir=tmp_path / "exact",
                  cache_dir=tiny_cache)  # fmt: skip
    assert auto.adapter_dir is not None and exact.adapter_dir is not None
    want, got = (load_file(d / "speculator.safetensors") for d in (exact.adapter_dir, auto.adapter_dir))
    assert all(torch.equal(want[k], got[k]) for k in want)
    # The LoRA is the model phase's either way: the phase never changes the model.
    lora = [load_file(d / "adapter_model.safetensors") for d in (exact.adapter_dir, auto.adapter_dir)]
    assert all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])


def test_the_phase_measures_real_acceptance_and_freezes_the_model(tiny_cache: Path, tmp_path: Path) -> None:
    plain = train(
        phase_config(speculator_train_steps=0), rows(), output_dir=tmp_path / "a", cache_dir=tiny_cache
    )
    phased = train(phase_config(), rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache)
    assert plain.adapter_dir is not None and phased.adapter_dir is not None
    phase, estimate = phased.summary["speculator"]["phase"], phased.summary["speculator"]["estimate"]
    assert phase["steps"] >= EVERY * PATIENCE and all(value >= 1.0 for _, value in phase["history"])
    assert estimate["prompts"] >= 1 and estimate["mean_accepted_length"] >= 1.0
    assert phased.summary["speculator"]["estimated_accepted_length"] == estimate["mean_accepted_length"]
    assert (plain.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        phased.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()


def test_without_held_out_prompts_the_phase_does_not_run_and_says_why(
    tiny_cache: Path, tmp_path: Path
) -> None:
    result = train(phase_config(eval_fraction=0), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    phase = result.summary["speculator"]
    assert result.steps == MODEL_STEPS
    assert phase is None or "no held-out row" in phase["phase"]["stop_reason"]


def test_a_crash_inside_the_phase_resumes_exactly(tiny_cache: Path, tmp_path: Path) -> None:
    config = phase_config(speculator_train_steps=8, checkpoint_every_n_steps=3, lora_dropout=0.1)
    run = crash_and_resume(config, rows(), tmp_path, tiny_cache, at=9)  # phase steps 5..12: step 9 is inside
    assert run.crashed.losses() + run.resumed.losses() == pytest.approx(run.straight.losses(), abs=1e-6)
    straight = load_file(tmp_path / "a" / "adapter" / "speculator.safetensors")
    resumed = load_file(tmp_path / "b" / "adapter" / "speculator.safetensors")
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6, rtol=0) for k in straight)
    assert run.result.summary["speculator"]["phase"]["steps"] == 8


def test_a_cancel_inside_the_phase_checkpoints_and_the_resumed_run_finishes_it(
    tiny_cache: Path, tmp_path: Path
) -> None:
    config = phase_config(speculator_train_steps=6)
    straight = train(config, rows(), output_dir=tmp_path / "a", cache_dir=tiny_cache)
    canceled = Recorder(stop_after=MODEL_STEPS + 3)
    stopped = train(config, rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache, callbacks=canceled)
    assert stopped.stopped and stopped.last_checkpoint is not None
    assert stopped.last_checkpoint.name == f"step-{MODEL_STEPS + 3}"
    resumed = train(config, rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache,
                    resume_from=stopped.last_checkpoint)  # fmt: skip
    assert resumed.steps == straight.steps == MODEL_STEPS + 6
    assert straight.adapter_dir is not None and resumed.adapter_dir is not None
    want, got = (load_file(d / "speculator.safetensors") for d in (straight.adapter_dir, resumed.adapter_dir))
    assert all(torch.allclose(want[k], got[k], atol=1e-6, rtol=0) for k in want)
    assert (
        resumed.summary["speculator"]["phase"]["history"]
        == straight.summary["speculator"]["phase"]["history"]
    )

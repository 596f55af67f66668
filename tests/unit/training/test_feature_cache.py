"""Turbo's feature cache: the frozen model runs once per training example, and the losses are those of
a run that computes the features every step."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from training_support import Recorder, crash_and_resume, make_config
from transformers.models.llama.modeling_llama import LlamaModel

from worker.training import feature_cache, loop
from worker.training.loop import TrainingResult, train


def distinct_rows(n: int = 24) -> list[dict[str, str]]:
    """Rows whose tokens all differ, so that the cache holds one entry per training example."""
    return [{"prompt": f"Say the number {i}.", "completion": f"The number is {i * 7}."} for i in range(n)]


def turbo(**overrides: Any) -> Any:
    # 3 steps an epoch over the 20-odd training rows: 7 steps are more than two epochs.
    return make_config(
        **({"adapter": "turbo", "train_steps": 8, "speculator_heads": 2, "speculator_architecture": "medusa"}
           | overrides)
    )  # fmt: skip


def stopped_run(config: Any, tiny_cache: Path, out: Path) -> tuple[TrainingResult, Recorder]:
    """7 steps, then stopped: no final evaluation or speed measurement, which these tests don't need."""
    recorder = Recorder(stop_after=7)
    result = train(config, distinct_rows(), output_dir=out, cache_dir=tiny_cache, callbacks=recorder)
    return result, recorder


@pytest.fixture
def decoder_examples(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many examples each decoder forward inside an optimiser step reads (eval passes not counted)."""
    counts: list[int] = []
    in_step = [False]
    forward: Callable[..., Any] = LlamaModel.forward
    train_step: Callable[..., Any] = loop._train_step

    def counting_forward(self: LlamaModel, *args: Any, **kwargs: Any) -> Any:
        if in_step[0]:
            boundaries = kwargs.get("cu_seq_lens_q")
            ids = kwargs.get("input_ids", args[0] if args else None)
            counts.append(len(boundaries) - 1 if boundaries is not None else int(ids.shape[0]))
        return forward(self, *args, **kwargs)

    def flagged_step(*args: Any, **kwargs: Any) -> None:
        in_step[0] = True
        try:
            train_step(*args, **kwargs)
        finally:
            in_step[0] = False

    monkeypatch.setattr(LlamaModel, "forward", counting_forward)
    monkeypatch.setattr(loop, "_train_step", flagged_step)
    return counts


@pytest.mark.parametrize("architecture", ["medusa", "eagle"])
@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("packing", [True, False])
def test_cached_features_give_the_losses_of_computing_them_every_step(
    architecture: str,
    distill: bool,
    packing: bool,
    tiny_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = turbo(speculator_architecture=architecture, speculator_distill=distill, packing=packing)
    with caplog.at_level(logging.INFO, logger=feature_cache.__name__):
        _, cached = stopped_run(config, tiny_cache, tmp_path / "cached")
    assert "features of" in caplog.text and "cached" in caplog.text
    monkeypatch.setattr(feature_cache, "BUDGET_BYTES", 0)
    _, live = stopped_run(config, tiny_cache, tmp_path / "live")
    assert len(cached.losses()) == 7
    assert cached.losses() == pytest.approx(live.losses(), abs=1e-5)


def test_the_model_runs_once_per_training_example_over_many_epochs(
    tiny_cache: Path, tmp_path: Path, decoder_examples: list[int]
) -> None:
    result = train(turbo(), distinct_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    assert result.steps == 8 and result.steps > 2 * -(-result.data.train_rows // 8)  # over two epochs
    assert sum(decoder_examples) == result.data.train_rows
    cache = result.summary["method"]["speculator_feature_cache"]
    assert cache["examples"] == result.data.train_rows and cache["bytes"] > 0 and cache["seconds"] >= 0


def test_duplicate_examples_share_one_entry(
    tiny_cache: Path, tmp_path: Path, decoder_examples: list[int]
) -> None:
    rows = distinct_rows(6) * 4
    result = train(turbo(), rows, output_dir=tmp_path, cache_dir=tiny_cache, callbacks=Recorder(stop_after=4))
    assert 0 < sum(decoder_examples) <= 6 < result.data.train_rows


def test_a_run_over_the_budget_runs_the_model_every_step(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decoder_examples: list[int]
) -> None:
    monkeypatch.setattr(feature_cache, "BUDGET_BYTES", 1024)
    result, _ = stopped_run(turbo(), tiny_cache, tmp_path)
    assert sum(decoder_examples) > 2 * result.data.train_rows  # every row of every step, two epochs and more
    assert result.stopped


def test_runs_that_train_the_model_never_cache(
    tiny_cache: Path, tmp_path: Path, decoder_examples: list[int]
) -> None:
    result, _ = stopped_run(turbo(adapter="turbo_lora"), tiny_cache, tmp_path)
    assert sum(decoder_examples) > 2 * result.data.train_rows
    assert result.stopped


def test_a_run_shorter_than_an_epoch_runs_the_model_as_before(
    tiny_cache: Path, tmp_path: Path, decoder_examples: list[int]
) -> None:
    # Caching would cost a forward of every example; a two-step run reads only 16 of them.
    result = train(turbo(train_steps=2), distinct_rows(), output_dir=tmp_path, cache_dir=tiny_cache,
                   callbacks=Recorder(stop_after=1))  # fmt: skip
    assert result.steps == 1 and sum(decoder_examples) == 8 < result.data.train_rows


@pytest.mark.parametrize("architecture", ["medusa", "eagle"])
def test_a_resumed_run_reads_the_features_a_straight_run_reads(
    architecture: str, tiny_cache: Path, tmp_path: Path
) -> None:
    config = turbo(train_steps=6, checkpoint_every_n_steps=4, speculator_architecture=architecture,
                   speculator_distill=True)  # fmt: skip
    run = crash_and_resume(config, distinct_rows(), tmp_path, tiny_cache, at=4)
    assert run.crashed.losses() + run.resumed.losses() == pytest.approx(run.straight.losses(), abs=1e-6)
    assert run.result.summary["method"]["speculator_feature_cache"]["examples"] == run.result.data.train_rows

"""Eval cadence, early stopping, best-at-end, checkpoint pruning, token cache, optimisers, metrics."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_support import Recorder, make_config, number_rows

from worker.training.loop import train


class DictCache:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.gets = 0

    def get(self, key: str) -> bytes | None:
        self.gets += 1
        return self.entries.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.entries[key] = data


def test_every_step_reports_throughput_memory_and_grad_norm(tiny_cache: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    train(
        make_config(train_steps=2),
        number_rows(),
        output_dir=tmp_path,
        cache_dir=tiny_cache,
        callbacks=recorder,
    )
    for _, metrics in recorder.steps:
        assert metrics["tokens_per_second"] > 0 and metrics["grad_norm"] > 0
        assert metrics["peak_rss_bytes"] > 50 * 2**20
        assert metrics["useful_tokens"] == metrics["tokens_seen"]  # packed: no padding
    assert recorder.steps[1][1]["useful_tokens"] > recorder.steps[0][1]["useful_tokens"]


def test_evaluation_runs_at_its_own_cadence_and_at_the_end(tiny_cache: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    config = make_config(train_steps=7, eval_every_n_steps=3, checkpoint_every_n_steps=100)
    train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    assert [step for step, _ in recorder.evals] == [3, 6, 7]
    assert recorder.checkpoints == []


def test_early_stopping_ends_the_run_and_the_best_weights_are_published(
    tiny_cache: Path, tmp_path: Path
) -> None:
    # The held-out rows contradict the training rows (another number for the same prompt): once the
    # shared "The number is" is learnt, fitting the training rows can only make the eval loss climb.
    # (A huge learning rate on agreeing rows stalled on some hosts and thread counts, and not on others.)
    config = make_config(
        train_steps=40,
        eval_every_n_steps=1,
        enable_early_stopping=True,
        early_stopping_patience=2,
        load_best_at_end=True,
    )
    rows = [row | {"split": "train"} for row in number_rows()] + [
        {
            "prompt": f"Say the number {n}.",
            "completion": f"The number is {(n + 2) % 4}.",
            "split": "evaluation",
        }
        for n in range(4)
    ]
    recorder = Recorder()
    result = train(config, rows, output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    assert result.early_stopped and not result.stopped and result.steps < 40
    losses = dict(recorder.evals)
    best_step = min(losses, key=lambda step: losses[step])
    assert result.best_step == best_step < result.steps
    assert result.eval_loss_after == pytest.approx(losses[best_step])
    assert result.summary["result"]["published_step"] == best_step


def test_without_load_best_the_last_weights_are_published(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(train_steps=4, learning_rate=0.5, eval_every_n_steps=1)
    recorder = Recorder()
    result = train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    assert result.best_step == 4 and result.eval_loss_after == pytest.approx(dict(recorder.evals)[4])


def test_only_the_newest_checkpoints_are_kept(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(train_steps=5, checkpoint_every_n_steps=1, keep_n_checkpoints=2)
    train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]
    checkpoint = tmp_path / "checkpoints" / "step-5"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # servable as it is
    assert {p.name for p in (checkpoint / "trainer").iterdir()} >= {
        "optimizer.pt",
        "state.json",
        "rng_state.pt",
    }


def test_resume_keeps_the_best_weights_and_patience(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(
        train_steps=8,
        learning_rate=0.3,
        eval_every_n_steps=1,
        checkpoint_every_n_steps=4,
        load_best_at_end=True,
    )
    straight = train(config, number_rows(), output_dir=tmp_path / "a", cache_dir=tiny_cache)
    with pytest.raises(RuntimeError):
        train(
            config,
            number_rows(),
            output_dir=tmp_path / "b",
            cache_dir=tiny_cache,
            callbacks=Recorder(crash_at_checkpoint=4),
        )
    resumed = train(
        config,
        number_rows(),
        output_dir=tmp_path / "b",
        cache_dir=tiny_cache,
        resume_from=tmp_path / "b" / "checkpoints" / "step-4",
    )
    assert resumed.best_step == straight.best_step
    assert resumed.eval_loss_after == pytest.approx(straight.eval_loss_after, rel=1e-5)
    assert straight.adapter_dir is not None and resumed.adapter_dir is not None
    want = load_file(straight.adapter_dir / "adapter_model.safetensors")
    got = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all((want[k] - got[k]).abs().max() < 1e-5 for k in want)


def test_tokenisation_is_cached_per_dataset_and_settings(tiny_cache: Path, tmp_path: Path) -> None:
    cache = DictCache()
    kwargs = {"cache_dir": tiny_cache, "data_cache": cache, "dataset_fingerprint": "sha-1"}
    first = train(make_config(train_steps=2), number_rows(), output_dir=tmp_path / "1", **kwargs)
    assert len(cache.entries) == 1
    # The rows are ignored on a hit: the fingerprint says they are the same.
    second = train(make_config(train_steps=2), [], output_dir=tmp_path / "2", **kwargs)  # type: ignore[arg-type]
    assert second.eval_loss_after == first.eval_loss_after and len(cache.entries) == 1
    train(make_config(train_steps=2, max_seq_length=32), number_rows(), output_dir=tmp_path / "3", **kwargs)
    assert len(cache.entries) == 2  # another truncation length is another entry


def test_truncated_rows_are_reported_with_their_numbers(tiny_cache: Path, tmp_path: Path) -> None:
    rows = [*number_rows(10), {"prompt": "long " * 80, "completion": "yes"}]
    recorder = Recorder()
    config = make_config(train_steps=1, max_seq_length=24, eval_fraction=0, apply_chat_template=False)
    result = train(config, rows, output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    assert recorder.data[0].truncated_rows == 1 and recorder.data[0].truncated_row_numbers == (11,)
    assert result.truncated_rows == 1


@pytest.mark.parametrize(
    "optimizer", [{"type": "sgd", "momentum": 0.9}, {"type": "adamw_8bit"}, {"type": "paged_adamw_32bit"}]
)
def test_other_optimizers_train(tiny_cache: Path, tmp_path: Path, optimizer: dict) -> None:
    lr = 0.5 if optimizer["type"] == "sgd" else 1e-2
    result = train(
        make_config(train_steps=6, optimizer=optimizer, learning_rate=lr),
        number_rows(),
        output_dir=tmp_path,
        cache_dir=tiny_cache,
    )
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < result.eval_loss_before


def test_schedules_shape_the_learning_rate(tiny_cache: Path, tmp_path: Path) -> None:
    def rates(**scheduler: object) -> list[float]:
        recorder = Recorder()
        config = make_config(train_steps=10, warmup_ratio=0.2, learning_rate=1e-3, lr_scheduler=scheduler)
        train(
            config,
            number_rows(),
            output_dir=tmp_path / str(scheduler),
            cache_dir=tiny_cache,
            callbacks=recorder,
        )
        return [metrics["learning_rate"] for _, metrics in recorder.steps]

    cosine = rates(type="cosine", min_lr_ratio=0.1)
    assert cosine[0] == 0 and cosine[2] == pytest.approx(1e-3) and cosine[-1] >= 1e-4 - 1e-12
    assert cosine[2] > cosine[6] > cosine[-1]
    assert rates(type="constant") == [pytest.approx(1e-3)] * 10
    warm = rates(type="constant_with_warmup")
    assert warm[0] == 0 and warm[2:] == [pytest.approx(1e-3)] * 8


def test_summary_records_the_config_actually_used(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(train_steps=2, max_seq_length=None, effective_batch_size=None)
    result = train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    used = result.summary["config_used"]
    assert used["max_seq_length"] == 2048 and used["effective_batch_size"] == 16
    assert used["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert used["gradient_accumulation_steps"] == 4 and used["dtype"] == "fp32"
    assert result.adapter_dir is not None
    assert json.loads((result.adapter_dir / "training_summary.json").read_text())["config_used"] == used


def test_minute_cadences_evaluate_and_checkpoint_by_wall_clock(tiny_cache: Path, tmp_path: Path) -> None:
    # A cadence shorter than any step: every step is due, whatever the step cadences say.
    config = make_config(
        train_steps=3,
        eval_every_n_minutes=1e-6,
        checkpoint_every_n_minutes=1e-6,
        checkpoint_every_n_steps=100,
    )
    recorder = Recorder()
    train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    assert [step for step, _ in recorder.evals] == [1, 2, 3]
    assert [step for step, _ in recorder.checkpoints] == [1, 2, 3]

"""Task grpo: the advantage and loss formulas on fixed numbers, and whole runs on tiny-random-llama with
rollouts from the serving engine (worker/rollouts.py)."""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from training_support import Recorder, make_config
from transformers import AutoTokenizer

from worker.rollouts import EngineRolloutSampler
from worker.training.base_models import resolve_base_model
from worker.training.data import TrainingDataError
from worker.training.grpo_data import prepare_prompts
from worker.training.grpo_loss import ADVANTAGE_EPS, group_advantages, policy_loss
from worker.training.loop import train
from worker.training.runtime import TrainingConfigError

TINY = "tiny-random-llama"

# Rewards the letters of the completion: on random weights anything goes; this tests the plumbing.
LENGTH_REWARD = "def length(prompt, completion, example):\n    return min(len(completion), 40) / 40\n"
# Reads `example`: the row's other columns reach the functions.
ANSWER_REWARD = (
    "def has_answer(prompt, completion, example):\n"
    "    return 1.0 if example['answer'] in completion else 0.0\n"
)


def encoded(source: str) -> dict[str, str]:
    return {"encodedFn": base64.b64encode(source.encode()).decode()}


def grpo_config(**overrides: Any) -> Any:
    settings = {
        "task": "grpo",
        "train_steps": 3,
        "effective_batch_size": 2,
        "micro_batch_size": 1,
        "num_generations": 4,
        "sampling_params": {"max_tokens": 6, "temperature": 1.0},
        "reward_fns": {"functions": {"length": encoded(LENGTH_REWARD), "has_answer": encoded(ANSWER_REWARD)}},
        "learning_rate": 5e-3,
        "eval_fraction": 0.25,
    }
    return make_config(**(settings | overrides))


def prompt_rows(n: int = 8) -> list[dict[str, Any]]:
    return [{"prompt": f"Count to {i}.", "answer": str(i % 3)} for i in range(n)]


# --- the formulas ------------------------------------------------------------------------------------


def test_advantages_are_normalised_within_each_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(1 / 3)  # unbiased: squared deviations 4 * 0.25 over n - 1 = 3
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    expected[0] /= std + ADVANTAGE_EPS
    assert torch.allclose(group_advantages(rewards), expected)


def test_policy_loss_on_fixed_numbers() -> None:
    # One completion of two tokens and a pad; advantage +2. Token 0: ratio e^0.5 = 1.6487 > 1 + 0.2,
    # clipped to 1.2. Token 1: ratio e^-0.1 = 0.9048, unclipped.
    logps = torch.tensor([[-1.0, -2.0, -9.0]])
    old = torch.tensor([[-1.5, -1.9, 0.0]])
    ref = torch.tensor([[-1.2, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = policy_loss(logps, old, ref, torch.tensor([2.0]), mask, clip_epsilon=0.2, beta=0.5)
    pg = [-(1.2 * 2.0), -(math.exp(-0.1) * 2.0)]
    kl = [math.exp(-0.2) + 0.2 - 1, 0.0]
    expected = sum(p + 0.5 * k for p, k in zip(pg, kl, strict=True)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.kl.item() == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert out.clipped.item() == pytest.approx(0.5)


def test_a_negative_advantage_clips_the_low_side_only() -> None:
    logps, old = torch.tensor([[-2.0, -1.0]]), torch.tensor([[-1.0, -1.0]])  # ratios e^-1 = 0.37, 1
    out = policy_loss(logps, old, logps, torch.tensor([-1.0]), torch.ones(1, 2), clip_epsilon=0.2, beta=0.0)
    # min(r * A, clip(r) * A) with A < 0 takes the larger |.|: 0.8 for the first token, 1 for the second.
    assert out.loss.item() == pytest.approx((0.8 + 1.0) / 2)
    assert out.clipped.item() == pytest.approx(0.5)


def test_kl_term_is_zero_when_policy_equals_reference() -> None:
    logps = torch.log_softmax(torch.randn(3, 5, 7), dim=-1)[..., 0]
    mask = torch.ones(3, 5)
    out = policy_loss(logps, logps, logps, torch.zeros(3), mask, clip_epsilon=0.2, beta=1.0)
    assert torch.equal(out.kl, torch.zeros(3))
    assert torch.equal(out.loss, torch.zeros(3))


# --- runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_base_model(TINY, tmp_path_factory.mktemp("grpo-models"))


@pytest.fixture
def sampler(tiny_dir: Path) -> Iterator[EngineRolloutSampler]:
    rollouts = EngineRolloutSampler(tiny_dir, device="cpu", max_model_len=64, kv_cache_bytes=8 << 20)
    yield rollouts
    rollouts.close()


def test_a_grpo_run_samples_scores_and_reports(
    tiny_dir: Path, sampler: EngineRolloutSampler, tmp_path: Path
) -> None:
    recorder = Recorder()
    result = train(
        grpo_config(),
        prompt_rows(),
        output_dir=tmp_path,
        model_dir=tiny_dir,
        callbacks=recorder,
        rollouts=sampler,
    )
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert len(recorder.steps) == 3
    task_metrics = {
        "reward_mean", "reward_std", "reward/length", "reward/has_answer", "reward_failures/length",
        "reward_failures/has_answer", "kl", "completion_length", "clip_ratio",
    }  # fmt: skip
    for _, metrics in recorder.steps:
        assert task_metrics <= set(metrics)
        assert 0 < metrics["completion_length"] <= 6
        assert 0 <= metrics["reward/length"] <= 1 and metrics["reward_failures/length"] == 0
        assert metrics["kl"] >= 0 and math.isfinite(metrics["train_loss"])
    assert recorder.steps[0][1]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero
    assert recorder.steps[-1][1]["kl"] > 0  # the policy has moved from the reference
    report = result.summary["quality_report"]
    assert report["task"] == "grpo"
    assert set(report["reward_mean"]) == {"before", "after"}
    assert report["reward/has_answer"]["before"] is not None
    assert result.eval_loss_after == pytest.approx(-report["reward_mean"]["after"])
    assert result.eval_loss_before == pytest.approx(-report["reward_mean"]["before"])


def test_a_resumed_grpo_run_continues_the_same_trajectory(
    tiny_dir: Path, sampler: EngineRolloutSampler, tmp_path: Path
) -> None:
    config = grpo_config(train_steps=4, checkpoint_every_n_steps=2)
    rows = prompt_rows()
    straight, crashed, resumed = Recorder(), Recorder(crash_at_checkpoint=2), Recorder()
    kwargs: dict[str, Any] = {"model_dir": tiny_dir, "rollouts": sampler}
    train(config, rows, output_dir=tmp_path / "a", callbacks=straight, **kwargs)
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        train(config, rows, output_dir=tmp_path / "b", callbacks=crashed, **kwargs)
    checkpoint = tmp_path / "b" / "checkpoints" / "step-2"
    train(config, rows, output_dir=tmp_path / "b", callbacks=resumed, resume_from=checkpoint, **kwargs)
    keys = ("reward_mean", "completion_length", "train_loss")
    after = [metrics[k] for _, metrics in straight.steps[2:] for k in keys]
    again = [metrics[k] for _, metrics in resumed.steps for k in keys]
    assert [step for step, _ in resumed.steps] == [3, 4]
    assert again == pytest.approx(after, rel=1e-4, abs=1e-6)


def test_a_grpo_run_without_a_sampler_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingConfigError, match="rollout sampler"):
        train(grpo_config(), prompt_rows(), output_dir=tmp_path, model_dir=tiny_dir)


def test_a_package_the_workers_lack_fails_the_run_naming_it(
    tiny_dir: Path, sampler: EngineRolloutSampler, tmp_path: Path
) -> None:
    functions = {"length": encoded(LENGTH_REWARD)}
    config = grpo_config(
        reward_fns={"functions": functions, "runtime": {"packages": ["no-such-package-xyz"]}}
    )
    with pytest.raises(TrainingConfigError, match=r"reward_fns: .*'no-such-package-xyz' is not installed"):
        train(config, prompt_rows(), output_dir=tmp_path, model_dir=tiny_dir, rollouts=sampler)


def test_grpo_refuses_what_its_rollout_engine_cannot_sample_as_the_policy() -> None:
    with pytest.raises(ValidationError, match=r"adapter: task 'grpo' samples .* not 'dora'"):
        grpo_config(adapter="dora")
    with pytest.raises(ValidationError, match="quantization_bits: task 'grpo'"):
        grpo_config(quantization_bits=4)


def test_prompts_are_the_chat_minus_its_reply_and_the_rest_of_the_row_is_the_example(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    rows = [
        {"messages": chat, "answer": 1, "split": "train"},
        {"messages": chat[:1], "answer": 2, "split": "train"},
    ]
    data = prepare_prompts(rows, tokenizer, grpo_config())
    with_reply, without = data.train
    assert with_reply.prompt == without.prompt  # the trailing assistant turn is not part of the prompt
    assert "Hello there" not in with_reply.prompt
    assert with_reply.prompt == tokenizer.apply_chat_template(
        chat[:1], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(with_reply.prompt_ids) == with_reply.prompt
    assert with_reply.example == {"answer": 1}
    pairs = prepare_prompts(
        [{"prompt": "2+2?", "completion": "4", "answer": "4"}] * 2, tokenizer, grpo_config()
    )
    assert pairs.train[0].prompt == "2+2?"
    assert pairs.train[0].example == {"completion": "4", "answer": "4"}


def test_a_prompt_without_room_for_its_completion_is_refused_naming_the_row(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rows = [{"prompt": "short"}, {"prompt": "word " * 80}, {"prompt": "short"}]
    with pytest.raises(TrainingDataError, match=r"row 2: its prompt is .* max_seq_length 64"):
        prepare_prompts(rows, tokenizer, grpo_config(eval_fraction=0.0))


# --- a verifiable task on a real model ----------------------------------------------------------------

# SmolLM2-135M-Instruct opens about a quarter of its answers to "Name a ..." with "The"; with this reward
# it does so nearly always after a step or two (on a 2-core CPU: 0.25 at step 1, 0.94-1.0 from step 2).
STARTS_WITH_THE = (
    "def starts_with_the(prompt, completion, example):\n"
    "    return 1.0 if completion.strip().lower().startswith('the') else 0.0\n"
)
THINGS = ["color", "animal", "fruit", "country", "city", "river", "planet", "flower", "sport", "tool"]


@pytest.fixture(scope="module")
def smollm2_dir(shared_model_cache: Path) -> Path:
    # The session's model cache: smollm2-135m is converted from its GGUF once per run, not per module.
    return resolve_base_model("smollm2-135m", shared_model_cache)


def test_grpo_raises_the_reward_of_a_verifiable_task_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Name a {thing}.", "split": "evaluation" if i >= 8 else "train"}
        for i, thing in enumerate(THINGS)
    ]
    config = grpo_config(
        base_model="smollm2-135m",
        train_steps=6,
        effective_batch_size=4,
        micro_batch_size=2,
        num_generations=4,
        sampling_params={"max_tokens": 3, "temperature": 1.0},
        reward_fns={"functions": {"starts_with_the": encoded(STARTS_WITH_THE)}},
        learning_rate=3e-3,
        max_seq_length=128,
    )
    sampler = EngineRolloutSampler(smollm2_dir, device="cpu", max_model_len=128, kv_cache_bytes=32 << 20)
    recorder = Recorder()
    started = time.perf_counter()
    try:
        result = train(
            config, rows, output_dir=tmp_path, model_dir=smollm2_dir, callbacks=recorder, rollouts=sampler
        )
    finally:
        sampler.close()
    rewards = [metrics["reward_mean"] for _, metrics in recorder.steps]
    print(f"\nGRPO on smollm2-135m: {time.perf_counter() - started:.0f} s, step rewards {rewards}")
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.25  # step 1 samples the base model (B starts at zero)
    report = result.summary["quality_report"]
    assert report["reward_mean"]["after"] >= report["reward_mean"]["before"]

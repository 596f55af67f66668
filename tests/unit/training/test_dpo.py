"""Task dpo's loss and reference: the formula computed independently, packed == padded, the reference is
the adapter switched off (or the parent adapter as the run starts), and runs that train, continue and
resume exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from training_support import Recorder, crash_and_resume, make_config

from worker.training.base_models import local_model_dir
from worker.training.loop import train
from worker.training.preference import PreferenceTask, dpo_losses, pair_batch, sequence_logps
from worker.training.preference_data import PreferencePair
from worker.training.preparation import Inputs, Run, build_run

REWARDS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def preference_rows(n: int = 24) -> list[dict[str, str]]:
    """A clear preference: the right sum over a wrong one."""
    return [
        {"prompt": f"What is {i % 5} plus one?", "chosen": f"{i % 5 + 1}", "rejected": f"{i % 5 + 3}"}
        for i in range(n)
    ]


def dpo_config(**overrides: Any) -> Any:
    return make_config(task="dpo", **({"beta": 0.5, "label_smoothing": 0.1} | overrides))


def built_run(tiny_cache: Path, **overrides: Any) -> Run:
    config = dpo_config(**overrides)
    assert config.base_model is not None
    inputs = Inputs(model_dir=local_model_dir(config.base_model, None, tiny_cache))
    return build_run(config, preference_rows(), inputs)


def perturb_adapter(run: Run) -> None:
    """Make the policy differ from its reference, as training would."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in run.trainable.named_trainable():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def reply_logp(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> float:
    """log p(reply | prompt), one sequence at a time, straight from the logits."""
    ids = torch.tensor([prompt + reply])
    logits = model(input_ids=ids).logits[0].float()  # [S, V]
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[len(prompt) - 1 + i, token]) for i, token in enumerate(reply))


def test_the_loss_is_the_sigmoid_dpo_formula_with_label_smoothing(tiny_cache: Path) -> None:
    run = built_run(tiny_cache)
    task = run.task
    assert isinstance(task, PreferenceTask)
    task.baseline(run)  # the reference: the adapter switched off, before the first step
    perturb_adapter(run)
    pairs: list[PreferencePair] = run.data.train[:3]  # type: ignore[assignment]
    model = run.trainable.model
    assert isinstance(model, PeftModel)
    model.eval()
    with torch.no_grad():
        loss = float(task.loss_sum(run, task.step_batches(run, [pairs], 0)[0]))
        metrics = task.step_metrics()
        policy = [[reply_logp(model, p.prompt, r) for r in (p.chosen, p.rejected)] for p in pairs]
        with model.disable_adapter():
            reference = [[reply_logp(model, p.prompt, r) for r in (p.chosen, p.rejected)] for p in pairs]
    beta, smoothing = 0.5, 0.1
    want, margins = 0.0, []
    for (pc, pr), (rc, rr) in zip(policy, reference, strict=True):
        h = (pc - pr) - (rc - rr)
        sig = 1 / (1 + math.exp(-beta * h))
        want += -(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig)
        margins.append(beta * (pc - rc) - beta * (pr - rr))
    assert loss == pytest.approx(want, rel=1e-4)
    assert abs(sum(margins)) > 1e-3  # the check is not vacuous: the policy moved away from the reference
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 3, rel=1e-3, abs=1e-6)
    assert metrics["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    chosen_rewards = [beta * (p[0] - r[0]) for p, r in zip(policy, reference, strict=True)]
    assert metrics["rewards_chosen"] == pytest.approx(sum(chosen_rewards) / 3, rel=1e-3, abs=1e-6)
    assert task.step_metrics() == {}  # cleared by the call


def test_dpo_losses_match_trl_s_sigmoid_loss_on_fixed_numbers() -> None:
    # TRL's DPOTrainer.dpo_loss (loss_type "sigmoid"), written out for these numbers.
    policy = torch.tensor([[-3.0, -7.5], [-4.0, -6.0]])  # [2, n]: chosen, rejected
    reference = torch.tensor([[-3.5, -7.0], [-3.0, -6.5]])
    result = dpo_losses(policy, reference, beta=0.2, label_smoothing=0.25)
    logits = (policy[0] - policy[1]) - (reference[0] - reference[1])
    trl = -F.logsigmoid(0.2 * logits) * 0.75 - F.logsigmoid(-0.2 * logits) * 0.25
    assert torch.allclose(result.losses, trl)
    assert torch.allclose(result.rewards, 0.2 * (policy - reference))


def test_packed_and_padded_pairs_give_the_same_log_probs(tiny_cache: Path) -> None:
    run = built_run(tiny_cache)
    perturb_adapter(run)
    pairs: list[PreferencePair] = run.data.train[:4]  # type: ignore[assignment]
    zeros = torch.zeros((2, 4))
    packed, padded = (pair_batch(pairs, zeros, run.pad_token_id, packed=flag) for flag in (True, False))
    assert packed.sequences.input_ids.shape[0] == 1 and padded.sequences.input_ids.shape[0] == 8
    run.trainable.model.eval()  # no LoRA dropout: both layouts must see the same function
    with torch.no_grad():
        want = sequence_logps(run.trainable.model, padded)
        got = sequence_logps(run.trainable.model, packed)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    assert packed.target_count == padded.target_count == 4


def test_a_fresh_adapter_starts_at_ln2_with_zero_rewards_and_no_second_model(
    tiny_cache: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    config = dpo_config(train_steps=3, label_smoothing=0.0, lora_dropout=0.1)
    result = train(config, preference_rows(), output_dir=tmp_path, cache_dir=tiny_cache, callbacks=recorder)
    first = recorder.steps[0][1]
    # The policy is its reference at step 0 (LoRA's B starts at zero): every pair's loss is ln 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(first[name] == pytest.approx(0.0, abs=1e-6) for name in REWARDS)
    assert result.eval_loss_before == pytest.approx(math.log(2), abs=1e-6)
    # Later steps move the policy away from the reference.
    assert any(abs(metrics["reward_margin"]) > 1e-4 for _, metrics in recorder.steps[1:])
    report = result.summary["quality_report"]
    assert report["task"] == "dpo" and report["reward_accuracy"]["before"] == 0.0
    assert set(report) >= {"summary", "reward_accuracy", "reward_margin", "eval_loss"}
    assert result.data.kind == "preference"


def test_the_reference_is_the_adapter_switched_off_in_the_same_model(tiny_cache: Path) -> None:
    run = built_run(tiny_cache)
    before = sum(p.numel() for p in run.trainable.model.parameters())
    perturb_adapter(run)  # as if a parent's adapter: the reference must still be the base
    baseline = run.task.baseline(run)
    assert baseline is not None
    assert sum(p.numel() for p in run.trainable.model.parameters()) == before  # no copy of any weight
    pair: PreferencePair = run.data.train[0]  # type: ignore[assignment]
    model = run.trainable.model
    assert isinstance(model, PeftModel)
    with torch.no_grad(), model.disable_adapter():
        base = reply_logp(model, pair.prompt, pair.chosen)
    saved = baseline["reference_logps"]
    assert saved["chosen"][saved["rows"].index(pair.row)] == pytest.approx(base, rel=1e-5)


def test_continuing_an_sft_adapter_takes_it_as_the_reference(
    tiny_cache: Path, lora_dir: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    config = dpo_config(train_steps=2, label_smoothing=0.0)
    result = train(config, preference_rows(), output_dir=tmp_path, cache_dir=tiny_cache,
                   callbacks=recorder, init_from=lora_dir)  # fmt: skip
    # Before the first step the policy is its reference, the SFT adapter (against the base it would not be):
    # the held-out loss is ln 2 and every reward 0. (Training steps see the parent's LoRA dropout.)
    report = result.summary["quality_report"]
    assert report["eval_loss"]["before"] == pytest.approx(math.log(2), abs=1e-6)
    assert report["reward_margin"]["before"] == pytest.approx(0.0, abs=1e-6)
    assert report["eval_loss"]["after"] != pytest.approx(math.log(2), abs=1e-6)
    assert result.adapter_dir is not None
    parent = load_file(lora_dir / "adapter_model.safetensors")
    child = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert parent.keys() == child.keys() and any(not torch.equal(parent[k], child[k]) for k in parent)


def test_resume_after_a_crash_continues_exactly(tiny_cache: Path, tmp_path: Path) -> None:
    config = dpo_config(train_steps=6, checkpoint_every_n_steps=3, lora_dropout=0.1)
    run = crash_and_resume(config, preference_rows(), tmp_path, tiny_cache, at=3)
    assert [step for step, _ in run.resumed.steps] == [4, 5, 6]
    straight = [metrics for _, metrics in run.straight.steps]
    again = [metrics for _, metrics in run.crashed.steps + run.resumed.steps]
    for name in ("train_loss", *REWARDS):
        assert [m[name] for m in again] == pytest.approx([m[name] for m in straight], abs=1e-6), name


def test_resume_of_a_continued_run_keeps_the_parent_as_reference(
    tiny_cache: Path, lora_dir: Path, tmp_path: Path
) -> None:
    """The worker resumes a continued run from its checkpoint alone (init_from = the checkpoint): the
    reference must come back from the checkpoint, not from those later weights."""
    config = dpo_config(train_steps=4, checkpoint_every_n_steps=2)
    straight, crashed, resumed = Recorder(), Recorder(crash_at_checkpoint=2), Recorder()
    train(config, preference_rows(), output_dir=tmp_path / "a", cache_dir=tiny_cache, callbacks=straight,
          init_from=lora_dir)  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        train(config, preference_rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache, callbacks=crashed,
              init_from=lora_dir)  # fmt: skip
    checkpoint = tmp_path / "b" / "checkpoints" / "step-2"
    train(config, preference_rows(), output_dir=tmp_path / "b", cache_dir=tiny_cache, callbacks=resumed,
          init_from=checkpoint, resume_from=checkpoint)  # fmt: skip
    assert crashed.losses() + resumed.losses() == pytest.approx(straight.losses(), abs=1e-6)
    margins = [m["reward_margin"] for _, m in crashed.steps + resumed.steps]
    assert margins == pytest.approx([m["reward_margin"] for _, m in straight.steps], abs=1e-6)


# --- a real model learns a clear preference (the SmolLM2 conversion is ~25 s of it on a 2-core CPU) -------


def capital_rows() -> list[dict[str, str]]:
    capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
                ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
                ("Norway", "Oslo"), ("Greece", "Athens"), ("Cuba", "Havana"),
                ("Chile", "Santiago")]  # fmt: skip
    # Wrong answers that are no capital at all, each used once: what generalises to the held-out pairs is
    # "a capital over a fruit", not "Paris over Rome" (other rows' capitals would teach the names instead).
    fruits = ["Banana", "Apple", "Cherry", "Mango", "Peach", "Plum", "Lemon", "Melon", "Grape", "Kiwi",
              "Pear", "Lime"]  # fmt: skip
    rows = []
    for i, (country, capital) in enumerate(capitals):
        wrong = fruits[i]
        rows.append({"prompt": f"What is the capital of {country}? Answer with one word.",
                     "chosen": capital, "rejected": wrong,
                     "split": "evaluation" if i % 4 == 3 else "train"})  # fmt: skip
    return rows


def test_reward_accuracy_rises_on_smollm2(
    tmp_path_factory: pytest.TempPathFactory, shared_model_cache: Path
) -> None:
    recorder = Recorder()
    # Without the chat template's system prompt a sequence is ~15 tokens: a step is a few CPU seconds.
    config = dpo_config(base_model="smollm2-135m", train_steps=4, learning_rate=1e-3, beta=0.1,
                        label_smoothing=0.0, micro_batch_size=9, effective_batch_size=9,
                        max_seq_length=64, apply_chat_template=False)  # fmt: skip
    result = train(config, capital_rows(), output_dir=tmp_path_factory.mktemp("dpo-smollm2"),
                   cache_dir=shared_model_cache, callbacks=recorder)  # fmt: skip
    accuracy = [metrics["reward_accuracy"] for _, metrics in recorder.steps]
    assert accuracy[0] == 0.0 and sum(accuracy[-2:]) / 2 >= 0.9, accuracy
    report = result.summary["quality_report"]
    assert report["eval_pairs"] == 3
    assert report["reward_accuracy"]["after"] >= 2 / 3 and report["reward_margin"]["after"] > 0, report
    assert report["eval_loss"]["after"] < math.log(2) < report["eval_loss"]["before"] + 1e-6, report

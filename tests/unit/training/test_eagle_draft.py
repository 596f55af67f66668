"""The EAGLE-style draft speculator: its training-time test is what serving does, step for step; it
trains for both turbo types, leaves a parent LoRA untouched, resumes exactly and publishes the files
the serving engine reads."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from training_support import TINY, Recorder, crash_and_resume, make_config, number_rows

from worker.training.config import TrainingConfig
from worker.training.eagle import ARCHITECTURE, EagleDraft
from worker.training.loop import train
from worker.training.runtime import TrainingConfigError
from worker.training.speculator import SpeculatorConfig

D, HQ, HKV, HD, INNER = 16, 4, 2, 4, 24


def small_draft(depth: int, seed: int = 0) -> EagleDraft:
    config = SpeculatorConfig(
        hidden_size=D, num_heads=depth, architecture=ARCHITECTURE, num_attention_heads=HQ,
        num_key_value_heads=HKV, head_dim=HD, intermediate_size=INNER, rms_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(seed)
    draft = EagleDraft(config)
    with torch.no_grad():  # away from the pass-through start, so every weight shows in the outputs
        for parameter in draft.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return draft


def rope(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    angles = torch.arange(length).float()[:, None] * inv[None]
    emb = torch.cat([angles, angles], -1)
    return emb.cos(), emb.sin()  # [S, HD]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class SequentialDrafter:
    """A from-scratch reading of the module docstring: commit true pairs one at a time into a K/V list,
    then draft by feeding outputs back with temporary K/V. Independent of EagleDraft.unroll."""

    def __init__(self, draft: EagleDraft, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.p = {name: t.detach() for name, t in draft.state_dict().items()}
        self.cos, self.sin = cos, sin

    def layer(self, feature: torch.Tensor, embed: torch.Tensor, pos: int, keys: list, values: list) -> Any:
        p = self.p
        u = p["fc.weight"] @ torch.cat([feature, embed])
        a = u * torch.rsqrt(u.pow(2).mean() + 1e-6) * p["layer.input_norm.weight"]
        q = rotate((p["layer.q_proj.weight"] @ a).view(HQ, HD), self.cos[pos], self.sin[pos])
        k = rotate((p["layer.k_proj.weight"] @ a).view(HKV, HD), self.cos[pos], self.sin[pos])
        v = (p["layer.v_proj.weight"] @ a).view(HKV, HD)
        keys, values = [*keys, k], [*values, v]
        out = []
        for head in range(HQ):
            kv = head // (HQ // HKV)
            scores = torch.stack([q[head] @ key[kv] for key in keys]) / math.sqrt(HD)
            out.append(torch.softmax(scores, 0) @ torch.stack([value[kv] for value in values]))
        u = u + p["layer.o_proj.weight"] @ torch.cat(out)
        b = u * torch.rsqrt(u.pow(2).mean() + 1e-6) * p["layer.post_norm.weight"]
        mlp = p["layer.down_proj.weight"] @ (
            F.silu(p["layer.gate_proj.weight"] @ b) * (p["layer.up_proj.weight"] @ b)
        )
        return u + mlp, k, v

    def chain(self, features: torch.Tensor, embeds: torch.Tensor, t: int, depth: int) -> list[torch.Tensor]:
        """Outputs of drafts 1..depth after committing the true pairs 0..t (embeds teacher-forced)."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for pos in range(t + 1):
            out, k, v = self.layer(features[pos], embeds[pos], pos, keys, values)
            keys, values = [*keys, k], [*values, v]
        outs = [out]
        for step in range(1, depth):
            pos = t + step
            out, k, v = self.layer(outs[-1], embeds[pos], pos, keys, values)
            keys, values = [*keys, k], [*values, v]
            outs.append(out)
        return outs


def test_training_time_test_is_what_sequential_drafting_computes() -> None:
    depth, length = 4, 11
    draft = small_draft(depth)
    torch.manual_seed(1)
    features, embeds = torch.randn(1, length, D), torch.randn(1, length, D)
    # Two packed examples of 6 and 5 positions; each restarts its positions at 0.
    segments = torch.tensor([[0] * 6 + [1] * 5])
    positions = torch.tensor([list(range(6)) + list(range(5))])
    cos_table, sin_table = rope(length)
    with torch.no_grad():
        outputs = draft.unroll(features, embeds, segments, cos_table[positions], sin_table[positions])
    reference = SequentialDrafter(draft, cos_table, sin_table)
    checked = 0
    for start, size in ((0, 6), (6, 5)):
        f, e = features[0, start : start + size], embeds[0, start : start + size]
        for t in range(size):
            chain = reference.chain(f, e, t, min(depth, size - t))
            for j, expected in enumerate(chain):  # pass j at position t + j
                torch.testing.assert_close(outputs[j][0, start + t + j], expected, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked > 30


def test_an_untrained_draft_passes_the_feature_through() -> None:
    config = SpeculatorConfig(
        hidden_size=D, num_heads=2, architecture=ARCHITECTURE, num_attention_heads=HQ,
        num_key_value_heads=HKV, head_dim=HD, intermediate_size=INNER, rms_norm_eps=1e-6,
    )  # fmt: skip
    draft = EagleDraft(config)
    features, embeds = torch.randn(2, 5, D), torch.randn(2, 5, D)
    cos, sin = rope(5)
    with torch.no_grad():
        first = draft.unroll(features, embeds, torch.zeros(2, 5, dtype=torch.long), cos.expand(2, 5, HD),
                             sin.expand(2, 5, HD))[0]  # fmt: skip
    torch.testing.assert_close(first, features)


# --- training -------------------------------------------------------------------------------------


def eagle_config(**overrides: Any) -> TrainingConfig:
    return make_config(**({"speculator_architecture": "eagle", "speculator_heads": 3} | overrides))


def test_turbo_eagle_on_a_lora_learns_and_leaves_the_lora_bit_identical(
    lora_dir: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    config = eagle_config(adapter="turbo", train_steps=12, learning_rate=3e-3, speculator_distill=True)
    result = train(config, number_rows(), output_dir=tmp_path, cache_dir=tiny_cache, init_from=lora_dir,
                   callbacks=recorder)  # fmt: skip
    assert result.adapter_dir is not None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (result.adapter_dir / name).read_bytes() == (lora_dir / name).read_bytes()
    assert recorder.losses()[-1] < recorder.losses()[0]
    saved = json.loads((result.adapter_dir / "speculator_config.json").read_text())
    assert saved["architecture"] == "eagle_layer" and saved["num_heads"] == 3
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (4, 2, 16)
    state = load_file(result.adapter_dir / "speculator.safetensors")
    assert state["fc.weight"].shape == (64, 128) and state["layer.k_proj.weight"].shape == (32, 64)
    assert "draft_vocab" in state
    heads = result.summary["speculator"]
    assert len(heads["head_top1_agreement"]) == 3 and heads["distill"] is True


def test_turbo_lora_eagle_resumes_from_a_checkpoint_exactly(tiny_cache: Path, tmp_path: Path) -> None:
    config = eagle_config(adapter="turbo_lora", train_steps=4, checkpoint_every_n_steps=2)
    run = crash_and_resume(config, number_rows(), tmp_path, tiny_cache, at=2)
    assert run.crashed.losses() + run.resumed.losses() == pytest.approx(run.straight.losses(), abs=1e-6)
    want = load_file(tmp_path / "a" / "adapter" / "speculator.safetensors")
    got = load_file(tmp_path / "b" / "adapter" / "speculator.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6, rtol=0) for k in want)


def test_continuing_a_medusa_version_as_eagle_names_the_field(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(
        adapter="turbo_lora", train_steps=1, speculator_heads=3, speculator_architecture="medusa"
    )
    medusa = train(config, number_rows(), output_dir=tmp_path / "medusa", cache_dir=tiny_cache)
    assert medusa.adapter_dir is not None
    with pytest.raises(TrainingConfigError, match="speculator_architecture"):
        train(eagle_config(adapter="turbo", train_steps=1), number_rows(), output_dir=tmp_path / "eagle",
              cache_dir=tiny_cache, init_from=medusa.adapter_dir)  # fmt: skip


def test_an_unknown_speculator_architecture_names_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(base_model=TINY, adapter="turbo", speculator_architecture="hydra")
    [error] = caught.value.errors()
    assert error["loc"] == ("speculator_architecture",) and "'eagle' or 'medusa'" in error["msg"]

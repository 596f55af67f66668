"""Packed rows give the loss and gradients of the same examples unpacked: no cross-example attention."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from training_support import TINY, make_config
from transformers import AutoModelForCausalLM, PreTrainedModel

from worker.training.attention import (
    FLASH_ATTENTION,
    VARLEN_ATTENTION,
    choose_implementation,
    reads_boundaries_on_device,
    register_varlen_attention,
)
from worker.training.base_models import resolve_base_model
from worker.training.batches import pack, pad, token_loss_sum
from worker.training.data import IGNORE_INDEX, Example
from worker.training.loop import train


@pytest.fixture(scope="module")
def model(tiny_cache: Path) -> PreTrainedModel:
    directory = resolve_base_model(TINY, tiny_cache)
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation=register_varlen_attention())


def examples(seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    made = []
    for length in (5, 17, 9, 30):
        ids = [rng.randrange(100, 1000) for _ in range(length)]
        prompt = length // 3
        made.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return made


def test_packed_and_unpacked_losses_agree(model: PreTrainedModel) -> None:
    batch = examples()
    with torch.no_grad():
        packed = token_loss_sum(model, pack(batch))
        padded = token_loss_sum(model, pad(batch, pad_token_id=0))
        alone = sum(token_loss_sum(model, pad([e], pad_token_id=0)) for e in batch)
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)
    assert packed.item() == pytest.approx(float(alone), rel=1e-5)


def test_an_example_does_not_see_the_one_packed_before_it(model: PreTrainedModel) -> None:
    first, second = examples()[:2]
    other_first = Example([t + 1 for t in first.input_ids], first.labels)
    with torch.no_grad():
        alone = token_loss_sum(model, pack([second])).item()
        after_first = token_loss_sum(model, pack([first, second])).item() - token_loss_sum(
            model, pack([first])
        )
        after_other = token_loss_sum(model, pack([other_first, second])).item() - token_loss_sum(
            model, pack([other_first])
        )
    assert float(after_first) == pytest.approx(alone, rel=1e-5)
    assert float(after_other) == pytest.approx(alone, rel=1e-5)


def test_packed_and_unpacked_gradients_agree(model: PreTrainedModel) -> None:
    peft = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    grads = []
    for batch in (pack(examples()), pad(examples(), pad_token_id=0)):
        peft.zero_grad()
        token_loss_sum(peft, batch).backward()
        grads.append({n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None})
    peft.unload()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_packing_is_the_default_and_trains_like_padding(tiny_cache: Path, tmp_path: Path) -> None:
    assert make_config().packing
    rows = [
        {"prompt": f"Count to {i % 5}.", "completion": " ".join(["one"] * (1 + i % 5))} for i in range(24)
    ]
    # Without dropout: a packed row and a padded batch draw their masks in different shapes.
    packed = train(make_config(lora_dropout=0.0), rows, output_dir=tmp_path / "p", cache_dir=tiny_cache)
    padded = train(
        make_config(lora_dropout=0.0, packing=False), rows, output_dir=tmp_path / "u", cache_dir=tiny_cache
    )
    assert packed.eval_loss_after == pytest.approx(padded.eval_loss_after, rel=1e-4)
    assert packed.useful_tokens == padded.useful_tokens
    assert packed.tokens_seen == packed.useful_tokens < padded.tokens_seen  # padding costs compute


@pytest.mark.parametrize(
    ("device", "half", "installed", "expected"),
    [
        ("cuda", True, True, FLASH_ATTENTION),
        ("cuda", False, True, VARLEN_ATTENTION),  # flash-attention has no fp32 kernel
        ("cuda", True, False, VARLEN_ATTENTION),
        ("cpu", True, True, VARLEN_ATTENTION),
    ],
)
def test_flash_attention_is_chosen_only_where_it_runs(
    device: str, half: bool, installed: bool, expected: str
) -> None:
    assert choose_implementation(device, half, flash_installed=installed) == expected


def test_the_packed_boundaries_go_to_the_device_only_for_flash_attention(model: PreTrainedModel) -> None:
    batch = pack(examples()[:2])
    assert not reads_boundaries_on_device(
        model
    )  # loaded with the SDPA fallback, which reads them on the host
    assert model.config._attn_implementation == VARLEN_ATTENTION
    model.config._attn_implementation = FLASH_ATTENTION
    try:
        assert reads_boundaries_on_device(model)
    finally:
        model.config._attn_implementation = VARLEN_ATTENTION
    moved = batch.model_inputs(boundaries_on_device=True)["cu_seq_lens_q"]
    assert isinstance(moved, torch.Tensor) and moved.tolist() == batch.cu_seq_lens.tolist()

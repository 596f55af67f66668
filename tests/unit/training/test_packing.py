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

from worker.training.attention import register_varlen_attention
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
    packed = train(make_config(), rows, output_dir=tmp_path / "p", cache_dir=tiny_cache)
    padded = train(make_config(packing=False), rows, output_dir=tmp_path / "u", cache_dir=tiny_cache)
    assert packed.eval_loss_after == pytest.approx(padded.eval_loss_after, rel=1e-3)
    assert packed.useful_tokens == padded.useful_tokens
    assert packed.tokens_seen == packed.useful_tokens < padded.tokens_seen  # padding costs compute

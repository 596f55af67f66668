"""Autoconfig picks the layers that move the loss, sizes ranks from the gradient, leaves the model alone."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import get_pattern_key
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from worker.training.attention import register_varlen_attention
from worker.training.autoconfig import (
    MAX_RANK,
    MIN_RANK,
    AutoconfigDecision,
    decide,
    energy_rank,
    pattern_key,
)
from worker.training.data import IGNORE_INDEX, Example

VOCAB = 96
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IRRELEVANT = (1, 2)  # layers whose projections see only zeros, so no adapter there can move the loss


def tiny_llama(layers: int = 4, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def with_irrelevant_layers(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Zero the norms in front of attention and MLP: every projection of the layer then reads zeros.

    The layer becomes the identity on the residual stream, and each of its weights' gradients
    δᵀ·x is exactly zero: training any of them cannot change the loss.
    """
    with torch.no_grad():
        for index in IRRELEVANT:
            layer = model.model.layers[index]
            layer.input_layernorm.weight.zero_()
            layer.post_attention_layernorm.weight.zero_()
    return model


def rows(n: int = 12, seed: int = 0) -> list[Example]:
    """Random token rows of varied length (so padding is exercised) with a 4-token prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(rng.randint(8, 16))]
        examples.append(Example(ids, [IGNORE_INDEX] * 4 + ids[4:]))
    return examples


def run(model: torch.nn.Module, examples: list[Example], **overrides: Any) -> AutoconfigDecision:
    arguments: dict[str, Any] = {
        "target_modules": TARGETS,
        "rank": "auto",
        "lora_alpha": "auto",
        "layer_selection_percentage": None,
        "n_test_samples": 8,
        "micro_batch_size": 3,
        "pad_token_id": 0,
        "packed": False,
        "seed": 0,
    }
    return decide(model, examples, **(arguments | overrides))


def test_layer_selection_keeps_the_layers_whose_projections_move_the_loss() -> None:
    model = with_irrelevant_layers(tiny_llama())
    decision = run(model, rows(), rank=8, lora_alpha=16, layer_selection_percentage=0.5)

    assert decision.selected_layers == [0, 3]
    assert [decision.layer_scores[i] for i in IRRELEVANT] == [0.0, 0.0]
    assert min(decision.layer_scores[0], decision.layer_scores[3]) > 0
    assert decision.module_ranks == {} and decision.module_alphas == {}
    kwargs = decision.lora_kwargs()
    assert (kwargs["r"], kwargs["lora_alpha"], kwargs["layers_to_transform"]) == (8, 16, [0, 3])
    # Two layers of 7 modules at rank 8: A [8, in] + B [out, 8] each.
    per_layer = 8 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert decision.trainable_parameters == 2 * per_layer

    one = run(model, rows(), rank=8, lora_alpha=16, layer_selection_percentage=0.25)
    assert one.selected_layers is not None and len(one.selected_layers) == 1
    assert one.selected_layers[0] not in IRRELEVANT


def test_energy_rank_keeps_the_requested_share_within_bounds() -> None:
    rank_one = torch.outer(torch.randn(48), torch.randn(40))  # [48, 40]
    assert energy_rank(rank_one, energy=0.9, min_rank=4, max_rank=64) == 4
    flat = torch.diag(torch.ones(40))  # 40 equal singular values: 36 of them hold 90%
    assert energy_rank(flat, energy=0.9, min_rank=4, max_rank=64) == 36
    assert energy_rank(flat, energy=0.9, min_rank=4, max_rank=16) == 16
    assert energy_rank(torch.randn(8, 100), energy=0.999, min_rank=4, max_rank=64) == 8  # min(out, in)
    assert energy_rank(torch.zeros(16, 16), energy=0.9, min_rank=4, max_rank=64) == 4


def test_a_rank_one_gradient_gets_the_minimum_rank() -> None:
    # Every position of every row holds the same token, so every position has the same hidden
    # state in every layer (attention averages identical values): each x_in is one vector and each
    # G = (Σ δ)ᵀ·x has rank one.
    same = [Example([7] * 12, [IGNORE_INDEX] * 4 + [7] * 8) for _ in range(6)]
    decision = run(tiny_llama(), same)

    assert len(decision.module_ranks) == 4 * len(TARGETS)
    assert set(decision.module_ranks.values()) == {MIN_RANK}
    assert decision.rank == MIN_RANK and decision.lora_alpha == 2 * MIN_RANK


def test_rank_pattern_adapts_exactly_the_intended_module_in_peft() -> None:
    model = tiny_llama(layers=12)  # layer 1 must not be confused with layer 11
    decision = run(model, rows(16), n_test_samples=16, layer_selection_percentage=0.5)
    assert decision.selected_layers is not None and len(decision.selected_layers) == 6
    ranks = decision.module_ranks
    assert len(ranks) == 6 * len(TARGETS) and len(set(ranks.values())) > 1
    assert all(
        MIN_RANK <= r <= min(MAX_RANK, 16 if n.endswith(("k_proj", "v_proj")) else 32)
        for n, r in ranks.items()
    )
    assert decision.module_alphas == {name: 2 * r for name, r in ranks.items()}

    kwargs = decision.lora_kwargs()
    names = [name for name, _ in model.named_modules()]
    for key in kwargs["rank_pattern"]:
        assert sum(get_pattern_key(list(kwargs["rank_pattern"]), name) == key for name in names) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns about pattern keys that match nothing
        peft_model = get_peft_model(model, LoraConfig(**kwargs, target_modules=list(TARGETS)))
    adapted = {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert set(adapted) == set(ranks)
    for name, module in adapted.items():
        assert module.lora_A["default"].weight.shape[0] == ranks[name], name
        assert module.scaling["default"] == 2.0, name
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == decision.trainable_parameters


def test_a_pattern_key_matches_its_module_under_peft_rules_and_no_other() -> None:
    names = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "vision.model.layers.1.self_attn.q_proj",  # a bare name would match this one too
        "model_layers_1_self_attn_q_proj",  # and, its dots being regex wildcards, this one
    ]
    for name in names:
        key = pattern_key(name)
        assert [other for other in names if get_pattern_key([key], other) == key] == [name]


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        "tensors": {
            name: (t.clone(), t.requires_grad, t.grad) for name, t in model.state_dict(keep_vars=True).items()
        },
        "hooks": {name: [len(getattr(m, h)) for h in hooks] for name, m in model.named_modules()},
        "training": {name: m.training for name, m in model.named_modules()},
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (tensor, requires_grad, grad) in before["tensors"].items():
        now, now_requires_grad, now_grad = after["tensors"][name]
        assert torch.equal(now, tensor) and now_requires_grad == requires_grad, name
        assert grad is None and now_grad is None, name


def test_the_model_is_left_exactly_as_it_was() -> None:
    model = with_irrelevant_layers(tiny_llama())
    model.train()
    model.model.layers[0].requires_grad_(False)  # a mix of frozen and trainable weights
    before = snapshot(model)

    with torch.no_grad():  # a caller's no_grad must not stop the scoring pass
        run(model, rows(), layer_selection_percentage=0.5)

    assert_unchanged(before, snapshot(model))
    assert torch.is_grad_enabled()


def test_a_4bit_quantised_base_is_scored_like_a_full_precision_one(tmp_path: Path) -> None:
    with_irrelevant_layers(tiny_llama()).save_pretrained(tmp_path)
    quantisation = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantisation, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    before = snapshot(model)

    decision = run(model, rows(), layer_selection_percentage=0.5)

    assert decision.selected_layers == [0, 3]
    assert len(decision.module_ranks) == 2 * len(TARGETS)
    assert all(MIN_RANK <= r <= 32 for r in decision.module_ranks.values())
    assert_unchanged(before, snapshot(model))


def test_packed_rows_score_like_padded_rows() -> None:
    padded = run(tiny_llama(), rows(), layer_selection_percentage=0.5)
    packed = run(
        tiny_llama(attn_implementation=register_varlen_attention()),
        rows(),
        packed=True,
        layer_selection_percentage=0.5,
    )
    assert packed.selected_layers == padded.selected_layers
    for layer, score in padded.layer_scores.items():
        assert packed.layer_scores[layer] == pytest.approx(score, rel=1e-4)


def test_the_decision_round_trips_through_json() -> None:
    decision = run(tiny_llama(), rows(), layer_selection_percentage=0.5)
    stored = json.loads(json.dumps(decision.to_json(), allow_nan=False))

    assert stored == decision.to_json()
    assert AutoconfigDecision.from_json(stored | {"added_later": 1}) == decision
    assert stored["rows_scored"] == 8 and stored["method"] == "lora-gradient-energy"
    assert run(tiny_llama(), rows(), layer_selection_percentage=0.5).layer_scores == decision.layer_scores


def test_bad_requests_fail_with_a_message_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="decoder layers"):
        run(tiny_llama(), rows(), target_modules=("lm_head",))
    with pytest.raises(ValueError, match="lora_alpha 'auto'"):
        run(tiny_llama(), rows(), rank=8, layer_selection_percentage=0.5)
    with pytest.raises(ValueError, match="no training row has a target"):
        run(tiny_llama(), [Example([1, 2, 3], [IGNORE_INDEX] * 3)])

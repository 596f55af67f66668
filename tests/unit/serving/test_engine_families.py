"""The engine's greedy output equals HF's (and PEFT's, with a LoRA) on Qwen3, Gemma2, Gemma3 and Phi3,
with prompts longer than their sliding window; what it cannot run is refused, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_support import Collected, make_engine, run_until_done
from family_support import WINDOW, build_family_model, hf_greedy_eager
from serving_support import make_lora_adapter, make_random_eagle, make_random_heads
from transformers import Phi3Config
from tuneforge import lora_rules
from tuneforge.rules.base_models import SERVED_MODEL_TYPES

from worker.serving.architecture import UnsupportedModelError, read_architecture
from worker.serving.errors import AdapterLoadError
from worker.serving.model_runner import ModelRunner
from worker.serving.params import SamplingParams

FAMILIES = ["qwen3", "gemma2", "gemma3_text", "phi3"]
NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
# Mixed lengths; the third is longer than WINDOW before generation starts, every one is after it.
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 57, 1107],
    [1, *range(2, 21)],
    [1, 8961, 15, 6324, 327, 260, 1795, 282, 4649, 351, 77],
]
# The fused names are the targets on Phi3; the separate ones everywhere else.
ALL_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
assert len(PROMPTS[2]) > WINDOW


def adapter_id(family: str, kind: str) -> str:
    """`gemma3-text-lora/1`: where LocalDirectorySource finds the family's adapter of this kind."""
    return f"{family.replace('_', '-')}-{kind}/1"


@pytest.fixture(scope="module")
def family_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<root>/<family>`: a tiny model of each family, with a LoRA on it (all targets); Medusa heads on
    Gemma2 and Phi3, eagle layers on Gemma2 and Qwen3 (their ids: `adapter_id`)."""
    root = tmp_path_factory.mktemp("families")
    for seed, family in enumerate(FAMILIES):
        model_dir = build_family_model(family, tiny_model_dir, root / family, seed=seed)
        targets = ALL_TARGETS.get(family, ALL_TARGETS["default"])
        make_lora_adapter(
            model_dir,
            root / adapter_id(family, "lora"),
            seed=seed + 10,
            r=4,
            lora_alpha=8,
            target_modules=targets,
        )
    for family in ("gemma2", "phi3"):
        make_random_heads(root / adapter_id(family, "heads"), hidden_size=64, num_heads=3)
    for family in ("gemma2", "qwen3"):
        make_random_eagle(root / adapter_id(family, "eagle"), root / family, depth=3, seed=3)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_output_equals_hf_and_peft_generate(family_root: Path, family: str) -> None:
    model_dir = family_root / family
    adapter = adapter_id(family, "lora")
    base = hf_greedy_eager(model_dir, None, PROMPTS, NEW_TOKENS)
    tuned = hf_greedy_eager(model_dir, family_root / adapter, PROMPTS[:2], NEW_TOKENS)
    engine = make_engine(model_dir, family_root)
    cases = [(None, p) for p in PROMPTS] + [(adapter, p) for p in PROMPTS[:2]]
    requests = [Collected(engine, prompt, GREEDY, name) for name, prompt in cases]
    run_until_done(engine, requests)
    assert [r.error for r in requests] == [None] * len(cases)
    assert [r.token_ids for r in requests] == base + tuned
    assert tuned != base[:2], "the adapter should change the output"


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_medusa_speculation_through_sliding_windows_keeps_greedy_output(
    family_root: Path, family: str
) -> None:
    """Verifying drafts feeds several queries per sequence: each gets its own window of the context."""
    expected = hf_greedy_eager(family_root / family, None, PROMPTS[2:], NEW_TOKENS)
    engine = make_engine(family_root / family, family_root, speculation_max_batch=2)
    requests = [Collected(engine, prompt, GREEDY, adapter_id(family, "heads")) for prompt in PROMPTS[2:]]
    run_until_done(engine, requests)
    assert [r.token_ids for r in requests] == expected
    assert engine.metrics.spec_drafted._value.get() > 0  # type: ignore[attr-defined]


def test_an_eagle_draft_layer_on_qwen3_keeps_greedy_output(family_root: Path) -> None:
    expected = hf_greedy_eager(family_root / "qwen3", None, PROMPTS[:2], NEW_TOKENS)
    engine = make_engine(family_root / "qwen3", family_root, speculation_max_batch=2)
    requests = [Collected(engine, prompt, GREEDY, adapter_id("qwen3", "eagle")) for prompt in PROMPTS[:2]]
    run_until_done(engine, requests)
    assert [r.token_ids for r in requests] == expected
    assert engine.metrics.spec_drafted._value.get() > 0  # type: ignore[attr-defined]


def test_an_eagle_draft_layer_on_gemma2_is_refused_naming_what_is_served(family_root: Path) -> None:
    engine = make_engine(family_root / "gemma2", family_root)
    request = Collected(engine, PROMPTS[0], GREEDY, adapter_id("gemma2", "eagle"))
    run_until_done(engine, [request])
    assert isinstance(request.error, AdapterLoadError)
    assert "eagle speculators are served on llama, mistral, qwen2, qwen3 models, not gemma2" in str(
        request.error
    )


def test_a_model_of_an_unserved_type_is_refused_before_its_weights_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(UnsupportedModelError) as refused:
        ModelRunner(tmp_path, dtype="fp32", kv_cache_bytes=1 << 20, max_model_len=None)
    assert "model_type 'gpt2' is not served" in str(refused.value)
    assert ", ".join(SERVED_MODEL_TYPES) in str(refused.value)


def test_phi3_long_context_rope_is_refused_naming_the_field() -> None:
    factors = [1.0] * 8
    config = Phi3Config(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=8192,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "short_factor": factors, "long_factor": factors},
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"rope_parameters\.rope_type='longrope'"):
        read_architecture(config)


def test_phi3_adapters_are_checked_against_its_fused_projections() -> None:
    config = {
        "model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 2,
    }  # fmt: skip
    shapes = lora_rules.projection_shapes(config)
    assert shapes == {
        "qkv_proj": (64, 128),
        "o_proj": (64, 64),
        "gate_up_proj": (64, 256),
        "down_proj": (128, 64),
    }
    name = "base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"
    assert lora_rules.parse_weight_name(name) == (1, "qkv_proj", "B")
    with pytest.raises(lora_rules.AdapterRuleError, match="the base model has no q_proj"):
        lora_rules.check_tensor_shape(
            "q", [4, 64], which="A", module="q_proj", layer=0, num_layers=2, shapes=shapes, max_rank=8
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefixes_and_prefill_chunks_keep_windows_and_caps_equal_to_hf(
    family_root: Path, family: str
) -> None:
    """A cached prefix and chunks of 8 tokens: each query of a chunk sees its own window of the context."""
    model_dir = family_root / family
    shared = [*PROMPTS[2][:16], 5, 6, 7, 8, 9, 10]
    prompts = [PROMPTS[2], shared, PROMPTS[3]]
    expected = hf_greedy_eager(model_dir, None, prompts, NEW_TOKENS)
    engine = make_engine(model_dir, family_root, max_prefill_tokens=8)
    first = [Collected(engine, prompts[0], GREEDY, None)]
    run_until_done(engine, first)
    later = [Collected(engine, prompt, GREEDY, None) for prompt in prompts[1:]]
    run_until_done(engine, later)
    assert [r.token_ids for r in [*first, *later]] == expected
    assert engine.metrics.prefix_hits._value.get() == 16  # type: ignore[attr-defined]

"""Exact match judges short answers by greedy generation, batched or not, with or without an adapter."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from training_support import TINY, make_config
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from worker.training.base_models import resolve_base_model
from worker.training.data import IGNORE_INDEX, Example, prepare_data
from worker.training.quality import (
    ExactMatch,
    Sample,
    answerable,
    exact_match,
    greedy_completions,
    quality_report,
    split_target,
    stop_ids,
)

COUNTING = [" one", " two", " three", " four", " five"]


@pytest.fixture(scope="module")
def tokenizer(tiny_cache: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_base_model(TINY, tiny_cache))


def load_model(tiny_cache: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(resolve_base_model(TINY, tiny_cache)).eval()


def make_counter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A model whose greedy answer is known: after " one" it says " two three four five" and stops.

    The random tiny model's last hidden state is close to the embedding of its last input token,
    so with tied embeddings it repeats that token. An LM head whose row for token b is the
    embedding of token a makes it say b after a instead: a successor map one → … → five → EOS.
    """
    chain = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in COUNTING]
    chain.append(tokenizer.eos_token_id)
    embeddings = model.get_input_embeddings().weight.detach()
    head = embeddings.clone()
    for before, after in zip(chain, chain[1:] + chain[:1], strict=True):
        head[after] = embeddings[before]
    model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


@pytest.fixture(scope="module")
def model(tiny_cache: Path) -> PreTrainedModel:
    return load_model(tiny_cache)


@pytest.fixture(scope="module")
def counter(tiny_cache: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    return make_counter(load_model(tiny_cache), tokenizer)


def encode(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], **config: Any) -> list[Example]:
    """Every row as a training example, in order."""
    rows = [row | {"split": "train"} for row in rows]
    return prepare_data(rows, tokenizer, make_config(max_seq_length=256, **config)).train


def qa(prompt: str, completion: str) -> dict[str, str]:
    return {"prompt": prompt, "completion": completion}


# --- which rows can be judged -----------------------------------------------------------------------


@pytest.mark.parametrize(("template", "prompt_end"), [(True, "assistant"), (False, "What is two plus two?")])
def test_answerable_keeps_prompt_completion_rows_with_and_without_the_chat_template(
    tokenizer: PreTrainedTokenizerBase, template: bool, prompt_end: str
) -> None:
    examples = encode(tokenizer, [qa("What is two plus two?", "Four.")], apply_chat_template=template)
    assert answerable(examples) == examples
    split = split_target(examples[0])
    assert split is not None
    prompt, target = split
    assert str(tokenizer.decode(prompt, skip_special_tokens=True)).strip().endswith(prompt_end)
    assert str(tokenizer.decode(target, skip_special_tokens=True)).strip() == "Four."


def test_answerable_keeps_a_chat_whose_last_turn_is_its_only_assistant_turn(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    examples = encode(tokenizer, [{"messages": chat}])
    assert answerable(examples) == examples


def test_answerable_drops_multi_turn_chats_text_rows_pretraining_and_long_completions(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    two_answers = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    answer_then_question = two_answers[:3]
    long_answer = qa("Count.", "one" + " one" * 70)
    dropped = [
        *encode(tokenizer, [{"messages": two_answers}, {"messages": answer_then_question}]),
        *encode(tokenizer, [{"text": "Just some text."}]),
        *encode(tokenizer, [qa("Q", "A")], task="continued_pretraining"),
        *encode(tokenizer, [long_answer]),
        Example([1, 2, 3], [IGNORE_INDEX] * 3),
    ]
    assert len(dropped) == 6
    assert answerable(dropped) == []
    assert answerable(encode(tokenizer, [long_answer]), max_completion_tokens=100) != []


# --- generation ---------------------------------------------------------------------------------------


def counting_rows() -> list[dict[str, str]]:
    return [
        qa("Count: one", "two three four five"),
        qa("Now count on from three", "four five"),
        qa("And what comes after four, please, in a somewhat longer prompt", "five"),
        qa("Say the number 2.", "2"),
        qa("two", "three"),
    ]


def test_batched_generation_equals_one_at_a_time_and_transformers_generate(
    model: PreTrainedModel, counter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    examples = encode(tokenizer, counting_rows(), apply_chat_template=False)
    prompts = [split_target(example)[0] for example in examples]  # type: ignore[index]
    assert len({len(prompt) for prompt in prompts}) == len(examples)  # left padding really happens
    for judged in (model, counter):
        batched = exact_match(judged, tokenizer, examples, batch_size=5, max_samples=10)
        one_by_one = exact_match(judged, tokenizer, examples, batch_size=1, max_samples=10)
        assert batched == one_by_one
    prompt = prompts[1]
    ours = greedy_completions(model, [prompt], pad_token_id=0, max_new_tokens=[6], stops=[])[0]
    theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_a_model_that_says_the_reference_scores_one_and_a_wrong_reference_scores_zero(
    model: PreTrainedModel, counter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    # The references tokenise without the leading space the model generates: texts are compared.
    right = encode(tokenizer, counting_rows()[:2], apply_chat_template=False)
    wrong = encode(
        tokenizer,
        [qa("Count: one", "two three four"), qa("Now count on from three", "four five six")],
        apply_chat_template=False,
    )
    scored = exact_match(counter, tokenizer, right, batch_size=2, max_samples=10)
    assert (scored.rows, scored.correct, scored.accuracy) == (2, 2, 1.0)
    assert scored.samples[0] == Sample("Count: one", "two three four five", "two three four five", True)
    assert exact_match(counter, tokenizer, wrong, batch_size=2, max_samples=10).correct == 0
    assert exact_match(model, tokenizer, right, batch_size=2, max_samples=10).correct == 0  # it repeats "one"


def test_exact_match_scores_at_most_max_samples_rows_and_keeps_five_samples(
    counter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    examples = encode(tokenizer, counting_rows() * 2, apply_chat_template=False)
    assert exact_match(counter, tokenizer, examples, batch_size=4, max_samples=3).rows == 3
    assert len(exact_match(counter, tokenizer, examples, batch_size=4, max_samples=10).samples) == 5
    with pytest.raises(ValueError, match="answerable"):
        exact_match(counter, tokenizer, encode(tokenizer, [{"text": "x"}]), batch_size=1, max_samples=1)


def test_peft_model_with_the_adapter_disabled_scores_like_the_base_model(
    tiny_cache: Path, counter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    examples = encode(tokenizer, counting_rows(), apply_chat_template=False)
    base = exact_match(counter, tokenizer, examples, batch_size=5, max_samples=10)
    lora = LoraConfig(
        r=8, lora_alpha=256, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(make_counter(load_model(tiny_cache), tokenizer), lora)
    adapted = exact_match(peft_model, tokenizer, examples, batch_size=5, max_samples=10)
    with peft_model.disable_adapter():
        disabled = exact_match(peft_model, tokenizer, examples, batch_size=5, max_samples=10)
    assert disabled == base
    assert adapted.samples != base.samples  # the adapter really changes the answers


def test_the_models_training_mode_is_restored(
    counter: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    examples = encode(tokenizer, counting_rows()[:1], apply_chat_template=False)
    counter.train()
    try:
        assert exact_match(counter, tokenizer, examples, batch_size=1, max_samples=1).correct == 1
        assert counter.training and all(module.training for module in counter.modules())
    finally:
        counter.eval()
    exact_match(counter, tokenizer, examples, batch_size=1, max_samples=1)
    assert not counter.training


def test_stops_include_the_chat_templates_end_of_turn(tiny_cache: Path, model: PreTrainedModel) -> None:
    path = resolve_base_model(TINY, tiny_cache)
    other_eos = AutoTokenizer.from_pretrained(path, eos_token="<|endoftext|>")
    end_of_turn = other_eos.convert_tokens_to_ids("<|im_end|>")
    assert set(stop_ids(model, other_eos)) == {other_eos.eos_token_id, end_of_turn}
    other_eos.chat_template = None
    model_eos = model.generation_config.eos_token_id
    assert set(stop_ids(model, other_eos)) == {other_eos.eos_token_id, model_eos}


# --- the report ---------------------------------------------------------------------------------------


def test_quality_report_is_json_with_a_one_line_summary() -> None:
    sample = Sample("Count: one", "two", "two", True)
    base, adapter = ExactMatch(60, 2, 2 / 60, ()), ExactMatch(60, 58, 58 / 60, (sample,))
    report = quality_report(base, adapter, eval_loss_base=2.3104, eval_loss_adapter=0.0412)
    assert json.loads(json.dumps(report)) == report
    assert (
        report["summary"] == "exact match: base 3% → adapter 97% on 60 held-out rows; eval loss 2.31 → 0.04"
    )
    assert report["perplexity"]["base"] == pytest.approx(math.exp(2.3104))
    assert ExactMatch.from_json(report["exact_match"]["adapter"]) == adapter


def test_quality_report_says_what_is_missing() -> None:
    nothing = quality_report(None, None, eval_loss_base=None, eval_loss_adapter=None)
    assert (
        nothing["summary"]
        == "exact match: no held-out rows with a short completion; no eval loss (no held-out rows)"
    )
    assert (
        nothing["exact_match"] == {"base": None, "adapter": None} and nothing["perplexity"]["adapter"] is None
    )
    adapter_only = quality_report(None, ExactMatch(4, 3, 0.75, ()), eval_loss_base=1.5, eval_loss_adapter=0.5)
    assert adapter_only["summary"] == (
        "exact match: adapter 75% on 4 held-out rows (no base-model score); eval loss 1.50 → 0.50"
    )

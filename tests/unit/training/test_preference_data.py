"""Preference rows (task dpo) become token pairs: every accepted shape, truncation, and bad rows named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from training_support import make_config
from transformers import AutoTokenizer

from worker.training.base_models import resolve_base_model
from worker.training.data import IGNORE_INDEX, TrainingDataError
from worker.training.preference_data import PreferencePair, prepare_preferences

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def tokenizer(tiny_cache: Path) -> Any:
    return AutoTokenizer.from_pretrained(resolve_base_model(TINY, tiny_cache))


def prepare(rows: list[dict[str, Any]], tokenizer: Any, **overrides: Any) -> Any:
    config = make_config(task="dpo", eval_fraction=0.0, **overrides)
    return prepare_preferences(rows, tokenizer, config)


def decoded(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids))


def test_a_text_prompt_is_chat_templated_and_both_replies_follow_the_same_prompt(tokenizer: Any) -> None:
    data = prepare([{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"}] * 2, tokenizer)
    pair: PreferencePair = data.train[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert decoded(tokenizer, pair.prompt) == rendered
    assert decoded(tokenizer, pair.chosen).startswith("Paris") and "Rome" not in decoded(
        tokenizer, pair.chosen
    )
    assert decoded(tokenizer, pair.rejected).startswith("Rome")
    chosen, rejected = pair.sequences()
    # Only the reply's tokens are labelled; the prompt is shared and masked.
    assert chosen.labels == [IGNORE_INDEX] * len(pair.prompt) + pair.chosen
    assert rejected.input_ids[: len(pair.prompt)] == chosen.input_ids[: len(pair.prompt)]
    assert data.stats.kind == "preference" and data.stats.truncated_rows == 0


def test_without_the_template_a_prompt_is_plain_text_and_replies_end_with_eos(tokenizer: Any) -> None:
    data = prepare(
        [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}] * 2, tokenizer, apply_chat_template=False
    )
    pair = data.train[0]
    assert pair.prompt == tokenizer("2+2=")["input_ids"]
    assert pair.chosen == tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_messages_and_openai_rows_encode_like_the_equivalent_prompt_row(tokenizer: Any) -> None:
    history = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}]
    reply = {"role": "assistant", "content": "Paris"}
    messages_row = {"messages": history, "chosen": [reply], "rejected": "Rome"}
    openai_row = {
        "input": {"messages": history},
        "preferred_output": [reply],
        "non_preferred_output": [{"role": "assistant", "content": "Rome"}],
    }
    trl_row = {"prompt": history, "chosen": [reply], "rejected": [{"role": "assistant", "content": "Rome"}]}
    pairs = [prepare([row, row], tokenizer).train[0] for row in (messages_row, openai_row, trl_row)]
    assert pairs[0] == pairs[1] == pairs[2]
    assert decoded(tokenizer, pairs[0].prompt).count("Be terse.") == 1


def test_a_long_pair_keeps_the_end_of_its_prompt_and_cuts_both_replies_alike(tokenizer: Any) -> None:
    prompt = " ".join(f"word{i}" for i in range(80))
    row = {"prompt": prompt, "chosen": "yes " * 40, "rejected": "no " * 45}
    data = prepare([row, row], tokenizer, max_seq_length=64, apply_chat_template=False)
    pair = data.train[0]
    full = tokenizer(prompt)["input_ids"]
    assert pair.prompt == full[len(full) - len(pair.prompt) :]  # cut from the left
    assert len(pair.prompt) >= 32  # at least half the window stays prompt
    assert len(pair.prompt) + len(pair.chosen) <= 64 and len(pair.chosen) == len(pair.rejected)
    assert data.stats.truncated_rows == 2 and data.stats.truncated_row_numbers == (1, 2)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "row 2: 'chosen' is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": 7}, "row 2: 'rejected' must be text"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "row 2: 'chosen' and 'rejected' are the same"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, "row 2: 'rejected' is missing"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "row 2: 'prompt' is empty"),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "row 2: 'chosen' must be the reply's text or a list of one assistant message",
        ),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "row 2: 'prompt' must be a non-empty list"),
    ],
)
def test_a_bad_row_is_refused_naming_its_row_and_field(
    tokenizer: Any, bad: dict[str, Any], message: str
) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(TrainingDataError, match=message):
        prepare([good, bad, good], tokenizer)


def test_openai_rows_with_a_broken_input_are_refused(tokenizer: Any) -> None:
    row = {"input": "not an object", "preferred_output": "a", "non_preferred_output": "b"}
    with pytest.raises(TrainingDataError, match=r"row 1: 'input' must be an object \{messages"):
        prepare([row, row], tokenizer)


def test_rows_of_another_kind_are_refused_for_dpo(tokenizer: Any) -> None:
    with pytest.raises(TrainingDataError, match="task 'dpo' needs preference rows"):
        prepare([{"prompt": "q", "completion": "a"}] * 2, tokenizer)

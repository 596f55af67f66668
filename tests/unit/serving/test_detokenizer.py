"""Incremental detokenization with SmolLM2's real tokenizer: streamed text equals a full decode, stops cut."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from worker.serving.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    """Feeds ids one at a time as the engine does; returns the emitted chunks and whether a stop hit."""
    chunks = []
    for token in ids:
        text, stop_hit = detok.add(token)
        chunks.append(text)
        if stop_hit:
            return chunks, True
    chunks.append(detok.flush())
    return chunks, False


MIXED_TEXT = (
    "Héllo wörld 🎉🎉 naïve café, 日本語のテキスト — «quotes» and emoji 👩‍👩‍👧 ñ ø ß; "
    "code: def f(x):\n    return x ** 2\n\n  spaces   and\ttabs. Ελληνικά Русский 🚀"
)


def test_streamed_text_of_mixed_scripts_and_emoji_equals_the_text(tokenizer: Any) -> None:
    prompt = encode(tokenizer, "Translate this, please:")
    ids = encode(tokenizer, MIXED_TEXT)
    detok = IncrementalDetokenizer(tokenizer, prompt, ())
    chunks, stopped = stream(detok, ids)
    assert not stopped
    assert "".join(chunks) == MIXED_TEXT == detok.text
    assert not any("\ufffd" in chunk for chunk in chunks)  # half characters were held back
    assert sum(1 for chunk in chunks if chunk == "") >= 4  # ... e.g. the emoji span several tokens
    single = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in single)  # which decoding one token at a time breaks


@pytest.mark.parametrize("seed", range(12))
def test_streamed_text_of_random_ids_equals_a_full_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
    ids = [rng.randrange(vocab) for _ in range(80)]
    ids[rng.randrange(80)] = tokenizer.eos_token_id  # a special token in the middle is skipped
    detok = IncrementalDetokenizer(tokenizer, prompt, ())
    chunks, _ = stream(detok, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(chunks) == expected == detok.text


def test_byte_tokens_of_one_character_are_held_back_until_it_is_complete(tokenizer: Any) -> None:
    ids = encode(tokenizer, " 🚀!")
    assert len(ids) >= 3  # the rocket is split into byte tokens
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Go"), ())
    chunks = [detok.add(token)[0] for token in ids]
    assert chunks[0] == "" or chunks[0] == " "
    assert "".join(chunks) == " 🚀!"
    assert all("\ufffd" not in c for c in chunks)


def test_a_prompt_cut_inside_a_character_does_not_swallow_generated_text(tokenizer: Any) -> None:
    ids = encode(tokenizer, "ok 🚀 then more")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, generated = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(tokenizer, prompt, ())
    chunks, _ = stream(detok, generated)
    assert "".join(chunks) == tokenizer.decode(generated)
    assert "".join(chunks).endswith(" then more")


def test_leading_spaces_survive_token_by_token(tokenizer: Any) -> None:
    text = " The quick brown fox jumps over the lazy dog."
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Once:"), ())
    chunks, _ = stream(detok, encode(tokenizer, text))
    assert chunks[:4] == [" The", " quick", " brown", " fox"]
    assert "".join(chunks) == text


def test_stop_string_across_tokens_stops_and_is_excluded(tokenizer: Any) -> None:
    text = "Sure. The answer is 42.\nUser: and then? more text that must never appear"
    ids = encode(tokenizer, text)
    stop = "\nUser:"
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Q"), (stop,))
    chunks, stopped = stream(detok, ids)
    assert stopped
    assert "".join(chunks) == "Sure. The answer is 42." == detok.text
    fed = len(chunks)
    assert fed < len(ids) and len(encode(tokenizer, stop)) > 1
    assert detok.add(ids[fed]) == ("", True)  # nothing after the stop, ever
    assert detok.flush() == "" and detok.text == "Sure. The answer is 42."


def test_possible_stop_prefix_is_held_back_then_released(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Say"), ("world peace",))
    emitted = ""
    for token in encode(tokenizer, "hello world"):
        emitted += detok.add(token)[0]
    assert emitted == "hello "  # "world" could still become "world peace"
    assert detok.text == "hello world"
    for token in encode(tokenizer, " war"):
        emitted += detok.add(token)[0]
    assert emitted == "hello world war"


def test_held_back_stop_prefix_is_flushed_at_the_end(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], ("###",))
    chunks, stopped = stream(detok, encode(tokenizer, "total: 12 ##"))
    assert not stopped
    assert chunks[-1] == " ##" or chunks[-1].endswith("##")
    assert "".join(chunks) == "total: 12 ##"


@pytest.mark.parametrize("stops", [("el", "llo"), ("llo", "el")])
def test_earliest_stop_string_wins_even_inside_one_token(tokenizer: Any, stops: tuple[str, ...]) -> None:
    ids = encode(tokenizer, " hello there")
    assert tokenizer.decode(ids[:1]) == " hello"  # both stops complete with the same token
    detok = IncrementalDetokenizer(tokenizer, [], stops)
    chunks, stopped = stream(detok, ids)
    assert stopped and "".join(chunks) == " h" == detok.text


def test_special_tokens_are_skipped_unless_asked_for(tokenizer: Any) -> None:
    ids = [*encode(tokenizer, "Hi there"), tokenizer.eos_token_id]
    skipped = IncrementalDetokenizer(tokenizer, [], ())
    assert "".join(stream(skipped, ids)[0]) == "Hi there"
    kept = IncrementalDetokenizer(tokenizer, [], (), skip_special_tokens=False)
    assert "".join(stream(kept, ids)[0]) == "Hi there" + tokenizer.eos_token

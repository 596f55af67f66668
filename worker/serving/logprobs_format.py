"""Logprobs as the HTTP APIs render them: OpenAI's legacy completions object, OpenAI's chat `content`
list, and LoRAX's (TGI's) `top_tokens`, `alternative_tokens` and `prefill`.

Entries go one per token, never per text chunk: a token whose text is held back (half a UTF-8
character, a possible stop string) still gets its entry when it is generated. A token's string is its
text where it stands (decoded after the few tokens before it, so that a SentencePiece word keeps its
leading space), a special token's is its name; `text_offset` is where each token's text begins in the
returned text (prompt first when echoed; for a token inside a character that spans several tokens,
where that character begins), counted by the engine's own incremental detokenizer.
"""

from __future__ import annotations

from typing import Any

from worker.serving.detokenizer import PREFIX_TOKENS, IncrementalDetokenizer
from worker.serving.outputs import PromptLogprobs, TokenOutput, TopLogprobs

_INCOMPLETE = "\ufffd"


class TokenTexts:
    """Each token's string where it stands in one sequence, fed token after token, and how much text it
    adds (by the engine's own incremental detokenizer, without stop strings: a token that ends inside a
    character adds nothing, the one that completes it adds the whole character)."""

    def __init__(self, tokenizer: Any, context: list[int]) -> None:
        self._tokenizer = tokenizer
        self._special = frozenset(tokenizer.all_special_ids)
        self._window = list(context[-PREFIX_TOKENS:])
        self._window_text = self._decode(self._window)
        self._text = IncrementalDetokenizer(tokenizer, context, ())

    def string(self, token_id: int) -> str:
        """`token_id`'s string if it came next (the sequence does not move)."""
        if token_id in self._special:
            return str(self._tokenizer.convert_ids_to_tokens(token_id))
        return self._in_context(token_id)

    def advance(self, token_id: int) -> int:
        """Moves past `token_id`; returns how many characters it adds to the (special-free) text."""
        added, _ = self._text.add(token_id)
        self._window = [*self._window, token_id][-PREFIX_TOKENS:]
        self._window_text = self._decode(self._window)
        return len(added)

    def _in_context(self, token_id: int) -> str:
        text = self._decode([*self._window, token_id])
        if text.startswith(self._window_text):
            return text[len(self._window_text) :]
        return self._decode([token_id])  # the context ended inside a character: the token on its own

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text


class CompletionLogprobs:
    """OpenAI's `choices[].logprobs` of /v1/completions (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`) for one choice: its echoed prompt's entries, then its tokens' as they come."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], prompt_text_length: int) -> None:
        self._tokenizer = tokenizer
        self._texts = TokenTexts(tokenizer, prompt_ids)
        self._offset = prompt_text_length

    def prompt(self, scored: PromptLogprobs) -> dict[str, Any]:
        """The prompt's entries (the first token's logprob is null), offsets from the echoed text's start."""
        texts = TokenTexts(self._tokenizer, [])
        part = _empty_completion_part()
        offset = 0
        for token, logprob, top in zip(scored.token_ids, scored.logprobs, scored.top, strict=True):
            alternatives = None if logprob is None else _top_dict(texts, top, token, logprob)
            _add_entry(part, texts.string(token), logprob, alternatives, offset)
            offset += texts.advance(token)
        return part

    def tokens(self, outputs: list[TokenOutput]) -> dict[str, Any]:
        """The entries of generated tokens (one per output; an aborted request's last output has none)."""
        part = _empty_completion_part()
        for output in outputs:
            if output.token_id < 0:
                continue
            alternatives = _top_dict(self._texts, output.top_logprobs, output.token_id, output.logprob)
            _add_entry(part, self._texts.string(output.token_id), output.logprob, alternatives, self._offset)
            self._offset += self._texts.advance(output.token_id)
        return part


def join_completion_parts(*parts: dict[str, Any]) -> dict[str, Any]:
    joined = _empty_completion_part()
    for part in parts:
        for key, values in part.items():
            joined[key].extend(values)
    return joined


def _empty_completion_part() -> dict[str, Any]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _add_entry(
    part: dict[str, Any], token: str, logprob: float | None, top: dict[str, float] | None, offset: int
) -> None:
    part["tokens"].append(token)
    part["token_logprobs"].append(logprob)
    part["top_logprobs"].append(top)
    part["text_offset"].append(offset)


def _top_dict(texts: TokenTexts, top: TopLogprobs, chosen: int, logprob: float) -> dict[str, float]:
    """The alternatives by string, with the chosen token always among them (OpenAI: up to logprobs + 1)."""
    alternatives: dict[str, float] = {}
    for token, value in top:
        alternatives.setdefault(texts.string(token), value)
    alternatives.setdefault(texts.string(chosen), logprob)
    return alternatives


class ChatLogprobs:
    """OpenAI's chat `logprobs.content` entries for one choice's tokens, as they come."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._texts = TokenTexts(tokenizer, prompt_ids)

    def content(self, outputs: list[TokenOutput]) -> list[dict[str, Any]]:
        entries = []
        for output in outputs:
            if output.token_id < 0:
                continue
            top = [_chat_token(self._texts.string(t), value) for t, value in output.top_logprobs]
            entry = _chat_token(self._texts.string(output.token_id), output.logprob)
            entries.append(entry | {"top_logprobs": top})
            self._texts.advance(output.token_id)
        return entries


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    # A token that is part of a character shows U+FFFD: its own bytes are not known from its text.
    raw = None if _INCOMPLETE in token else list(token.encode("utf-8"))
    return {"token": token, "logprob": logprob, "bytes": raw}


def echo_text(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]], ids: list[int]) -> str:
    """The prompt as OpenAI's `echo` returns it: as sent, or for token ids their text."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    text: str = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text


class ReplyLogprobs:
    """What logprobs and echo add to one choice of an OpenAI reply, whole or chunk by chunk: the text in
    front of the completion (the echoed prompt) and the choice's `logprobs` (None when not asked)."""

    def __init__(
        self, tokenizer: Any, prompt_ids: list[int], *, chat: bool, wanted: bool, echo_text: str | None
    ) -> None:
        self._chat, self._wanted, self._echo = chat, wanted, echo_text
        self._chat_entries = ChatLogprobs(tokenizer, prompt_ids)
        self._entries = CompletionLogprobs(tokenizer, prompt_ids, len(echo_text or ""))
        self._started = False

    def whole(self, outputs: list[TokenOutput]) -> tuple[str, dict[str, Any] | None]:
        return self._render(outputs)

    def chunk(self, output: TokenOutput) -> tuple[str, dict[str, Any] | None]:
        return self._render([output])

    def _render(self, outputs: list[TokenOutput]) -> tuple[str, dict[str, Any] | None]:
        first, self._started = not self._started, True
        prefix = (self._echo or "") if first else ""
        if not self._wanted:
            return prefix, None
        if self._chat:
            return prefix, {"content": self._chat_entries.content(outputs)}
        scored = outputs[0].prompt_logprobs if first and self._echo is not None else None
        prompt_part = self._entries.prompt(scored) if scored is not None else _empty_completion_part()
        return prefix, join_completion_parts(prompt_part, self._entries.tokens(outputs))


# --- LoRAX / TGI ------------------------------------------------------------------------------------


def lorax_top_tokens(tokenizer: Any, top: TopLogprobs) -> list[dict[str, Any]]:
    """TGI's `top_tokens` at one position: each alternative decoded on its own, as TGI does."""
    special = frozenset(tokenizer.all_special_ids)
    return [
        {"id": token, "text": tokenizer.decode([token]), "logprob": value, "special": token in special}
        for token, value in top
    ]


def lorax_alternatives(tokenizer: Any, top: TopLogprobs) -> list[dict[str, Any]]:
    """LoRAX's `alternative_tokens` of one token (lorax-client's AlternativeToken)."""
    return [{"id": token, "text": tokenizer.decode([token]), "logprob": value} for token, value in top]


def lorax_prefill(
    tokenizer: Any, prompt_ids: list[int], scored: PromptLogprobs | None
) -> list[dict[str, Any]]:
    """`details.prefill`: each prompt token with its logprob (null for the first, as LoRAX sends it)."""
    logprobs = scored.logprobs if scored is not None else (None,) * len(prompt_ids)
    return [
        {"id": token, "text": tokenizer.decode([token]), "logprob": logprob}
        for token, logprob in zip(prompt_ids, logprobs, strict=True)
    ]

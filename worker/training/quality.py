"""Owns the version's quality report: greedy exact match of base and adapter on short held-out answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from worker.training.data import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_COMPLETION_TOKENS = 64  # longer answers are judged by eval loss only
STOP_MARGIN = 8  # tokens generated past a reference's length: the same text may tokenise longer
MAX_NEW_TOKENS = 128
MAX_SAMPLES = 5
PROMPT_TAIL_CHARS = 200
HELD_OUT_PROMPTS = 8  # the prompts a run hands back for timing its artifact (worker.artifact_checks)


@dataclass(frozen=True)
class Sample:
    prompt: str  # the end of the prompt, as text
    reference: str
    prediction: str
    correct: bool


@dataclass(frozen=True)
class ExactMatch:
    rows: int
    correct: int
    accuracy: float  # correct / rows, 0..1
    samples: tuple[Sample, ...]  # the first few rows, for the report

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"samples": [asdict(sample) for sample in self.samples]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExactMatch:
        samples = tuple(Sample(**sample) for sample in data.get("samples", ()))
        return cls(int(data["rows"]), int(data["correct"]), float(data["accuracy"]), samples)


def split_target(example: Example) -> tuple[list[int], list[int]] | None:
    """(prompt, target) when the labelled tokens are one non-empty span that ends the example."""
    targets = [label != IGNORE_INDEX for label in example.labels]
    if not targets or not targets[-1]:
        return None
    start = len(targets)
    while start > 0 and targets[start - 1]:
        start -= 1
    if start == 0 or any(targets[:start]):  # no prompt (a text row), or several assistant spans
        return None
    return example.input_ids[:start], example.input_ids[start:]


def held_out_prompts(examples: Sequence[Example], limit: int = HELD_OUT_PROMPTS) -> list[list[int]]:
    """The prompt part, as formatted for training, of the first examples that have one."""
    splits = (split_target(example) for example in examples)
    return list(islice((split[0] for split in splits if split is not None), limit))


def held_out_answers(examples: Sequence[Example], limit: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, reference) token ids of the first `limit` answerable examples: the rows the quality
    report judges, in the order it judges them."""
    pairs = (split_target(example) for example in answerable(examples))
    return [split for split in islice(pairs, limit) if split is not None]


def answerable(
    examples: Sequence[Example], max_completion_tokens: int = MAX_COMPLETION_TOKENS
) -> list[Example]:
    """The examples exact match can judge: a prompt followed by one target of 1..max tokens."""
    splits = [(example, split_target(example)) for example in examples]
    return [example for example, split in splits if split and len(split[1]) <= max_completion_tokens]


def answer_tokens(target: Sequence[int]) -> int:
    """The tokens a greedy answer may take for a reference of these tokens (each row its own budget)."""
    return min(len(target) + STOP_MARGIN, MAX_NEW_TOKENS)


def stop_ids(model: torch.nn.Module | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS, the chat template's end of turn, the model's EOS
    (its generation config's; none without a model)."""
    found = [tokenizer.eos_token_id, _end_of_turn_id(tokenizer)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += configured if isinstance(configured, list) else [configured]
    return sorted({token for token in found if token is not None})


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The first special token a chat template writes after an assistant message (e.g. <|im_end|>)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "tuneforge-end-of-turn-probe"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    from jinja2 import TemplateError  # only needed, and only certain to be installed, with a template

    try:
        rendered = str(tokenizer.apply_chat_template(chat, tokenize=False))
    except (TemplateError, ValueError):  # a template may refuse this chat (roles, system turns)
        return None
    if marker not in rendered:
        return None
    after = tokenizer(rendered.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return next((token for token in after if token in special), None)


def _left_pad(prompts: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, S]
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return input_ids, mask


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    *,
    pad_token_id: int,
    max_new_tokens: Sequence[int],
    stops: Sequence[int],
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts with a KV cache, each cut before its first stop token.

    `max_new_tokens` is per prompt, so that a row's answer never depends on what it was batched with.
    """
    device = next(model.parameters()).device
    input_ids, mask = (tensor.to(device) for tensor in _left_pad(prompts, pad_token_id))  # [B, S]
    # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, S]
    limits = torch.tensor(max_new_tokens, device=device)  # [B]
    stop_tensor = torch.tensor(list(stops), dtype=torch.long, device=device)
    done = limits <= 0  # [B]
    cache, generated = None, []
    for step in range(max(max_new_tokens)):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(dim=-1)  # [B]
        generated.append(token.masked_fill(done, pad_token_id))
        done |= torch.isin(token, stop_tensor) | (limits <= step + 1)
        if bool(done.all()):
            break
        input_ids, positions = token[:, None], positions[:, -1:] + 1  # [B, 1]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, S + t]
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]  # [B, T]
    return [_until_stop(row[:limit], stops) for row, limit in zip(rows, max_new_tokens, strict=True)]


def _until_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    cut = next((i for i, token in enumerate(tokens) if token in stops), len(tokens))
    return list(tokens[:cut])


def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_samples: int,
    stop_token_ids: Sequence[int] | None = None,
) -> ExactMatch:
    """Greedy-generate each example's target from its prompt and compare texts; `examples` must be answerable.

    `stop_token_ids` replaces the default stops (see `stop_ids`). The model is left in the training
    mode it came in; for a PeftModel, call inside `disable_adapter()` to score the base model.
    """
    splits = [split_target(example) for example in examples[:max_samples]]
    if not splits or any(split is None for split in splits):
        raise ValueError("exact_match needs a non-empty list of answerable() examples")
    pairs = [split for split in splits if split is not None]
    stops = list(stop_token_ids) if stop_token_ids is not None else stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    # Similar prompt lengths share a batch, so little of each batch is padding.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    predictions: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            outputs = greedy_completions(
                model,
                [pairs[i][0] for i in chunk],
                pad_token_id=pad_id,
                max_new_tokens=[answer_tokens(pairs[i][1]) for i in chunk],
                stops=stops,
            )
            predictions.update(zip(chunk, outputs, strict=True))
    finally:
        model.train(was_training)
    samples = [
        judge(tokenizer, prompt, target, predictions[i], stops) for i, (prompt, target) in enumerate(pairs)
    ]
    correct = sum(sample.correct for sample in samples)
    return ExactMatch(len(samples), correct, correct / len(samples), tuple(samples[:MAX_SAMPLES]))


def judge(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[int],
    target: Sequence[int],
    predicted: Sequence[int],
    stops: Sequence[int],
) -> Sample:
    """One row's verdict: the answer's text against the reference's (cut at its first stop token).

    `predicted` is decoded whole, special tokens skipped, as the serving engine streams it: an answer
    that runs past a stop token the deployment does not stop at is judged with what follows it.
    """
    # Texts, not token ids, are compared: one string has several tokenisations (the reference was
    # tokenised apart from its prompt, " 42" may be one token or two), and a model that writes the
    # right answer through another segmentation has still answered right.
    reference = str(tokenizer.decode(_until_stop(target, stops), skip_special_tokens=True)).strip()
    prediction = str(tokenizer.decode(predicted, skip_special_tokens=True)).strip()
    prompt_text = str(tokenizer.decode(prompt, skip_special_tokens=True)).strip()
    if len(prompt_text) > PROMPT_TAIL_CHARS:
        prompt_text = "…" + prompt_text[-PROMPT_TAIL_CHARS:]
    return Sample(prompt_text, reference, prediction, prediction == reference)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def quality_report(
    base: ExactMatch | None,
    adapter: ExactMatch | None,
    *,
    eval_loss_base: float | None,
    eval_loss_adapter: float | None,
) -> dict[str, Any]:
    """The version's quality report (JSON): exact match, eval loss and perplexity of both, and a summary."""
    return {
        "exact_match": {
            "base": base.to_json() if base else None,
            "adapter": adapter.to_json() if adapter else None,
        },
        "eval_loss": {"base": eval_loss_base, "adapter": eval_loss_adapter},
        "perplexity": {"base": perplexity(eval_loss_base), "adapter": perplexity(eval_loss_adapter)},
        "summary": f"{_match_summary(base, adapter)}; {_loss_summary(eval_loss_base, eval_loss_adapter)}",
    }


def _match_summary(base: ExactMatch | None, adapter: ExactMatch | None) -> str:
    if base is None:
        if adapter is None:
            return "exact match: no held-out rows with a short completion"
        accuracy = f"adapter {adapter.accuracy:.0%} on {adapter.rows} held-out rows"
        return f"exact match: {accuracy} (no base-model score)"
    if adapter is not None:
        rows = f"{adapter.rows}" if base.rows == adapter.rows else f"{base.rows} / {adapter.rows}"
        return (
            f"exact match: base {base.accuracy:.0%} → adapter {adapter.accuracy:.0%} on {rows} held-out rows"
        )
    return f"exact match: base {base.accuracy:.0%} on {base.rows} held-out rows (no adapter score)"


def _loss_summary(base: float | None, adapter: float | None) -> str:
    if base is not None and adapter is not None:
        return f"eval loss {base:.2f} → {adapter:.2f}"
    if base is None and adapter is None:
        return "no eval loss (no held-out rows)"
    return f"eval loss: base {base:.2f}" if base is not None else f"eval loss: adapter {adapter:.2f}"

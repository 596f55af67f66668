"""OpenAI's presence / frequency penalties and logit_bias in the sampler, against a hand computation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from worker.serving.errors import InvalidParameterError
from worker.serving.params import SamplingParams
from worker.serving.sampling import make_generator, sample_next_tokens, shape_logits, warped_probs

VOCAB = 256


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def by_hand(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], generated: list[int]
) -> torch.Tensor:
    """One row the slow way: bias, then HF's repetition penalty, then OpenAI's formula per token."""
    row = logits.clone()
    for token, bias in params.logit_bias:
        row[token] += bias
    if params.repetition_penalty != 1.0 and prompt + generated:
        ids = torch.tensor([prompt + generated])
        row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, row[None])[0]
    for token, count in Counter(generated).items():
        row[token] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return row


def test_each_row_is_shaped_as_by_hand_and_rows_that_do_not_ask_are_untouched() -> None:
    logits = random_logits(5)
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (12,), generator=rng).tolist() for _ in range(5)]
    generated = [torch.randint(0, 20, (30,), generator=rng).tolist() for _ in range(5)]  # many repeats
    params = [
        SamplingParams(presence_penalty=1.5),
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.5, logit_bias=((3, 5.0), (200, -100.0))),
        SamplingParams(),
        SamplingParams(frequency_penalty=-2.0, repetition_penalty=1.3, logit_bias=((4, 2.5),)),
        SamplingParams(logit_bias=((7, 100.0),)),
    ]
    histories = [p + g for p, g in zip(prompts, generated, strict=True)]
    ours = shape_logits(logits, params, histories, generated)
    for i, p in enumerate(params):
        torch.testing.assert_close(
            ours[i], by_hand(logits[i], p, prompts[i], generated[i]), rtol=0, atol=1e-5
        )
    assert torch.equal(ours[2], logits[2])
    assert not torch.equal(ours[0], logits[0])


def test_penalties_read_the_generated_tokens_only() -> None:
    logits = random_logits(1)
    top = int(logits.argmax())
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)]
    # The argmax in the prompt only: no penalty, still chosen.
    tokens, _ = sample_next_tokens(logits, params, [[top]], [None], [[]])
    assert int(tokens[0]) == top
    # Generated many times: count 20 costs it 42 logits, far below the runner-up.
    tokens, _ = sample_next_tokens(logits, params, [[top] * 20], [None], [[top] * 20])
    expected = by_hand(logits[0], params[0], [], [top] * 20).argmax()
    assert int(tokens[0]) == int(expected) != top


def test_logit_bias_forces_or_bans_a_token_and_the_logprob_stays_raw() -> None:
    logits = random_logits(3)
    forced = int(logits[0].argmin())
    top = int(logits[1].argmax())
    params = [
        SamplingParams(temperature=0.0, logit_bias=((forced, 100.0),)),
        SamplingParams(temperature=0.0, logit_bias=((top, -100.0),)),
        SamplingParams(temperature=0.0),
    ]
    tokens, logprobs = sample_next_tokens(logits, params, [[]] * 3, [None] * 3)
    assert int(tokens[0]) == forced
    second = int(logits[1].topk(2).indices[1])
    assert int(tokens[1]) == second
    assert int(tokens[2]) == int(logits[2].argmax())
    raw = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, raw)


def test_sampled_rows_draw_from_the_shaped_distribution() -> None:
    logits = random_logits(1)
    top = int(logits.argmax())
    banned = SamplingParams(logit_bias=((top, -100.0),))
    probs = warped_probs(shape_logits(logits, [banned], [[]]), [banned])
    assert float(probs[0, top]) < 1e-30
    generator = make_generator(7)
    draws = [int(sample_next_tokens(logits, [banned], [[]], [generator])[0][0]) for _ in range(200)]
    assert top not in draws
    forced = SamplingParams(temperature=1.5, logit_bias=((11, 100.0),))
    draws = [int(sample_next_tokens(logits, [forced], [[]], [generator])[0][0]) for _ in range(50)]
    assert set(draws) == {11}


def test_penalised_rows_without_generated_tokens_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="generated tokens"):
        sample_next_tokens(random_logits(1), [SamplingParams(presence_penalty=1.0)], [[]], [None])


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": float("nan")}),
        ("logit_bias", {"logit_bias": ((1, 101.0),)}),
        ("logit_bias", {"logit_bias": ((-1, 1.0),)}),
        ("logit_bias", {"logit_bias": tuple((i, 1.0) for i in range(301))}),
        ("n", {"n": 0}),
        ("n", {"n": 129}),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_choice_seeds_are_distinct_and_wrap_into_64_bits() -> None:
    params = SamplingParams(seed=2**63 - 1)
    assert params.choice_seed(0) == 2**63 - 1
    assert params.choice_seed(1) == -(2**63)
    assert SamplingParams().choice_seed(3) is None

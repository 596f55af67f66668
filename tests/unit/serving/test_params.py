"""SamplingParams: every field bounded and finite, so no caller can hand the engine thread a value it
would choke on (a seed torch cannot take, a temperature whose inverse overflows)."""

from __future__ import annotations

import pytest
import torch

from worker.serving.errors import InvalidParameterError
from worker.serving.params import SEED_MAX, SEED_MIN, SamplingParams
from worker.serving.sampling import make_generator, sample_next_tokens


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2**64, -(2**70)])
def test_a_seed_outside_64_bits_is_refused_naming_seed(seed: int) -> None:
    with pytest.raises(InvalidParameterError, match="seed") as caught:
        SamplingParams(seed=seed)
    assert caught.value.field == "seed"


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, SEED_MAX])
def test_every_seed_in_range_makes_a_generator(seed: int) -> None:
    assert make_generator(SamplingParams(seed=seed).seed) is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", 101.0),
        ("temperature", -1.0),
        ("top_p", float("nan")),
        ("top_p", 0.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 1000.0),
        ("max_tokens", 0),
        ("max_tokens", 2**40),
        ("top_k", -1),
        ("top_k", 2**40),
        ("stop", ("",)),
        ("stop", ("x" * 257,)),
        ("stop", tuple("abcdefghi")),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", -2.5),
        ("logit_bias", ((1, float("inf")),)),
        ("n", 0),
    ],
)
def test_out_of_range_or_non_finite_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert caught.value.field == field and field in caught.value.message


def test_a_temperature_too_small_to_divide_by_samples_greedily() -> None:
    """1 / 1e-300 overflows float32: such a temperature means greedy, as it does in vLLM."""
    params = SamplingParams(temperature=1e-300, seed=3)
    assert params.greedy
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_next_tokens(logits, [params], [[]], [make_generator(params.seed)])
    assert tokens.tolist() == [int(logits.argmax())] and torch.isfinite(logprobs).all()

"""The sampler against HF's logits processors, and its seeded draws against the distribution they sample."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.serving.params import SamplingParams
from worker.serving.sampling import (
    apply_repetition_penalty,
    make_generator,
    sample_next_tokens,
    warped_probs,
)

VOCAB = 512
GREEDY = SamplingParams(temperature=0.0)


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def random_histories(batch: int, length: int = 40, seed: int = 1) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=rng).tolist() for _ in range(batch)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_batch_is_argmax_with_raw_logprobs(dtype: torch.dtype) -> None:
    logits = random_logits(16).to(dtype)
    tokens, logprobs = sample_next_tokens(logits, [GREEDY] * 16, [[]] * 16, [None] * 16)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.float().argmax(dim=-1))
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


def test_do_sample_false_is_greedy_whatever_the_temperature() -> None:
    logits = random_logits(4)
    params = [SamplingParams(temperature=1.5, do_sample=False)] * 4
    tokens, _ = sample_next_tokens(logits, params, [[]] * 4, [make_generator(i) for i in range(4)])
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_repetition_penalty_matches_hf_processor_row_by_row() -> None:
    logits = random_logits(6)
    histories = random_histories(6)
    histories[2] = histories[2] + histories[2][:10]  # repeated ids count once
    histories[4] = []
    penalties = [1.0, 1.3, 2.0, 0.7, 1.5, 1.1]
    params = [SamplingParams(temperature=0.0, repetition_penalty=p) for p in penalties]
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    ours = apply_repetition_penalty(logits, rows, params, histories)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([histories[i]], dtype=torch.long).reshape(1, -1)
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], theirs[0], rtol=0, atol=0)
    assert not torch.equal(ours[1], logits[1])  # the penalty did something


def test_greedy_with_repetition_penalty_picks_hf_argmax_and_reports_raw_logprob() -> None:
    logits = random_logits(3)
    top = logits.argmax(dim=-1).tolist()
    histories = [[top[0]], [top[1], 7], [5]]  # rows 0 and 1 have just produced their argmax
    params = [SamplingParams(temperature=0.0, repetition_penalty=50.0)] * 3
    tokens, logprobs = sample_next_tokens(logits, params, histories, [None] * 3)
    for i in range(3):
        ids = torch.tensor([histories[i]])
        expected = RepetitionPenaltyLogitsProcessor(50.0)(ids, logits[i : i + 1].clone()).argmax()
        assert tokens[i] == expected
    assert tokens[0] != top[0] and tokens[2] == top[2]
    raw = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, raw)


def hf_support(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tokens HF's warpers (temperature, top-k, top-p in generate's order) leave samplable."""
    scores = TemperatureLogitsWarper(params.temperature)(None, logits[None].clone())  # type: ignore[arg-type]
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)  # type: ignore[arg-type]
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)  # type: ignore[arg-type]
    return torch.isfinite(scores[0])


WARPED = [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.6, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.5),
    SamplingParams(temperature=0.9, top_p=0.95),
    SamplingParams(temperature=2.0),
    SamplingParams(temperature=1.0, top_k=1),
]


def test_top_k_and_top_p_keep_the_same_tokens_as_hf_warpers() -> None:
    logits = random_logits(len(WARPED))
    probs = warped_probs(logits, WARPED)
    for i, params in enumerate(WARPED):
        support = hf_support(logits[i], params)
        assert torch.equal(probs[i] > 0, support), params
    assert (probs[0] > 0).sum() == 5 and (probs[5] > 0).sum() == 1
    assert 1 < (probs[1] > 0).sum() < VOCAB
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(len(WARPED)))


def test_top_p_over_a_large_vocabulary_matches_hf_for_narrow_and_wide_nuclei() -> None:
    vocab = 8192  # wider than the candidates looked at first
    logits = random_logits(4, vocab, seed=9)
    logits[0] *= 4  # peaked: the nucleus lies among the first candidates
    logits[1] *= 0.05  # nearly flat: the nucleus is most of the vocabulary (the full-sort path)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0),  # no nucleus: nothing may be cut
        SamplingParams(temperature=0.5, top_k=3000, top_p=0.7),
    ]
    probs = warped_probs(logits, params)
    for i, row_params in enumerate(params):
        assert torch.equal(probs[i] > 0, hf_support(logits[i], row_params)), i
    assert (probs[0] > 0).sum() < 1024 < (probs[1] > 0).sum()
    assert bool((probs[2] > 0).all())


def test_top_k_keeps_ties_at_the_cut_like_hf() -> None:
    logits = torch.tensor([[4.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    params = [SamplingParams(top_k=2)]
    probs = warped_probs(logits, params)
    assert torch.equal(probs[0] > 0, hf_support(logits[0], params[0]))
    assert (probs[0] > 0).tolist() == [True, True, True, True, False, False]


def test_sampled_tokens_never_leave_the_warped_support() -> None:
    logits = random_logits(len(WARPED), seed=3)
    supports = [hf_support(logits[i], p) for i, p in enumerate(WARPED)]
    generators = [make_generator(100 + i) for i in range(len(WARPED))]
    seen: list[set[int]] = [set() for _ in WARPED]
    for _ in range(120):
        tokens, _ = sample_next_tokens(logits, WARPED, [[]] * len(WARPED), generators)
        for i, token in enumerate(tokens.tolist()):
            assert supports[i][token], (WARPED[i], token)
            seen[i].add(token)
    assert len(seen[0]) == 5  # and the draws do spread over the support


def test_a_seed_gives_the_same_tokens_whatever_the_batch_companions() -> None:
    vocab = 64
    request = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    companions = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.2, top_k=10),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
    ]
    steps = [random_logits(1, vocab, seed=50 + s)[0] for s in range(25)]

    def run(position: int, others: list[SamplingParams], batch_seed: int) -> list[int]:
        torch.manual_seed(batch_seed)  # the unseeded companions draw from the global RNG
        params = [*others[:position], request, *others[position:]]
        generators = [make_generator(p.seed) for p in params]
        out = []
        for s, row in enumerate(steps):
            noise = random_logits(len(params), vocab, seed=1000 + s + batch_seed)
            logits = noise.clone()
            logits[position] = row
            tokens, _ = sample_next_tokens(logits, params, [[1, 2, 3]] * len(params), generators)
            out.append(int(tokens[position]))
        return out

    alone = run(0, [], 0)
    assert run(2, companions, 1) == alone
    assert run(4, companions[::-1], 2) == alone
    assert len(set(alone)) > 3
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=8)
    generator = make_generator(8)
    different = [int(sample_next_tokens(row[None], [other_seed], [[1]], [generator])[0][0]) for row in steps]
    assert different != alone


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_follows_softmax_of_scaled_logits() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature = 0.7
    draws = 20_000
    params = [SamplingParams(temperature=temperature, seed=123)] * draws
    generator = make_generator(123)
    tokens, _ = sample_next_tokens(logits.expand(draws, -1), params, [[]] * draws, [generator] * draws)
    counts = torch.bincount(tokens, minlength=5).float()
    # 4 degrees of freedom: 18.47 is the 0.999 quantile, so a correct sampler fails 1 seed in 1000.
    assert chi_square(counts, torch.softmax(logits / temperature, dim=-1)) < 18.47
    # ... and the test can tell T=0.7 from T=1.
    assert chi_square(counts, torch.softmax(logits, dim=-1)) > 100


def test_mismatched_row_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="2 logit rows"):
        sample_next_tokens(random_logits(2), [GREEDY], [[]], [None])


def test_make_generator_is_none_without_a_seed_and_reproducible_with_one() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))

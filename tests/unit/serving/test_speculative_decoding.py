"""Speculative decoding with Turbo heads: greedy output unchanged, token for token, in mixed batches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from engine_support import Collected, hf_greedy, make_engine, run_until_done
from serving_support import make_random_heads
from transformers import AutoTokenizer

from worker.serving.acceptance import accept_greedy
from worker.serving.params import SamplingParams
from worker.serving.speculator import Speculator
from worker.training.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_support import make_config, number_rows

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def turbo_root(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`turbo/1`: a trained turbo_lora (LoRA + heads); `heads/1`: random heads on the base model alone."""
    root = tmp_path_factory.mktemp("turbo-adapters")
    config = make_config(
        adapter="turbo_lora", train_steps=12, speculator_heads=3, speculator_architecture="medusa"
    )
    result = train(config, number_rows(), output_dir=root / "run", cache_dir=tiny_model_dir.parent)
    assert result.adapter_dir is not None
    (root / "turbo").mkdir()
    result.adapter_dir.rename(root / "turbo" / "1")
    make_random_heads(root / "heads" / "1", hidden_size=64, num_heads=4)
    for plain in (adapter_root / "acme").iterdir():
        (root / "acme").mkdir(exist_ok=True)
        (root / "acme" / plain.name).symlink_to(plain)
    return root


def test_accept_greedy_keeps_the_confirmed_prefix_and_always_one_token_more() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert accept_greedy([], [3]) == [3]


def test_speculating_and_plain_requests_in_one_batch_match_greedy_decoding(
    tiny_model_dir: Path, turbo_root: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(f"Say the number {i}.")["input_ids"] for i in range(4)]
    cases = [
        ("turbo/1", prompts[0]),
        ("turbo/1", prompts[1]),
        ("heads/1", prompts[2]),
        ("acme/2", prompts[3]),
        (None, prompts[1]),
    ]
    engine = make_engine(tiny_model_dir, turbo_root, speculation_max_batch=len(cases))
    requests = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in cases]
    run_until_done(engine, requests)
    lora_dir = {"turbo/1": turbo_root / "turbo" / "1", "acme/2": turbo_root / "acme" / "2"}
    expected = [hf_greedy(tiny_model_dir, lora_dir.get(a or ""), p, NEW_TOKENS) for a, p in cases]
    assert [r.error for r in requests] == [None] * len(cases)
    assert [r.token_ids for r in requests] == expected
    drafted = engine.metrics.spec_drafted._value.get()
    accepted = engine.metrics.spec_accepted._value.get()
    # Both outcomes happened: some drafts were kept, some rolled back (and outputs are still exact).
    assert 0 < accepted < drafted, (accepted, drafted)
    # Each request's own account (what responses report) adds up to the engine's counters.
    stats = [r.outputs[-1].speculation for r in requests]
    assert [s is not None for s in stats] == [True, True, True, False, False]
    assert sum(s.drafted for s in stats if s) == drafted and sum(s.accepted for s in stats if s) == accepted
    assert all(s.steps > 0 and 1.0 <= s.mean_accepted_length <= 5.0 for s in stats if s)
    assert engine.blocks.num_used == 0


def test_drafts_come_from_the_draft_vocabulary_and_q_is_zero_outside_it(
    tiny_model_dir: Path, turbo_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, turbo_root)
    speculator = Speculator.load(
        turbo_root / "turbo" / "1", hidden_size=64, device=torch.device("cpu"), dtype=torch.float32
    )
    assert speculator.draft_vocab is not None
    vocab = set(speculator.draft_vocab.tolist())
    hidden = torch.randn(5, 64)
    greedy = speculator.propose(hidden, engine.runner.lm_head, 3)
    assert greedy.shape == (5, 3) and set(greedy.flatten().tolist()) <= vocab
    params = SamplingParams(max_tokens=4, temperature=1.0)
    drafts, q = speculator.propose_sampled(hidden[:1], engine.runner.lm_head, params, None)
    assert set(drafts) <= vocab and q.shape == (3, engine.runner.vocab_size)
    outside = torch.ones(engine.runner.vocab_size, dtype=torch.bool)
    outside[speculator.draft_vocab] = False
    assert float(q[:, outside].abs().max()) == 0.0 and torch.allclose(q.sum(-1), torch.ones(3))


def test_batches_larger_than_the_speculation_limit_decode_one_token_a_step(
    tiny_model_dir: Path, turbo_root: Path
) -> None:
    prompts = [[1, 504, 3458, 282 + i] for i in range(3)]
    for limit, speculated in ((2, False), (3, True)):
        engine = make_engine(tiny_model_dir, turbo_root, speculation_max_batch=limit)
        requests = [Collected(engine, p, GREEDY, "heads/1") for p in prompts]
        run_until_done(engine, requests)
        assert [r.token_ids for r in requests] == [
            hf_greedy(tiny_model_dir, None, p, NEW_TOKENS) for p in prompts
        ]
        assert (engine.metrics.spec_steps._value.get() > 0) is speculated


def test_speculation_stops_exactly_at_max_tokens_and_stop_strings(
    tiny_model_dir: Path, turbo_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, turbo_root)
    prompt = [1, 504, 3458, 282]
    plain = Collected(engine, prompt, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), "heads/1")
    run_until_done(engine, [plain])
    assert len(plain.token_ids) == 7
    assert plain.token_ids == hf_greedy(tiny_model_dir, None, prompt, 7)


def test_rejection_sampling_leaves_the_target_distribution_unchanged() -> None:
    """Two chained drafts from a q far from p: the emitted tokens follow p, position by position."""
    from worker.serving.acceptance import accept_sampled

    vocab, trials = 5, 6_000
    params = SamplingParams(temperature=1.0, max_tokens=4)
    target = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2] * 5]))
    draft = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.5], [0.6, 0.1, 0.1, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(7)
    first = torch.zeros(vocab)
    second_given_accept = torch.zeros(vocab)
    accepted_first = 0
    for _ in range(trials):
        drafts = [int(torch.multinomial(draft[k], 1, generator=generator)) for k in range(2)]
        # The target's second row is conditioned on the first draft, as a verify pass gives it; here p
        # does not depend on it, so the test checks the rule, not the model.
        out = accept_sampled(drafts, draft, target, params, generator)
        first[out[0]] += 1
        if len(out) >= 2 and out[0] == drafts[0]:
            accepted_first += 1
            second_given_accept[out[1]] += 1
    p = target.exp()
    assert _chi_square(first, p[0] * trials) < CHI2_DF4_P001
    assert _chi_square(second_given_accept, p[1] * second_given_accept.sum()) < CHI2_DF4_P001
    # The check can fail: scored against q instead of p the first position is far off.
    assert _chi_square(first, draft[0] * trials) > 100 * CHI2_DF4_P001
    assert 0 < accepted_first < trials


# Chi-square critical value, 4 degrees of freedom (5 tokens), p = 0.001.
CHI2_DF4_P001 = 18.47


def _chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("adapter", ["heads/1", "turbo/1"])  # whole vocabulary / the trained draft vocabulary
def test_sampled_requests_speculate_and_stay_reproducible_per_seed(
    tiny_model_dir: Path, turbo_root: Path, adapter: str
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = make_engine(tiny_model_dir, turbo_root)
        request = Collected(engine, [1, 504, 3458, 282], params, adapter)
        run_until_done(engine, [request])
        runs.append(request.token_ids)
        assert engine.metrics.spec_steps._value.get() > 0
    assert runs[0] == runs[1] and len(runs[0]) == 12


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_drafts_after_an_end_of_sequence_draft_are_not_verified(
    tiny_model_dir: Path, turbo_root: Path, ignore_eos: bool
) -> None:
    """Accepting an EOS draft ends the request, so verifying drafts behind it only costs rows."""
    engine = make_engine(tiny_model_dir, turbo_root)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=ignore_eos)
    request = engine.add_request([1, 2, 3], params)
    engine.step()  # the prefill: the request now holds cache blocks
    eos = min(engine.runner.eos_token_ids)
    request.drafts = [5, eos, 6, 7]
    assert engine.drafter.to_verify(request) == ([5, eos, 6, 7] if ignore_eos else [5, eos])

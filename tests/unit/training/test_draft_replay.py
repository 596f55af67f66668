"""The replay of greedy speculative decoding counts steps, drafts and accepted tokens as the engine does."""

from __future__ import annotations

import torch

from worker.training.draft_replay import NO_DRAFT, HeldOutText, ReplayCounts, replay

EOS = 9


def text(prompt: list[int], continuation: list[int]) -> HeldOutText:
    tokens = torch.tensor(prompt + continuation)
    return HeldOutText(len(prompt), tokens, torch.zeros(1, len(tokens), 4))


def perfect_drafts(held: HeldOutText, depth: int) -> torch.Tensor:
    """[S, K]: at t, the true tokens t + 2 .. t + K + 1 (what a perfect eagle chain or Medusa proposes)."""
    tokens = held.tokens.tolist()
    table = torch.full((len(tokens), depth), NO_DRAFT, dtype=torch.long)
    for t in range(len(tokens)):
        for j in range(depth):
            if t + j + 2 < len(tokens):
                table[t, j] = tokens[t + j + 2]
    return table


def test_perfect_drafts_emit_depth_plus_one_tokens_a_step_until_the_answer_ends() -> None:
    held = text([1, 2, 3], [10, 11, 12, 13, 14, 15, 16, EOS])  # 8 tokens: 1 from prefill, 7 to verify
    counts = replay(held, perfect_drafts(held, 3), max_new_tokens=32, eos_token_ids={EOS})
    # Step 1 accepts 11 12 13 and adds 14; step 2 accepts 15 16 and the EOS draft: the engine counts an
    # accepted end-of-sequence draft as accepted, and the request ends there.
    assert counts == ReplayCounts(steps=2, drafted=6, accepted=6)
    assert counts.mean_accepted_length == 4.0


def test_a_wrong_first_draft_emits_one_token_and_the_drafts_after_it_count_as_drafted() -> None:
    held = text([1, 2], [10, 11, 12, EOS])
    wrong = torch.full((6, 2), 5, dtype=torch.long)  # never right
    counts = replay(held, wrong, max_new_tokens=32, eos_token_ids={EOS})
    assert counts == ReplayCounts(steps=3, drafted=6, accepted=0)
    assert counts.mean_accepted_length == 1.0 and counts.acceptance_rate == 0.0


def test_drafts_are_cut_to_the_tokens_the_request_may_still_emit() -> None:
    held = text([1], [10, 11, 12, 13])  # max_tokens 4 reached without EOS
    counts = replay(held, perfect_drafts(held, 5), max_new_tokens=4, eos_token_ids={EOS})
    # After the prefill's token 3 more may come: 2 drafts verified and one token of the model's own.
    assert counts == ReplayCounts(steps=1, drafted=2, accepted=2)


def test_nothing_is_drafted_past_an_end_of_sequence_draft() -> None:
    held = text([1], [10, 11, 12, 13, 14])
    table = perfect_drafts(held, 4)
    table[0] = torch.tensor([11, EOS, 13, 14])  # the second draft ends the sequence
    counts = replay(held, table, max_new_tokens=32, eos_token_ids={EOS})
    # Step 1 verifies 11 and the EOS draft only (13 14 after it are never sent): 11 accepted, the model
    # adds 12; step 2 verifies 13 14 (the text ends there): both accepted.
    assert counts == ReplayCounts(steps=2, drafted=2 + 2, accepted=1 + 2)


def test_counts_add_up_over_texts() -> None:
    total = ReplayCounts(2, 5, 3) + ReplayCounts(1, 2, 2)
    assert total == ReplayCounts(3, 7, 5)
    assert ReplayCounts().mean_accepted_length == 1.0

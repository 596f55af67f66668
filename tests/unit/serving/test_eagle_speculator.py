"""Eagle draft-layer speculation: greedy output unchanged, the incremental draft cache equal to a
from-scratch recomputation, sampled requests reproducible, broken artifacts refused."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import Collected, hf_greedy, make_engine, run_until_done, step
from safetensors.torch import load_file, save_file
from serving_support import make_random_eagle, make_random_heads
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from worker.serving.eagle import EagleDraft, ModelShape
from worker.serving.engine import LLMEngine
from worker.serving.errors import AdapterLoadError
from worker.serving.params import SamplingParams

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
DEPTH = 3
# tiny-random-llama repeats a prompt's last token forever: 282 after this prompt.
REPEATING_PROMPT = [1, 504, 3458, 282]


@pytest.fixture(scope="module")
def eagle_root(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`eagle/1`: a random draft layer on the base model; `eagle/2`: another with acme/2's LoRA and a
    draft vocabulary; `echo/1`: a layer whose output is its input hidden state (drafts repeat the last
    token, which is what tiny-random-llama does); `sharp/1`: the same with its logits scaled 3x (a q
    that differs from p on the same tokens); `heads/1`: Medusa heads; `acme/*`: plain LoRAs."""
    root = tmp_path_factory.mktemp("eagle-adapters")
    make_random_eagle(root / "eagle" / "1", tiny_model_dir, depth=DEPTH, seed=1)
    lora = root / "eagle" / "2"
    shutil.copytree(adapter_root / "acme" / "2", lora)
    make_random_eagle(lora, tiny_model_dir, depth=4, seed=2, draft_vocab=[*range(0, 49152, 7), 282])
    echo = make_random_eagle(root / "echo" / "1", tiny_model_dir, depth=DEPTH, seed=3)
    state = load_file(echo / "speculator.safetensors")
    for name, weight in state.items():
        if name.endswith("proj.weight"):
            state[name] = torch.zeros_like(weight)
    state["fc.weight"] = torch.cat([torch.eye(64), torch.zeros(64, 64)], 1)  # u = h: o = h
    save_file(state, str(echo / "speculator.safetensors"))
    sharp = root / "sharp" / "1"
    shutil.copytree(echo, sharp)
    state["fc.weight"] = 3 * state["fc.weight"]  # o = 3h: drafts from logits 3x sharper than the model's
    save_file(state, str(sharp / "speculator.safetensors"))
    make_random_heads(root / "heads" / "1", hidden_size=64, num_heads=3)
    for plain in (adapter_root / "acme").iterdir():
        (root / "acme").mkdir(exist_ok=True)
        (root / "acme" / plain.name).symlink_to(plain)
    return root


def _spec(engine: LLMEngine, name: str) -> float:
    return float(getattr(engine.metrics, name)._value.get())


@pytest.mark.parametrize("batched", [True, False])
def test_eagle_medusa_and_plain_requests_match_greedy_decoding(
    tiny_model_dir: Path, eagle_root: Path, batched: bool
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer(f"Say the number {i}.")["input_ids"] for i in range(4)]
    cases = [
        ("eagle/1", prompts[0]),
        ("eagle/1", prompts[1]),
        ("eagle/2", prompts[2]),
        ("echo/1", REPEATING_PROMPT),
        ("heads/1", prompts[3]),
        ("acme/2", prompts[0]),
        (None, prompts[2]),
    ]
    lora_dir = {"eagle/2": eagle_root / "eagle" / "2", "acme/2": eagle_root / "acme" / "2"}
    expected = [hf_greedy(tiny_model_dir, lora_dir.get(a or ""), p, NEW_TOKENS) for a, p in cases]
    if batched:
        engine = make_engine(tiny_model_dir, eagle_root, speculation_max_batch=len(cases))
        requests = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in cases]
        run_until_done(engine, requests)
    else:
        requests = []
        for adapter, prompt in cases:
            engine = make_engine(tiny_model_dir, eagle_root)
            requests.append(Collected(engine, prompt, GREEDY, adapter))
            run_until_done(engine, requests[-1:])
    assert [r.error for r in requests] == [None] * len(cases)
    assert [r.token_ids for r in requests] == expected
    stats = [r.outputs[-1].speculation for r in requests]
    assert [s is not None for s in stats] == [True] * 5 + [False] * 2
    assert all(s.steps > 0 and s.drafted > 0 for s in stats if s)
    echo = stats[3]
    assert echo is not None and echo.accepted == echo.drafted  # every repeated-token draft is right
    # Alone it drafts its full depth; in the batch of five speculating requests the CPU kernel's 8-row
    # budget leaves each one draft a step (Drafter.depth, drafting.py), all of them accepted.
    assert echo.mean_accepted_length == (2.0 if batched else pytest.approx(1 + DEPTH, abs=1.5))


def test_speculation_metrics_count_eagle_drafts(tiny_model_dir: Path, eagle_root: Path) -> None:
    engine = make_engine(tiny_model_dir, eagle_root)
    requests = [
        Collected(engine, REPEATING_PROMPT, GREEDY, "echo/1"),
        Collected(engine, [1, 9, 8], GREEDY, "eagle/1"),
    ]
    run_until_done(engine, requests)
    stats = [r.outputs[-1].speculation for r in requests]
    assert all(s is not None for s in stats)
    assert _spec(engine, "spec_drafted") == sum(s.drafted for s in stats if s) > 0
    assert _spec(engine, "spec_accepted") == sum(s.accepted for s in stats if s) > 0
    assert _spec(engine, "spec_steps") == sum(s.steps for s in stats if s)
    # The echo request needs far fewer steps than tokens: 1 + DEPTH tokens a step.
    echo = stats[0]
    assert echo is not None and echo.steps <= NEW_TOKENS // (DEPTH + 1) + 1


def test_requests_in_a_batch_over_the_limit_stop_speculating_and_stay_exact(
    tiny_model_dir: Path, eagle_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, eagle_root, speculation_max_batch=1)
    short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    requests = [
        Collected(engine, REPEATING_PROMPT, GREEDY, "echo/1"),
        Collected(engine, [1, 100, 200], short, "eagle/1"),
    ]
    run_until_done(engine, requests)
    assert [r.token_ids for r in requests] == [
        hf_greedy(tiny_model_dir, None, REPEATING_PROMPT, NEW_TOKENS),
        hf_greedy(tiny_model_dir, None, [1, 100, 200], 4),
    ]
    # Two requests: no drafts while both ran, and the long one dropped its draft cache (keeping it
    # would mean committing every step of a large batch), so it decoded alone without drafts too.
    assert [r.outputs[-1].speculation for r in requests] == [None, None]
    assert engine.metrics.spec_steps._value.get() == 0


def test_preempted_eagle_requests_rebuild_their_draft_cache_and_outputs_stay_exact(
    tiny_model_dir: Path, eagle_root: Path
) -> None:
    prompt = [1, 504, 3458, 282, 4649, 314, 57, 1107]
    cases = [("eagle/1", prompt[:5]), ("echo/1", prompt[:4]), ("eagle/2", prompt)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    reference = [
        hf_greedy(tiny_model_dir, eagle_root / a if a == "eagle/2" else None, p, 30) for a, p in cases
    ]
    engine = make_engine(tiny_model_dir, eagle_root, speculation_max_batch=3)
    requests = [Collected(engine, p, params, a) for a, p in cases]
    preempted = False
    steps_before: list[int] = []
    deadline = time.monotonic() + 60
    while not all(r.done for r in requests) and time.monotonic() < deadline:
        step(engine)
        seqs = [r.request.seq for r in requests]
        if not preempted and all(len(s.output_token_ids) >= 6 for s in seqs):
            for seq in (seqs[0], seqs[2]):  # as the scheduler does when the KV cache runs out
                engine.scheduler.running.remove(seq)
                engine.scheduler._preempt(seq)
            preempted = True
            steps_before = [r.request.speculation.steps if r.request.speculation else 0 for r in requests]
        for r in requests:
            r.drain()
            state, seq = r.request.draft_state, r.request.seq
            if not r.done and seq.num_cached:
                assert state is not None and state.length == len(seq) - 1  # every verified position

    assert preempted
    assert [r.token_ids for r in requests] == reference
    steps_after = [s.steps if (s := r.outputs[-1].speculation) else 0 for r in requests]
    assert steps_after[0] > steps_before[0] and steps_after[2] > steps_before[2]  # drafting went on


# --- the draft cache against a from-scratch recomputation --------------------------------------------


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x `[N, H, hd]` rotated by its positions (Llama's default RoPE, rotate-half convention)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    rotated = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rotated * sin


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_layer(
    w: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    embed: torch.Tensor,
    hidden: torch.Tensor,
    tokens: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft layer over every pair (hidden[p], tokens[p]) at positions 0..n-1 with a full causal
    mask: outputs `[n, D]` and the roped keys `[n, Hkv, hd]`."""
    n, hq, hkv, hd, eps = (
        len(tokens),
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
        cfg["eps"],
    )
    positions = torch.arange(n)
    u = torch.cat([hidden, embed[torch.tensor(tokens)]], -1) @ w["fc.weight"].T
    a = _rms(u, w["layer.input_norm.weight"], eps)
    q = _rope((a @ w["layer.q_proj.weight"].T).view(n, hq, hd), positions, cfg["theta"])
    k = _rope((a @ w["layer.k_proj.weight"].T).view(n, hkv, hd), positions, cfg["theta"])
    v = (a @ w["layer.v_proj.weight"].T).view(n, hkv, hd)
    group = hq // hkv
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [n, Hq, hd]
    scores = torch.einsum("qhd,khd->hqk", q, k_full) / hd**0.5
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_full).reshape(n, hq * hd)
    u = u + attn @ w["layer.o_proj.weight"].T
    b = _rms(u, w["layer.post_norm.weight"], eps)
    mlp = torch.nn.functional.silu(b @ w["layer.gate_proj.weight"].T) * (b @ w["layer.up_proj.weight"].T)
    return u + mlp @ w["layer.down_proj.weight"].T, k


def reference_drafts(
    w: dict[str, torch.Tensor], cfg: dict[str, Any], model: Any, sequence: list[int], depth: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy drafts after `sequence`, recomputing every pair from scratch, and the committed keys."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([sequence])).last_hidden_state[0]  # [L, D] final-norm
        embed, lm_head = model.model.embed_tokens.weight, model.lm_head.weight
        features, tokens = hidden[:-1], list(sequence[1:])  # pairs (h_p, x_{p+1}), p = 0..L-2
        committed_keys = reference_layer(w, cfg, embed, features, tokens)[1]
        drafts: list[int] = []
        for _ in range(depth):
            outputs, _ = reference_layer(w, cfg, embed, features, tokens)
            drafts.append(int((outputs[-1] @ lm_head.T).argmax()))
            features, tokens = torch.cat([features, outputs[-1:]]), [*tokens, drafts[-1]]
    return drafts, committed_keys


def test_incremental_draft_cache_matches_a_from_scratch_recomputation(
    tiny_model_dir: Path, eagle_root: Path
) -> None:
    directory = eagle_root / "eagle" / "1"
    weights = load_file(directory / "speculator.safetensors")
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    cfg = json.loads((directory / "speculator_config.json").read_text())
    cfg |= {"eps": cfg["rms_norm_eps"], "theta": model_config.rope_parameters["rope_theta"]}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = make_engine(tiny_model_dir, eagle_root)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    collected = Collected(engine, REPEATING_PROMPT, params, "eagle/1")
    request = collected.request
    deadline = time.monotonic() + 30
    while not request.seq.output_token_ids and time.monotonic() < deadline:  # the adapter loads first
        step(engine)
    # Forced drafts (the model emits 282 forever): partly accepted, rejected at once, fully accepted,
    # then the layer's own proposals.
    forced: list[list[int] | None] = [[282, 282, 7], [5, 282, 282], [282, 282, 282], None, [282, 9, 9], None]
    accepted: list[int] = []
    for drafts in [None, *forced]:  # None first: the state after the prefill
        if accepted or drafts is not None:
            if drafts is not None:
                request.drafts = drafts
            before = len(request.seq)
            engine.step()
            accepted.append(len(request.seq) - before - 1)
        else:
            accepted.append(-1)
        sequence = request.seq.all_token_ids
        state = request.draft_state
        assert state is not None and state.length == len(sequence) - 1
        expected, keys = reference_drafts(weights, cfg, model, sequence, DEPTH)
        assert request.drafts == expected, (sequence, accepted)
        torch.testing.assert_close(state.keys[: state.length], keys, atol=1e-4, rtol=1e-4)
    assert accepted[:4] == [-1, 2, 0, 3] and accepted[5] == 1


def test_the_serving_layer_computes_what_training_unrolls(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The training side's draft (worker/training/eagle.py), saved and served: committed pairs and
    chained steps fed the true next tokens give the outputs of its training-time-test passes."""
    from types import SimpleNamespace

    from worker.training.eagle import EagleDraft as TrainingDraft
    from worker.training.speculator import SpeculatorConfig

    config = SpeculatorConfig(
        hidden_size=64, num_heads=DEPTH, architecture="eagle_layer", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(5)
    trained = TrainingDraft(config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0, param.shape[-1] ** -0.5)
    trained.save(tmp_path)
    served = _load(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 77, 1000, 5, 9, 31, 282, 12, 4]])
    length, t = ids.shape[1], ids.shape[1] - DEPTH - 1  # commit pairs 0..t, then chain DEPTH - 1 steps
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state  # [1, L, D]
        embed = model.model.embed_tokens
        cos, sin = model.model.rotary_emb(hidden, torch.arange(length)[None])
        passes = trained.unroll(
            hidden, embed(torch.nn.functional.pad(ids[:, 1:], (0, 1))), torch.zeros_like(ids), cos, sin
        )
        table_cos, table_sin = model.model.rotary_emb(hidden, torch.arange(64)[None])
        ctx = SimpleNamespace(embed=embed.weight, cos=table_cos[0], sin=table_sin[0], lm_head=model.lm_head)
        state = served.new_state()
        rows = torch.arange(t + 1)
        outputs = served.layer(ctx, hidden[0, : t + 1], ids[0, 1 : t + 2], rows, [(state, 0, t + 1, 0)])
        torch.testing.assert_close(outputs, passes[0][0, : t + 1], atol=1e-5, rtol=1e-4)
        state.length = t + 1
        chained = outputs[-1:]
        for j in range(1, DEPTH):
            position = torch.tensor([t + j])
            chained = served.layer(
                ctx, chained, ids[0, t + j + 1 : t + j + 2], position, [(state, 0, 1, t + j)]
            )
            torch.testing.assert_close(chained[0], passes[j][0, t + j], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_the_draft_chain_stops_once_every_request_drafted_an_end_of_sequence(
    tiny_model_dir: Path, eagle_root: Path, ignore_eos: bool
) -> None:
    """echo/1 drafts the token the last hidden state predicts, again and again: declared EOS, it ends
    the chain after one draft for a request that stops at EOS, and for a batch only once all have."""
    from types import SimpleNamespace

    from worker.serving.eagle import PendingPairs

    draft = _load(eagle_root / "echo" / "1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor([REPEATING_PROMPT])).last_hidden_state[0]
        repeated = int(model.lm_head(hidden[-1]).argmax())
        cos, sin = model.model.rotary_emb(hidden[None], torch.arange(64)[None])
        ctx = SimpleNamespace(
            embed=model.model.embed_tokens.weight, cos=cos[0], sin=sin[0], lm_head=model.lm_head,
            eos_token_ids=frozenset({repeated}),
        )  # fmt: skip

        def pending(params: SamplingParams) -> PendingPairs:
            return PendingPairs(draft.new_state(), hidden, [*REPEATING_PROMPT[1:], repeated], params)

        stops = SamplingParams(max_tokens=8, temperature=0, ignore_eos=ignore_eos)
        (alone,) = draft.commit_and_propose(ctx, [pending(stops)])
        assert alone is not None and alone[0] == [repeated] * (DEPTH if ignore_eos else 1)
        ignores = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        together = draft.commit_and_propose(ctx, [pending(stops), pending(ignores)])
        assert [p[0] for p in together if p is not None] == [[repeated] * DEPTH] * 2


# --- sampled requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["eagle/1", "eagle/2"])  # whole vocabulary / a draft vocabulary
def test_sampled_requests_with_eagle_drafts_are_valid_and_reproducible_per_seed(
    tiny_model_dir: Path, eagle_root: Path, adapter: str
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = make_engine(tiny_model_dir, eagle_root)
        request = Collected(engine, [1, 504, 3458, 282], params, adapter)
        run_until_done(engine, [request])
        runs.append(request.token_ids)
        assert engine.metrics.spec_steps._value.get() > 0
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert all(0 <= t < engine.runner.vocab_size for t in runs[0])


def test_sampled_eagle_speculation_leaves_the_joint_distribution_of_two_tokens_unchanged(
    tiny_model_dir: Path, eagle_root: Path
) -> None:
    """End to end through the engine: the first token comes from the prefill, the second from a verify
    step of two eagle drafts (sharp/1's q ranks tokens as the model did a position earlier, 3x sharper,
    so drafts are accepted and rejected, often by the min(1, p/q) rule itself). The (first, second)
    counts over many seeded requests must follow p(t1) p(t2 | t1) from HF's logits, warped as the
    request asks. (Checked to fail for a rule that accepts every draft p allows.)"""
    from worker.serving.sampling import warped_probs

    prompt = [1, 504, 3458]
    params = [
        SamplingParams(max_tokens=4, temperature=1.0, top_k=5, seed=seed, ignore_eos=True)
        for seed in range(3000)
    ]
    # No small-step kernel: its 8-row budget would cut a batch of speculating requests to one draft each.
    engine = make_engine(tiny_model_dir, eagle_root, small_step_weights=False, speculation_max_batch=100)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(params), 100):
        requests = [Collected(engine, prompt, p, "sharp/1") for p in params[start : start + 100]]
        run_until_done(engine, requests)
        pairs += [(r.token_ids[0], r.token_ids[1]) for r in requests]
    drafted, accepted = _spec(engine, "spec_drafted"), _spec(engine, "spec_accepted")
    assert _spec(engine, "spec_steps") >= len(params) and 0 < accepted < drafted  # both branches taken

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    warp = params[0]
    with torch.no_grad():
        first = warped_probs(model(torch.tensor([prompt])).logits[:, -1], [warp])[0]
        support = first.nonzero()[:, 0].tolist()
        second = warped_probs(
            model(torch.tensor([[*prompt, t] for t in support])).logits[:, -1], [warp] * len(support)
        )
    expected, observed = [], []
    for i, t1 in enumerate(support):
        for t2 in second[i].nonzero()[:, 0].tolist():
            expected.append(float(first[t1] * second[i, t2]) * len(pairs))
            observed.append(sum(pair == (t1, t2) for pair in pairs))
    assert len(expected) == 25 and sum(observed) == len(pairs)  # top-k 5 twice; nothing outside it
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    assert chi2 < CHI2_DF24_P001, (observed, [round(e) for e in expected])


# Chi-square critical value, 24 degrees of freedom (5 x 5 cells), p = 0.001.
CHI2_DF24_P001 = 51.18


def test_sampled_eagle_drafts_come_with_q_zero_outside_the_draft_vocabulary(
    tiny_model_dir: Path, eagle_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, eagle_root)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    collected = Collected(engine, [1, 504, 3458], params, "eagle/2")
    request = collected.request
    deadline = time.monotonic() + 30
    while not request.drafts and time.monotonic() < deadline:
        step(engine)
    speculator = request.adapter.speculator if request.adapter else None
    assert isinstance(speculator, EagleDraft) and speculator.draft_vocab is not None
    q = request.draft_probs
    assert q is not None and q.shape == (4, engine.runner.vocab_size) and len(request.drafts) == 4
    outside = torch.ones(engine.runner.vocab_size, dtype=torch.bool)
    outside[speculator.draft_vocab] = False
    assert float(q[:, outside].abs().max()) == 0.0 and torch.allclose(q.sum(-1), torch.ones(4))
    assert all(float(q[j, d]) > 0 for j, d in enumerate(request.drafts))


# --- broken artifacts -------------------------------------------------------------------------------

SHAPE = ModelShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)


def _load(directory: Path) -> EagleDraft:
    return EagleDraft.load(directory, shape=SHAPE, device=torch.device("cpu"), dtype=torch.float32)


def test_an_eagle_layer_of_another_shape_is_refused_naming_the_field(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = make_random_eagle(tmp_path / "e", tiny_model_dir)
    assert _load(directory).num_heads == DEPTH
    config = json.loads((directory / "speculator_config.json").read_text())
    for key, value in (("hidden_size", 32), ("num_key_value_heads", 4), ("head_dim", 8)):
        (directory / "speculator_config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(AdapterLoadError, match=key):
            _load(directory)


def test_an_eagle_layer_missing_a_weight_or_misshapen_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = make_random_eagle(tmp_path / "e", tiny_model_dir)
    state = load_file(directory / "speculator.safetensors")
    save_file(
        {k: v for k, v in state.items() if k != "layer.o_proj.weight"},
        str(directory / "speculator.safetensors"),
    )
    with pytest.raises(AdapterLoadError, match=r"lacks layer\.o_proj\.weight"):
        _load(directory)
    save_file(
        state | {"layer.up_proj.weight": torch.zeros(100, 64)}, str(directory / "speculator.safetensors")
    )
    with pytest.raises(AdapterLoadError, match=r"layer\.up_proj\.weight is"):
        _load(directory)


def test_a_request_for_a_broken_eagle_adapter_fails_with_the_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = make_random_eagle(tmp_path / "bad" / "1", tiny_model_dir)
    config = json.loads((directory / "speculator_config.json").read_text())
    (directory / "speculator_config.json").write_text(json.dumps(config | {"hidden_size": 128}))
    engine = make_engine(tiny_model_dir, tmp_path)
    request = Collected(engine, [1, 2, 3], GREEDY, "bad/1")
    run_until_done(engine, [request])
    assert isinstance(request.error, AdapterLoadError) and "hidden_size 128" in str(request.error)


@pytest.mark.parametrize("depth", [1, 2])
def test_speculation_depth_caps_the_drafts_of_both_kinds_and_outputs_stay_exact(
    tiny_model_dir: Path, eagle_root: Path, depth: int
) -> None:
    engine = make_engine(tiny_model_dir, eagle_root, speculation_depth=depth, speculation_max_batch=3)
    cases = [("echo/1", REPEATING_PROMPT), ("eagle/1", [1, 9, 8]), ("heads/1", [1, 7, 7, 3])]
    requests = [Collected(engine, prompt, GREEDY, adapter) for adapter, prompt in cases]
    run_until_done(engine, requests)
    for (adapter, prompt), request in zip(cases, requests, strict=True):
        assert request.token_ids == hf_greedy(tiny_model_dir, None, prompt, NEW_TOKENS), adapter
        stats = request.outputs[-1].speculation
        assert stats is not None and 0 < stats.drafted <= depth * stats.steps, adapter
    echo = requests[0].outputs[-1].speculation
    assert echo is not None and echo.accepted == echo.drafted  # the echo draft is always right


def test_a_speculation_depth_below_one_is_refused(tiny_model_dir: Path, eagle_root: Path) -> None:
    with pytest.raises(ValueError, match="speculation_depth must be at least 1"):
        make_engine(tiny_model_dir, eagle_root, speculation_depth=0)


def test_eagle_prompts_are_prefilled_whole_and_keep_speculating_while_chunks_join(
    tiny_model_dir: Path, eagle_root: Path
) -> None:
    """An eagle layer builds its draft cache from a prefill of the whole prompt: its requests never reuse
    a cached prefix nor take chunks, and a chunked step next to them keeps their draft cache."""
    engine = make_engine(tiny_model_dir, eagle_root, max_prefill_tokens=8, speculation_max_batch=2)
    prompt = [1, *range(40, 76)]  # 37 tokens: two full blocks, and longer than a step's budget
    first = Collected(engine, prompt, GREEDY, "eagle/1")
    run_until_done(engine, [first])
    again = Collected(engine, prompt, GREEDY, "eagle/1")
    step(engine)
    step(engine)
    joining = Collected(engine, [1, *range(100, 130)], GREEDY, None)  # prefilled in chunks of <= 7
    step(engine)
    assert engine.scheduler.step_ends is not None  # a chunk next to the eagle request's token
    assert again.request.draft_state is not None and again.request.drafts
    run_until_done(engine, [again, joining])
    expected = hf_greedy(tiny_model_dir, None, prompt, NEW_TOKENS)
    assert first.token_ids == again.token_ids == expected
    assert joining.token_ids == hf_greedy(tiny_model_dir, None, [1, *range(100, 130)], NEW_TOKENS)
    assert engine.metrics.prefix_hits._value.get() == 0  # type: ignore[attr-defined]
    stats = again.outputs[-1].speculation
    assert stats is not None and stats.drafted > 0

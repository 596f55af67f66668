"""Turbo speedup: speculative decoding with a trained speculator against plain decoding, in one run.

Run: .venv/bin/python bench/turbo_speedup.py [--lora-steps N] [--speculator-steps N]
     [--architecture eagle|medusa] [--depth K] [--serve-depth K] [--compare-medusa STEPS]
     [--dtype fp32|bf16] [--serve-dtype fp32|bf16] [--keep DIR] [--skip-training DIR] [--repeats 5]
     [--quick] [--json PATH]
Base model smollm2-135m, the demo task (dates in words -> YYYY-MM-DD, app/demo/dataset.py). With no
options every job is the demo's config with only `adapter` changed, so it trains what a default job
trains: the demo's steps for the model, then for turbo types the speculator phase until the held-out
accepted length stops improving (worker/training/speculator_phase.py). Trains, timing each:
  (a) `lora`: a plain LoRA (the peer);
  (b) `turbo`: a speculator only (default: the EAGLE-style draft layer) on top of (a) (init_from its
      artifact, LoRA frozen);
  (c) `turbo_lora`: LoRA and speculator trained jointly, then the speculator phase on the LoRA;
  (d) with --compare-medusa: Medusa heads on (a), the other architecture, timed single stream.
Each turbo artifact's training-time estimate of the accepted length is printed beside the engine's
measurement of it.
Then one engine serves (a), (b), (c) and (c) copied without its speculator files, and on the held-out
demo prompts (chat template, as training formats them; greedy, stopping at EOS) measures
  - single stream, one prompt after another: decode rate, each request's first token excluded
    (that one is prefill): sum(tokens - 1) / sum(last token - first token);
  - batches (--batches, default 1,2,8): the prompts in groups sent together, one group after
    another; per group the first token anywhere to the last token anywhere, summed;
    batches above the engine's speculation_max_batch (2 on the CPU) decode without drafts;
for (b) against (a) (speculative vs plain: the same LoRA weights) and (c) with against without heads.
Every measurement runs --repeats rounds, interleaved; rates are the rounds' median, and the per-round
ratios' range is printed beside each (a batch-8 round lasts ~0.3 s, so one round can be disturbed).
Greedy outputs must be identical with and without speculation. Acceptance from the engine's
counters: mean accepted length = (accepted + steps) / steps tokens per verification step, acceptance
rate = accepted / drafted. Target: >= 2.5x single stream. Never a pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the base model is built locally

BASE_MODEL = "smollm2-135m"
REPO = "turbo"
# The adapters as the engine sees them: `<root>/turbo/<N>`.
LORA, LORA_TURBO, TURBO_LORA, TURBO_LORA_BARE = "turbo/1", "turbo/2", "turbo/3", "turbo/4"
LORA_MEDUSA = "turbo/5"  # --compare-medusa: Medusa heads (the other architecture) on the same LoRA
SPECULATOR_FILES = ("speculator.safetensors", "speculator_config.json")
QUICK_STEPS = 3


@dataclass
class Stream:
    tokens: list[int]
    received: list[float]  # time.perf_counter() when each token reached this caller


@dataclass
class Measured:
    """One adapter at one batch size over --repeats rounds: the rounds' outputs and decode rates."""

    outputs: list[list[list[int]]]  # per round, per prompt
    rates: list[float]  # decode tok/s per round
    spec_steps: float = 0.0
    spec_drafted: float = 0.0
    spec_accepted: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def mean_accepted_length(self) -> float:
        return (self.spec_accepted + self.spec_steps) / self.spec_steps if self.spec_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_drafted if self.spec_drafted else 0.0


# --- training ---------------------------------------------------------------------------------------


def train_all(
    args: argparse.Namespace, root: Path, scratch: Path
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Trains those of (a), (b), (c) missing from `<root>/turbo/1..3`; returns each one's training seconds
    and, by adapter id, its training-time estimate of the accepted length (printed beside the engine's).

    Each artifact is also copied to --keep as soon as it exists, so an interrupted run can go on.
    Without options each is what a job with the demo's config and only `adapter` changed trains.
    """
    from app.demo.dataset import demo_rows
    from app.demo.job import demo_config
    from worker.training.loop import train

    base = demo_config().model_dump(exclude_unset=True) | {"base_model": BASE_MODEL}
    base |= {"dtype": args.dtype} if args.dtype else {}
    base |= {"train_steps": args.lora_steps} if args.lora_steps else {}
    if args.eval_samples:  # the end-of-run exact-match report generates on every held-out row otherwise
        base["max_eval_samples"] = args.eval_samples
    heads: dict[str, Any] = {"speculator_architecture": args.architecture}
    heads |= {"speculator_heads": args.depth} if args.depth else {}
    if args.speculator_steps is not None:
        heads["speculator_train_steps"] = args.speculator_steps
    plans = [
        ("lora", LORA, {"adapter": "lora"}, None),
        ("turbo on the lora", LORA_TURBO, {"adapter": "turbo"} | heads, LORA),
        ("turbo_lora", TURBO_LORA, {"adapter": "turbo_lora"} | heads, None),
    ]
    if args.compare_medusa:
        plans.append(("medusa heads on the lora", LORA_MEDUSA,
                      {"adapter": "turbo", "speculator_train_steps": args.compare_medusa,
                       "speculator_architecture": "medusa", "speculator_heads": None}, LORA))  # fmt: skip
    rows, seconds = demo_rows(), {}
    estimates: dict[str, float | None] = {}
    for name, adapter_id, overrides, parent in plans:
        if (root / adapter_id).is_dir():
            print(f"reusing {name} from --skip-training", flush=True)
            continue
        config = type(demo_config()).model_validate(base | overrides)
        if overrides["adapter"] == "turbo":
            config = config.model_copy(update={"rank": None})  # heads only: no LoRA of its own
        print(f"training {name}: {config.train_steps} steps ...", flush=True)
        started = time.monotonic()
        result = train(
            config,
            rows,
            output_dir=scratch / adapter_id,
            cache_dir=args.cache_dir,
            init_from=root / parent if parent else None,
        )
        if result.adapter_dir is None:
            raise RuntimeError(f"training {name} stopped without an artifact")
        shutil.copytree(result.adapter_dir, root / adapter_id)
        if args.keep:
            shutil.copytree(result.adapter_dir, args.keep / adapter_id, dirs_exist_ok=True)
        seconds[name] = result.train_seconds
        spec = result.summary.get("speculator") or {}
        print(
            f"  {name}: {result.train_seconds:.0f} s of training ({time.monotonic() - started:.0f} s wall "
            f"with loading and evaluation), eval loss {result.eval_loss_after:.3f}"
            + (f"\n    {_phases(result.steps, spec)}" if spec else ""),
            flush=True,
        )
        estimates[adapter_id] = (spec.get("estimate") or {}).get("mean_accepted_length")
    return seconds, estimates


def _phases(steps: int, spec: dict[str, Any]) -> str:
    """How many steps each phase took and why the speculator's stopped."""
    phase = spec.get("phase") or {}
    heads_steps = phase.get("steps", 0)
    history = ", ".join(f"{v:.2f}@{int(s)}" for s, v in phase.get("history", []))
    return (
        f"model phase {steps - heads_steps} steps; speculator phase {heads_steps} steps "
        f"({phase.get('seconds', 0):.0f} s; {phase.get('stop_reason')}); held-out accepted length by "
        f"step: {history}; estimated accepted length {spec.get('estimated_accepted_length')}"
    )


def strip_heads(root: Path) -> None:
    """(c) without its speculator: the same LoRA weights, decoded one token a step."""
    bare = root / TURBO_LORA_BARE
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(root / TURBO_LORA, bare, ignore=shutil.ignore_patterns(*SPECULATOR_FILES))


# --- prompts and the engine -------------------------------------------------------------------------


def held_out_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """The first `count` evaluation rows, rendered as training renders prompt/completion rows."""
    from app.demo.dataset import demo_rows

    rows = [row for row in demo_rows() if row["split"] == "evaluation"][:count]
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{BASE_MODEL} has no chat template: training would format prompts raw")
    # As worker/training/data.py does: render the chat as text, then tokenize without extra specials.
    texts = [
        str(tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                          add_generation_prompt=True))
        for row in rows
    ]  # fmt: skip
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def start_engine(model_dir: Path, root: Path, dtype: str, max_batch: int, depth: int | None) -> Any:
    from worker.serving.adapters import LocalDirectorySource
    from worker.serving.async_engine import AsyncEngine
    from worker.serving.engine import EngineConfig

    config = EngineConfig(
        model_path=model_dir, model_name=BASE_MODEL, dtype=dtype, max_batch_size=max_batch,
        speculation_depth=depth,
    )  # fmt: skip
    engine = AsyncEngine(config, source=LocalDirectorySource(root))
    engine.start()
    wanted = [LORA, LORA_TURBO, TURBO_LORA, TURBO_LORA_BARE]
    if (root / LORA_MEDUSA).is_dir():
        wanted.append(LORA_MEDUSA)
    engine.preload(wanted)
    deadline = time.monotonic() + 120
    while len(engine.loaded_adapters()) < len(wanted):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine loaded only {engine.loaded_adapters()} in 120 s")
        time.sleep(0.05)
    return engine


async def stream(engine: Any, prompt: list[int], adapter_id: str, max_tokens: int) -> Stream:
    from worker.serving.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    out = Stream([], [])
    adapter = await asyncio.to_thread(engine.resolve_adapter, adapter_id, None)  # as the server does
    async for token in engine.generate(prompt, params, adapter):
        out.received.append(time.perf_counter())
        out.tokens.append(token.token_id)
    return out


def counters(engine: Any) -> tuple[float, float, float]:
    m = engine.metrics
    return m.spec_steps._value.get(), m.spec_drafted._value.get(), m.spec_accepted._value.get()


async def measure(
    engine: Any, prompts: list[list[int]], adapter_id: str, max_tokens: int, batch: int, into: Measured | None
) -> Measured:
    """Prompts in groups of `batch` sent together, one group after another; decode rate over all. One
    round: added to `into` (the earlier rounds of the same adapter and batch) when given."""
    await stream(engine, prompts[0], adapter_id, 4)  # warm-up
    before = counters(engine)
    streams, seconds = [], 0.0
    for start in range(0, len(prompts), batch):
        group = await asyncio.gather(
            *(stream(engine, p, adapter_id, max_tokens) for p in prompts[start : start + batch])
        )
        # One stream: first to last token; a group: first token anywhere to last token anywhere.
        seconds += max(s.received[-1] for s in group) - min(s.received[0] for s in group)
        streams.extend(group)
    steps, drafted, accepted = (now - then for now, then in zip(counters(engine), before, strict=True))
    decoded = sum(len(s.tokens) - 1 for s in streams)
    result = into or Measured([], [])
    result.outputs.append([s.tokens for s in streams])
    result.rates.append(decoded / max(seconds, 1e-9))
    result.spec_steps += steps
    result.spec_drafted += drafted
    result.spec_accepted += accepted
    return result


# --- the run ------------------------------------------------------------------------------------------


def compare(label: str, spec: Measured, plain: Measured) -> str:
    """Median rates over the rounds; a prompt's output counts as identical only if every speculative
    and every plain round produced the same tokens for it."""
    reference = plain.outputs[0]
    same = sum(
        all(round_[i] == reference[i] for round_ in spec.outputs + plain.outputs)
        for i in range(len(reference))
    )
    ratios = [s / p for s, p in zip(spec.rates, plain.rates, strict=True)]  # rounds measured side by side
    spread = f", rounds {min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else ""
    return (
        f"{label}: speculative {spec.decode_tok_s:.1f} tok/s vs plain {plain.decode_tok_s:.1f} tok/s = "
        f"{spec.decode_tok_s / plain.decode_tok_s:.2f}x{spread} "
        f"(mean accepted length {spec.mean_accepted_length:.1f}, "
        f"acceptance rate {spec.acceptance_rate:.2f}), outputs identical {same}/{len(reference)}"
    )


async def run_all(
    engine: Any, prompts: list[list[int]], max_tokens: int, batches: list[int], medusa: bool, repeats: int
) -> dict[str, Measured]:
    """Every (adapter, batch) once per round, rounds one after another, so a passing disturbance (one
    round of a batch-8 measurement is ~0.3 s) moves one round of one pair, not a whole comparison."""
    runs = [
        (adapter_id, batch)
        for batch in batches
        for adapter_id in (LORA, LORA_TURBO, TURBO_LORA_BARE, TURBO_LORA)
    ]
    if medusa:  # the other architecture on the same LoRA, single stream only
        runs.append((LORA_MEDUSA, 1))
    results: dict[str, Measured] = {}
    for _ in range(repeats):
        for adapter_id, batch in runs:
            key = f"{adapter_id} {batch}"
            results[key] = await measure(engine, prompts, adapter_id, max_tokens, batch, results.get(key))
    return results


def _calibration(adapter_id: str, measured: Measured, estimates: dict[str, float | None]) -> str:
    """The training-time estimate of the accepted length against the engine's count, same prompts."""
    estimate = estimates.get(adapter_id)
    if estimate is None:
        return f"  {adapter_id}: no training-time estimate (trained in an earlier run)"
    error = estimate / measured.mean_accepted_length - 1
    return (
        f"  {adapter_id}: accepted length estimated in training {estimate:.2f}, engine "
        f"{measured.mean_accepted_length:.2f} ({error:+.1%})"
    )


def report(
    results: dict[str, Measured],
    batches: list[int],
    trained: tuple[dict[str, float], dict[str, float | None]],
    limit: int,
) -> dict[str, Any]:
    train_seconds, estimates = trained
    lines, summary = [], {}
    for batch in batches:
        plain, spec = results[f"{LORA} {batch}"], results[f"{LORA_TURBO} {batch}"]
        bare, joint = results[f"{TURBO_LORA_BARE} {batch}"], results[f"{TURBO_LORA} {batch}"]
        what = "single stream" if batch == 1 else f"batch {batch}"
        if batch > limit:
            what += f" (over speculation_max_batch={limit}: decodes one token a step)"
        lines.append(compare(what, spec, plain) + "  [lora + turbo heads vs lora]")
        lines.append(compare(what, joint, bare) + "  [turbo_lora with vs without heads]")
        if batch == 1:
            lines += [_calibration(LORA_TURBO, spec, estimates), _calibration(TURBO_LORA, joint, estimates)]
        measured = {"lora_turbo": spec, "lora": plain, "turbo_lora": joint, "turbo_lora_bare": bare}
        for name, m in measured.items():
            summary[f"{name}_{batch}"] = {
                "decode_tok_s": m.decode_tok_s,
                "decode_tok_s_rounds": m.rates,
                "mean_accepted_length": m.mean_accepted_length,
                "acceptance_rate": m.acceptance_rate,
            }
    if f"{LORA_MEDUSA} 1" in results and f"{LORA} 1" in results:
        lines.append(
            compare("single stream", results[f"{LORA_MEDUSA} 1"], results[f"{LORA} 1"])
            + "  [lora + medusa heads vs lora: the other speculator_architecture]"
        )
    first = results[f"{LORA} {batches[0]}"]
    lengths = [len(t) for t in first.outputs[0]]
    print(
        f"held-out prompts: {len(lengths)}, {min(lengths)}-{max(lengths)} tokens each (greedy, to EOS); "
        f"median of {len(first.rates)} rounds"
    )
    for line in lines:
        print(line)
    if train_seconds:
        print(
            "training seconds (the heads' cost): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in train_seconds.items())
        )
    single = f"{LORA_TURBO} 1"
    if single in results:
        ratio = results[single].decode_tok_s / results[f"{LORA} 1"].decode_tok_s
        print(f"single-stream speedup (turbo heads on the lora vs the lora): {ratio:.2f}x")
    summary["train_seconds"] = train_seconds
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lora-steps", type=int, help="train_steps of every job (default: the demo's)")
    parser.add_argument(
        "--speculator-steps", type=int,
        help="speculator_train_steps (default: until the held-out accepted length stops improving)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="training dtype (default: auto)")
    parser.add_argument(
        "--serve-dtype", choices=["fp32", "bf16"], default="fp32",
        help="the engine's dtype (default fp32: a deployment's default)",
    )  # fmt: skip
    parser.add_argument(
        "--architecture", choices=["eagle", "medusa"], default="eagle", help="speculator_architecture"
    )
    parser.add_argument("--depth", type=int, help="speculator_heads (default: the architecture's)")
    parser.add_argument(
        "--serve-depth", type=int, help="the engine's speculation_depth (default: the trained depth)"
    )
    parser.add_argument(
        "--compare-medusa", type=int, default=0, metavar="STEPS",
        help="also train Medusa heads (3, self-distilled) on the lora for STEPS steps and time them",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    parser.add_argument(
        "--batches", default="1,2,8", help="requests sent together, comma-separated (1 = single stream)"
    )
    parser.add_argument(
        "--kernel-threads", type=int, help="small-step kernel threads (default 2 where there are 2 CPUs)"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="per request; EOS stops earlier")
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds of every measurement; rates are the rounds' median"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps each: an end-to-end check")
    parser.add_argument(
        "--eval-samples", type=int, help="held-out rows each training evaluates (default all)"
    )
    parser.add_argument("--keep", type=Path, help="copy the trained artifacts here")
    parser.add_argument(
        "--skip-training",
        type=Path,
        metavar="DIR",
        help="reuse a previous run's --keep DIR; trains only what it lacks",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.lora_steps = args.speculator_steps = QUICK_STEPS
        args.eval_samples = args.eval_samples or QUICK_STEPS
    return args


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoTokenizer

    from worker.training.base_models import resolve_base_model

    model_dir = resolve_base_model(BASE_MODEL, args.cache_dir)
    prompts = held_out_prompts(AutoTokenizer.from_pretrained(model_dir), args.prompts)
    print(
        f"{BASE_MODEL} training {args.dtype or 'auto'}, serving {args.serve_dtype}, demo task; "
        f"torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tuneforge-turbo-bench-") as tmp:
        root = Path(tmp) / "adapters"
        if args.skip_training:
            shutil.copytree(args.skip_training, root)
        trained = train_all(args, root, Path(tmp) / "runs")
        strip_heads(root)
        if args.keep:
            shutil.copytree(root, args.keep, dirs_exist_ok=True)
        batches = [int(b) for b in args.batches.split(",")]
        engine = start_engine(model_dir, root, args.serve_dtype, max(batches), args.serve_depth)
        kernel = engine.engine.runner.kernel
        if args.kernel_threads and kernel is not None:
            kernel.threads = args.kernel_threads
        print(
            "small-step kernel: "
            + (f"on, {kernel.threads} thread(s)" if kernel is not None else "off (torch GEMM)"),
            flush=True,
        )
        try:
            medusa = (root / LORA_MEDUSA).is_dir()
            results = asyncio.run(run_all(engine, prompts, args.max_tokens, batches, medusa, args.repeats))
            limit = engine.engine.drafter.max_batch
        finally:
            engine.shutdown()
    summary = report(results, batches, trained, limit)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

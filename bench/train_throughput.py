"""Training throughput: tuneforge's training core against HF Trainer + PEFT on the same rows, in one run.

Run: .venv/bin/python bench/train_throughput.py [--rows 128] [--only hf|tuneforge] [--json PATH]
Both sides train LoRA r=8 on q_proj/v_proj of smollm2-135m for one epoch, micro batch 8, seed 42,
on the same deterministic rows (lognormal token lengths in [16, 256], 1/8 held out for evaluation).
HF Trainer with DataCollatorForSeq2Seq(padding=True) in fp32 is what most users would write. Each
side trains in a subprocess of its own so that its peak RSS is its own, and reports useful
(non-padding) tokens per second of training. Both saved adapters are then scored here by one
evaluator: mean cross-entropy over the completion tokens of the held-out rows, one row at a time.
Target: ratio >= 2.0 with an eval loss no more than 1% above the baseline's. Never a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the base model is built locally

BASE_MODEL = "smollm2-135m"
SEED = 42
MIN_TOKENS, MAX_TOKENS = 16, 256
_WORD_LIST = (
    "apple river house green light stone music paper water garden bread table window cloud summer "
    "winter forest doctor market letter silver morning family school story friend mountain horse "
    "yellow orange coffee dinner mirror island bridge flower engine travel simple quiet happy little "
    "bright heavy ocean planet rabbit candle pocket basket rocket castle kitchen butter ticket camera"
)
WORDS = _WORD_LIST.split()  # each one token after a space, so a row's token length can be chosen exactly
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


class SideFailed(RuntimeError):
    """A side could not run as the bench expects; the message says what to fix."""


def build_rows(n_rows: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Rows 'Every second word of w1 .. wL:' -> ' w2 w4 ..' whose token count (EOS included) is lognormal."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    lengths = np.clip(np.rint(rng.lognormal(np.log(64), 0.75, n_rows)), MIN_TOKENS, MAX_TOKENS).astype(int)
    n_eval = max(1, n_rows // 8)
    rows = []
    for index, target in enumerate(lengths.tolist()):
        # tokens = instruction (4, or 5 with "Write") + L words + ":" + L // 2 answer words + EOS
        n_words = max(n for n in range(2 * target) if 6 + n + n // 2 <= target)
        short = 6 + n_words + n_words // 2 == target
        instruction = "Every second word of" if short else "Write every second word of"
        words = rng.choice(WORDS, size=n_words).tolist()
        prompt = f"{instruction} {' '.join(words)}:"
        completion = " " + " ".join(words[1::2])
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        completion_ids.append(tokenizer.eos_token_id)
        if (got := len(prompt_ids) + len(completion_ids)) != target:
            raise RuntimeError(f"row {index}: {got} tokens where {target} were planned")
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "split": "evaluation" if index >= n_rows - n_eval else "train",
                "input_ids": prompt_ids + completion_ids,
                "labels": [-100] * len(prompt_ids) + completion_ids,
            }
        )
    return rows


def useful_train_tokens(rows: list[dict[str, Any]], epochs: int = 1) -> int:
    return epochs * sum(len(row["input_ids"]) for row in rows if row["split"] == "train")


def train_hf(rows: list[dict[str, Any]], model_dir: Path, work: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(SEED)  # the LoRA init draws from the global RNG before Trainer seeds it
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),  # fp32, HF's default on CPU
        LoraConfig(**LORA, task_type="CAUSAL_LM"),
    )
    train_rows = [
        {"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]), "labels": r["labels"]}
        for r in rows
        if r["split"] == "train"
    ]
    arguments = TrainingArguments(
        output_dir=str(work / "hf-trainer"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,  # transformers 5 folded warmup_ratio into warmup_steps
        weight_decay=0.0,
        seed=SEED,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=train_rows, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir = str(work / "hf-adapter")
    model.save_pretrained(adapter_dir)
    return {"useful_tokens": useful_train_tokens(rows), "train_seconds": seconds, "adapter_dir": adapter_dir}


def train_tuneforge(rows: list[dict[str, Any]], cache_dir: Path, work: Path, dtype: str) -> dict[str, Any]:
    try:
        from tuneforge.config import FinetuningConfig

        from worker.training.loop import train
    except ImportError as error:
        raise SideFailed(f"cannot import tuneforge's training core: {error}") from error
    config = FinetuningConfig(
        base_model=BASE_MODEL,
        adapter="lora",
        rank=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["target_modules"],
        micro_batch_size=8,
        effective_batch_size=8,
        epochs=1,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        seed=SEED,
        lr_scheduler={"type": "linear"},
        apply_chat_template=False,
        enable_early_stopping=False,
        load_best_at_end=False,
        checkpoint_every_n_steps=10_000,
        max_seq_length=MAX_TOKENS,
        dtype=dtype,  # "auto": bf16 where the CPU computes it natively, as a user's job would
    )
    text_rows = [{key: row[key] for key in ("prompt", "completion", "split")} for row in rows]
    result = train(config, text_rows, output_dir=work / "tuneforge", cache_dir=cache_dir)
    try:
        measured = {"useful_tokens": result.useful_tokens, "train_seconds": result.train_seconds}
        adapter_dir = result.adapter_dir
    except AttributeError as error:
        raise SideFailed(
            f"train()'s result has no {error.name!r}: the bench needs its adapter_dir, useful_tokens "
            "and train_seconds"
        ) from error
    if adapter_dir is None:
        raise SideFailed("train() returned no adapter_dir: the run stopped before saving an adapter")
    return {**measured, "adapter_dir": str(adapter_dir), "dtype": result.summary["runtime"]["dtype"]}


def run_side(args: argparse.Namespace) -> None:
    """Child entry point: train one side and print one JSON line of results on stdout."""
    rows = json.loads(Path(args.data).read_text())
    work = Path(args.work)
    try:
        if args.side == "hf":
            result = train_hf(rows, Path(args.model_dir), work)
        else:
            result = train_tuneforge(rows, Path(args.cache_dir), work, args.dtype)
    except SideFailed as error:
        print(f"{args.side}: {error}", file=sys.stderr)
        sys.exit(2)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"side": args.side, **result}))


def spawn_side(
    side: str, data: Path, model_dir: Path, cache_dir: Path, work: Path, dtype: str
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--side", side, "--data", str(data), "--work", str(work)]
    command += ["--model-dir", str(model_dir), "--cache-dir", str(cache_dir), "--dtype", dtype]
    print(f"training {side} ...", file=sys.stderr, flush=True)
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode != 0:
        sys.stderr.write(child.stdout)
        raise SideFailed(f"the {side} side exited with status {child.returncode} (its output is above)")
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["useful_tokens"] / result["train_seconds"]
    return result


def eval_loss(model_dir: Path, adapter_dir: str | None, rows: list[dict[str, Any]]) -> float:
    """Token-weighted mean cross-entropy over completion tokens of the eval rows; fp32, no padding."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in (r for r in rows if r["split"] == "evaluation"):
            input_ids = torch.tensor([row["input_ids"]])  # [1, S]
            labels = torch.tensor(row["labels"][1:])  # [S - 1]: the token each position predicts
            logits = model(input_ids=input_ids).logits[0, :-1]  # [S - 1, V]
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def compare(
    rows: list[dict[str, Any]], model_dir: Path, cache_dir: Path, only: str | None, dtype: str
) -> tuple[dict[str, dict[str, Any]], float, list[str]]:
    """Train each side in turn, then score every adapter and the bare base model with one evaluator."""
    results: dict[str, dict[str, Any]] = {}
    failures = []
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-") as tmp:
        data = Path(tmp) / "rows.json"
        data.write_text(json.dumps(rows))
        for side, name in (("tuneforge", "tuneforge"), ("hf", "HF Trainer")):
            if only in (None, side):
                try:
                    results[name] = spawn_side(side, data, model_dir, cache_dir, Path(tmp), dtype)
                except SideFailed as error:
                    failures.append(str(error))
        for result in results.values():  # the adapters live in tmp: score them before it goes
            result["eval_loss"] = eval_loss(model_dir, result.pop("adapter_dir"), rows)
        base_loss = eval_loss(model_dir, None, rows)
    ours = results.get("tuneforge")
    if ours and ours["useful_tokens"] != useful_train_tokens(rows):
        print(
            f"warning: tuneforge trained on {ours['useful_tokens']} useful tokens, the baseline on "
            f"{useful_train_tokens(rows)}: the two tokenisations differ",
            file=sys.stderr,
        )
    return results, base_loss, failures


def report(results: dict[str, dict[str, Any]], base_loss: float, rows: list[dict[str, Any]]) -> None:
    import torch

    lengths = sorted(len(r["input_ids"]) for r in rows)
    n_eval = sum(r["split"] == "evaluation" for r in rows)
    print(
        f"data: {len(rows)} rows ({len(rows) - n_eval} train / {n_eval} eval), "
        f"{useful_train_tokens(rows)} train tokens, lengths {lengths[0]}-{lengths[-1]} "
        f"(median {lengths[len(lengths) // 2]}); torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'side':<12} {'dtype':>5} {'tokens':>7} {'train s':>8} {'tokens/s':>9} {'eval loss':>10} "
        f"{'peak RSS MiB':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r.get('dtype', 'fp32'):>5} {r['useful_tokens']:>7} {r['train_seconds']:>8.1f} "
            f"{r['tokens_per_s']:>9.1f} {r['eval_loss']:>10.4f} {r['peak_rss_mib']:>13.0f}"
        )
    print(f"{'base model':<12} {'':>7} {'':>8} {'':>9} {base_loss:>10.4f}")
    ours, peer = results.get("tuneforge"), results.get("HF Trainer")
    if ours and peer:
        change = 100 * (ours["eval_loss"] - peer["eval_loss"]) / peer["eval_loss"]
        print(
            f"useful tokens/s: tuneforge {ours['tokens_per_s']:.1f} vs HF Trainer {peer['tokens_per_s']:.1f} "
            f"= ratio {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x (target >= 2.0); "
            f"eval loss tuneforge {ours['eval_loss']:.4f} vs HF {peer['eval_loss']:.4f} ({change:+.2f}%); "
            f"peak RSS tuneforge {ours['peak_rss_mib']:.0f} MiB vs HF {peer['peak_rss_mib']:.0f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"))
    parser.add_argument("--only", choices=["hf", "tuneforge"], help="run one side only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="tuneforge's dtype (HF runs fp32)"
    )
    parser.add_argument("--side", choices=["hf", "tuneforge"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    from transformers import AutoTokenizer

    from worker.training.base_models import resolve_base_model

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_base_model(BASE_MODEL, args.cache_dir)
    rows = build_rows(args.rows, AutoTokenizer.from_pretrained(model_dir))
    results, base_loss, failures = compare(rows, model_dir, args.cache_dir, args.only, args.dtype)
    report(results, base_loss, rows)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "base_eval_loss": base_loss}, indent=2) + "\n")
    if failures:
        sys.exit("; ".join(failures))


if __name__ == "__main__":
    main()

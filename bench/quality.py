"""Adapter quality on the demo task: base model vs a LoRA adapter trained here, by exact match.

Run: .venv/bin/python bench/quality.py [--steps 60] [--json PATH]
The task is the quickstart's: dates written in words rewritten as YYYY-MM-DD (600 rows, the
dataset's own 540/60 train/evaluation split). The peer is the base model itself, SmolLM2-135M-
Instruct, prompted with the same chat template: both are scored by tuneforge's quality report
(greedy generation on every held-out row, exact match of the answer text). It prints the base and
adapter accuracy, the eval loss of both, and the CPU training time. Target: adapter >= 95% within
10 minutes of training. Never a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the base model is built locally

from app.demo.dataset import demo_rows
from app.demo.job import demo_config
from worker.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    # The demo's own adapter config: this measures what a newcomer sees after `make demo`.
    config = demo_config()
    if args.steps is not None:
        config = config.model_copy(update={"train_steps": args.steps})
    rows = demo_rows()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tuneforge-quality-") as scratch:
        result = train(config, rows, output_dir=Path(scratch), cache_dir=args.cache_dir)
    wall = time.monotonic() - started
    report = result.summary.get("quality_report", {})
    match = report.get("exact_match", {})
    base, adapter = match.get("base") or {}, match.get("adapter") or {}
    results = {
        "base_model": config.base_model,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "base_exact_match": base.get("accuracy"),
        "adapter_exact_match": adapter.get("accuracy"),
        "held_out_rows": adapter.get("rows"),
        "eval_loss_base": result.eval_loss_before,
        "eval_loss_adapter": result.eval_loss_after,
        "dtype": result.summary.get("runtime", {}).get("dtype"),
        "samples": adapter.get("samples", [])[:3],
    }
    for sample in results["samples"]:
        print(f"  {sample['reference']!r:>14} <- adapter said {sample['prediction']!r}")
    print(
        f"demo task on {config.base_model}: exact match base {_pct(base.get('accuracy'))} -> adapter "
        f"{_pct(adapter.get('accuracy'))} on {adapter.get('rows')} held-out rows (target >= 95%); "
        f"{result.steps} steps, {result.train_seconds / 60:.1f} min of CPU training "
        f"({wall / 60:.1f} min wall with loading and evaluation; target <= 10 min); {report.get('summary')}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


if __name__ == "__main__":
    main()

"""Dataset validation throughput: tuneforge's streaming profiler against pandas loading the same file.

Run: .venv/bin/python bench/dataset_validation.py [--rows 200000]
pandas.read_csv / read_json(lines=True) is the peer most users would reach for to inspect a
dataset; it parses but does not check formats, splits or empty completions, and it holds the
whole file in memory. The ratio shows what the extra checks and streaming cost (or save).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from app.services.dataset_files.formats import profile_dataset
from app.storage.base import CHUNK_BYTES


def _write(path: Path, rows: int) -> None:
    with path.open("w") as handle:
        for i in range(rows):
            prompt = f"Question {i}: what is {i} plus {i * 7}? Explain briefly."
            handle.write(json.dumps({"prompt": prompt, "completion": str(i * 8), "split": "train"}) + "\n")


def _chunks(path: Path):  # type: ignore[no-untyped-def]
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _best_of(runs: int, fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        _write(path, args.rows)
        size_mb = path.stat().st_size / 1e6
        ours = _best_of(args.runs, lambda: profile_dataset(_chunks(path), path.name))
        peer = _best_of(args.runs, lambda: pd.read_json(path, lines=True))
    print(f"file: {args.rows} rows, {size_mb:.1f} MB JSONL")
    print(f"tuneforge profile_dataset: {ours:.2f} s ({size_mb / ours:.1f} MB/s)")
    print(f"pandas read_json(lines):   {peer:.2f} s ({size_mb / peer:.1f} MB/s)")
    print(f"ratio (pandas time / tuneforge time): {peer / ours:.2f}x")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

"""Measures the memory a few training steps take on this CPU, for test_memory_estimate.py (run as a script).

`python memory_probe.py WEIGHTS_DIR CONFIG_JSON STEPS` prints one JSON object: the bytes training
added to the process (peak resident memory during the steps minus resident memory before the model
loaded), and the dtype the run computed in.

Why resident memory, and why reset its peak after loading: torch's CPU tensors come from malloc, which
tracemalloc never sees, and torch keeps no CPU allocator statistics; the kernel's high-water mark
(VmHWM) sees all of it. Loading maps the checkpoint file and may briefly hold it beside the converted
weights, a transient the estimate does not model (on a GPU it happens in host memory), so the mark is
reset (/proc/self/clear_refs, "5") once the model, adapters and optimiser exist and freed heap pages
were handed back (malloc_trim): the peak then covers the steps alone, the weights staying counted
because they are resident from the baseline on.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from worker.training import methods, objective, optim
from worker.training.batches import pack
from worker.training.config import TrainingConfig
from worker.training.data import Example
from worker.training.runtime import resolve_runtime


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim_and_reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _batch(vocab: int, rows: int, length: int, seed: int) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(rows):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append(Example(input_ids=ids, labels=ids))
    return examples


def main(weights_dir: Path, config: TrainingConfig, steps: int) -> dict[str, object]:
    runtime = resolve_runtime(config.dtype)
    tokenizer = AutoTokenizer.from_pretrained(weights_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status_kib("VmRSS") * 1024
    base = methods.load_base(weights_dir, config, runtime)
    targets = list(config.target_modules or methods.default_targets(base))
    trainable = methods.build(config, base, tokenizer, runtime, targets=targets)
    trainable.model.train()
    if trainable.speculator is not None:
        # As preparation does from the data; a corpus using every token: the largest draft vocabulary.
        trainable.speculator.set_draft_vocab([list(range(int(base.config.vocab_size)))])
    optimizer = optim.build_optimizer(
        config.optimizer, trainable.named_trainable(), float(config.learning_rate or 1e-4), runtime.device
    )
    vocab, length = int(base.config.vocab_size), int(config.max_seq_length or 64)
    _trim_and_reset_peak()
    for step in range(steps):
        for micro in range(config.accumulation_steps):
            batch = pack(_batch(vocab, config.micro_batch_size, length, seed=step * 100 + micro))
            with trainable.autocast():
                loss = objective.loss_sum(trainable, batch) / batch.target_count
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status_kib("VmHWM") * 1024
    return {"measured_bytes": peak - baseline, "dtype": runtime.dtype_name}


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), TrainingConfig.model_validate(json.loads(sys.argv[2])), int(sys.argv[3]))
    print(json.dumps(result))

"""One command for a lent GPU: training throughput and memory against the estimate, serving correctness
and decode speed, on smollm2-135m (built offline from the installed GGUF).

Run: .venv/bin/python bench/gpu_check.py [--device cuda|cpu] [--quick] [--json PATH]
About 3-5 minutes on one H100; `--device cpu --quick` proves it end to end on a CPU in a few minutes.

(1) training: bf16 LoRA and 4-bit QLoRA (nf4) steps through worker/training (load_base, build,
    the run's optimiser and objective), packed rows of random tokens: tokens/s over the timed steps,
    peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak resident memory minus before the
    load) next to tuneforge.rules.memory's estimate (its tensors, the runtime overhead left out: the
    allocator's peak does not see the CUDA context).
(2) serving: the engine's greedy tokens (fp32, the base model) equal HF `generate`'s on 8 prompts.
(3) decode tok/s of the engine (bf16 on CUDA, fp32 on a CPU): one stream, and 32 at once.
(4) CUDA, and only where `vllm` imports in this environment (`pip install 'tuneforge[vllm]'`): tuneforge
    against vLLM, both as HTTP servers in bf16 on the same workload as `serve_throughput.py --peer vllm`
    (32 requests over 8 LoRAs at once, and one stream; 64 greedy tokens each); otherwise it says why not.
Never a pass/fail exit code but for a crash; the table says what held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the base model is built locally

BASE_MODEL = "smollm2-135m"
PROMPTS = [
    f"Write one sentence about {topic}."
    for topic in (
        "the moon",
        "rainbows",
        "volcanoes",
        "honey bees",
        "the ocean",
        "snowflakes",
        "fossils",
        "rivers",
    )
]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Hand freed heap pages back (glibc), so the previous mode's garbage is not counted as this one's."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_cpu_peak() -> None:
    # Linux: "5" resets the high-water mark of resident memory (VmHWM) to the current size.
    Path("/proc/self/clear_refs").write_text("5")


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return _peak_rss()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def train_check(model_dir: Path, device: str, quick: bool, quantized: bool) -> dict[str, Any]:
    """Timed training steps of one mode; peak memory and the estimate for the same config."""
    import torch
    from transformers import AutoTokenizer
    from tuneforge.config import FinetuningConfig
    from tuneforge.rules import memory

    from worker.training import methods, objective, optim
    from worker.training.batches import pack
    from worker.training.data import Example
    from worker.training.runtime import resolve_runtime

    seq, rows, steps = (64, 2, 2) if quick else (1024, 8, 20)
    params: dict[str, Any] = {
        "base_model": BASE_MODEL,
        "max_seq_length": seq,
        "micro_batch_size": rows,
        "effective_batch_size": rows,
        "dtype": "bf16" if device == "cuda" else "auto",
    }
    if quantized:
        params["quantization_bits"] = 4
    config = FinetuningConfig.model_validate(params)
    runtime = resolve_runtime(config.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    _trim()
    before = _rss()
    base = methods.load_base(model_dir, config, runtime)
    trainable = methods.build(config, base, tokenizer, runtime, targets=methods.default_targets(base))
    trainable.model.train()
    opt = optim.build_optimizer(config.optimizer, trainable.named_trainable(), 2e-4, runtime.device)
    vocab = int(base.config.vocab_size)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        examples = []
        for _ in range(rows):
            ids = torch.randint(3, vocab, (seq,), generator=generator).tolist()
            examples.append(Example(input_ids=ids, labels=ids))
        batch = pack(examples).to(runtime.device)
        with trainable.autocast():
            loss = objective.loss_sum(trainable, batch) / batch.target_count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cpu":
        _trim()
        _reset_cpu_peak()
    step()  # warm-up (kernels, optimiser state)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _hwm() - before
    estimate = memory.estimate(
        json.loads((model_dir / "config.json").read_text()),
        config.model_copy(update={"dtype": runtime.dtype_name}),
        device=device,
    )
    tensors = estimate.total - estimate.parts["runtime_overhead"]
    return {
        "mode": "qlora-nf4" if quantized else f"lora-{runtime.dtype_name}",
        "tokens_per_s": steps * rows * seq / seconds,
        "peak_bytes": peak,
        "estimate_bytes": tensors,
        "estimate_over_measured": tensors / peak if peak else None,
        "tokens_per_step": rows * seq,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def serve_check(model_dir: Path, device: str, quick: bool) -> dict[str, Any]:
    """Greedy agreement with HF (fp32), then decode rates at batch 1 and 32 (bf16 on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    check_tokens = 16 if quick else 32
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            tensor = torch.tensor([ids], device=device)
            out = hf.generate(
                input_ids=tensor,
                attention_mask=torch.ones_like(tensor),
                do_sample=False,
                max_new_tokens=check_tokens,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
            expected.append(out[0, len(ids) :].tolist())
    del hf
    with tempfile.TemporaryDirectory(prefix="tuneforge-gpu-check-") as adapters:
        engine = _engine(model_dir, Path(adapters), "fp32", device)
        try:
            got = asyncio.run(_generate_all(engine, prompts, check_tokens))
        finally:
            engine.shutdown()
        speed_dtype = "bf16" if device == "cuda" else "fp32"
        engine = _engine(model_dir, Path(adapters), speed_dtype, device)
        try:
            single, batched = asyncio.run(_decode_rates(engine, prompts, 32 if quick else 128, 32))
        finally:
            engine.shutdown()
    # HF stops at EOS, the engine (ignore_eos) does not: compare what HF generated.
    agree = sum(bool(b) and a[: len(b)] == b for a, b in zip(got, expected, strict=True))
    return {
        "greedy_equal": f"{agree}/{len(prompts)}",
        "greedy_all_equal": agree == len(prompts),
        "decode_dtype": speed_dtype,
        "decode_tok_s_batch1": single,
        "decode_tok_s_batch32": batched,
    }


def _engine(model_dir: Path, adapters: Path, dtype: str, device: str) -> Any:
    from worker.serving.adapters import LocalDirectorySource
    from worker.serving.async_engine import AsyncEngine
    from worker.serving.engine import EngineConfig

    config = EngineConfig(
        model_path=model_dir, model_name=BASE_MODEL, dtype=dtype, device=device, max_batch_size=32
    )
    engine = AsyncEngine(config, source=LocalDirectorySource(adapters))
    engine.start()
    return engine


async def _tokens(engine: Any, prompt: list[int], count: int) -> tuple[list[int], list[float]]:
    from worker.serving.params import SamplingParams

    params = SamplingParams(max_tokens=count, temperature=0.0, ignore_eos=True)
    tokens, received = [], []
    async for out in engine.generate(prompt, params, None):
        tokens.append(out.token_id)
        received.append(time.perf_counter())
    return tokens, received


async def _generate_all(engine: Any, prompts: list[list[int]], count: int) -> list[list[int]]:
    return [(await _tokens(engine, prompt, count))[0] for prompt in prompts]


async def _decode_rates(engine: Any, prompts: list[list[int]], count: int, batch: int) -> tuple[float, float]:
    await _tokens(engine, prompts[0], 4)  # warm-up
    _, received = await _tokens(engine, prompts[0], count)
    single = (len(received) - 1) / (received[-1] - received[0])  # the first token is prefill
    started = time.perf_counter()
    results = await asyncio.gather(*(_tokens(engine, prompts[i % len(prompts)], count) for i in range(batch)))
    batched = sum(len(tokens) for tokens, _ in results) / (time.perf_counter() - started)
    return single, batched


def vllm_check(model_dir: Path, device: str, quick: bool) -> dict[str, Any]:
    """tuneforge's server against vLLM's on CUDA (bench/serving_peers.py), or why it did not run."""
    if device != "cuda":
        return {"skipped": "not on CUDA (on a CPU: bench/serve_throughput.py --peer vllm)"}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": f"vllm is not importable by {sys.executable} (pip install 'tuneforge[vllm]')"}
    import torch

    torch.cuda.empty_cache()  # each server takes its own share of the GPU
    return versus_vllm(model_dir, "cuda", "bf16", quick, Path(sys.executable))


def versus_vllm(model_dir: Path, device: str, dtype: str, quick: bool, vllm_python: Path) -> dict[str, Any]:
    """serve_throughput.py --peer vllm's comparison (32 requests over 8 LoRAs at once, one stream)."""
    import serve_throughput as bench
    import serving_peers as peers
    from transformers import AutoTokenizer

    count, tokens, single = (8, 16, 2) if quick else (32, 64, 8)
    requests = bench.build_requests(AutoTokenizer.from_pretrained(model_dir), count + single + 8, 8)
    workload = peers.Workload.split([(r.prompt_ids, r.adapter_id) for r in requests], count, single, tokens)
    with tempfile.TemporaryDirectory(prefix="tuneforge-gpu-vllm-") as tmp:
        root = Path(tmp)
        bench.make_adapters(model_dir, root / "adapters", 8)
        measured, theirs = peers.run_both(
            workload,
            model_dir=model_dir,
            base_model=BASE_MODEL,
            adapter_dir=root / "adapters",
            lora_rank=int(bench.LORA["r"]),
            dtype=dtype,
            device=device,
            vllm_python=vllm_python,
            eager_modes=[False] if quick else [False, True],  # compiled: CUDA graphs on a GPU
            work_dir=root,
        )
    return {
        "workload": workload,
        "ours": measured,
        "theirs": theirs,
        "summary": peers.compare(measured, theirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--quick", action="store_true", help="short sequences and few tokens (a CPU smoke run)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    from worker.training.base_models import resolve_base_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here; use --device cpu --quick")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{os.cpu_count()}"
    model_dir = resolve_base_model(BASE_MODEL, args.cache_dir)
    print(f"{BASE_MODEL} on {name}, torch {torch.__version__}{' (quick)' if args.quick else ''}", flush=True)
    training = [train_check(model_dir, args.device, args.quick, quantized) for quantized in (False, True)]
    serving = serve_check(model_dir, args.device, args.quick)
    vllm = vllm_check(model_dir, args.device, args.quick)
    report(training, serving)
    report_vllm(vllm)
    if args.json:
        versus = vllm if "skipped" in vllm else vllm["summary"]
        document = {"device": name, "training": training, "serving": serving, "vllm": versus}
        args.json.write_text(json.dumps(document, indent=2))


def report(training: list[dict[str, Any]], serving: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"\n{'training':<14}{'tokens/step':>12}{'tokens/s':>12}{'peak MiB':>11}"
        f"{'estimate MiB':>14}{'est/peak':>10}"
    )
    for row in training:
        ratio = row["estimate_over_measured"]
        print(
            f"{row['mode']:<14}{row['tokens_per_step']:>12}{row['tokens_per_s']:>12.0f}"
            f"{row['peak_bytes'] / mib:>11.0f}{row['estimate_bytes'] / mib:>14.0f}"
            f"{(f'{ratio:.2f}' if ratio else '-'):>10}"
        )
    print(
        f"\nserving: engine greedy == HF greedy (fp32): {serving['greedy_equal']} prompts"
        f"{'' if serving['greedy_all_equal'] else '  <-- MISMATCH'}"
    )
    print(
        f"decode ({serving['decode_dtype']}): batch 1 {serving['decode_tok_s_batch1']:.1f} tok/s, "
        f"batch 32 {serving['decode_tok_s_batch32']:.1f} tok/s"
    )


def report_vllm(vllm: dict[str, Any]) -> None:
    if "skipped" in vllm:
        print(f"\ntuneforge vs vLLM: skipped, {vllm['skipped']}")
        return
    import serving_peers as peers

    print("\ntuneforge vs vLLM, both as HTTP servers (bf16 on CUDA; vLLM compiled = with CUDA graphs):")
    peers.print_table(vllm["workload"], vllm["ours"], vllm["theirs"], vllm["summary"])


if __name__ == "__main__":
    main()

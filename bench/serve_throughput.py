"""Serving throughput: tuneforge's engine against HF PEFT `generate`, many LoRAs on one base, in one run.

Run: .venv/bin/python bench/serve_throughput.py [--requests 32] [--new-tokens 64] [--adapters 8]
     [--dtype fp32|bf16] [--skip-hf] [--json PATH]
Base model smollm2-135m (real weights). N LoRA adapters (r=8, alpha 16, q_proj/v_proj, random
non-zero A and B from a fixed seed, PEFT safetensors) as `bench/1` .. `bench/N`; request i has its
own ~30-token plain prompt and adapter `bench/{i % N + 1}`, and generates exactly --new-tokens
tokens greedily (EOS does not stop it).

(a)  HF PEFT, sequential: one PeftModel holding every adapter; per request `set_adapter` then
     `generate` (batch of one), which is what a user without a serving engine writes.
(a') tuneforge: every request at once through `AsyncEngine.generate` (continuous batching, mixed
     adapters in one batch); tok/s = generated tokens / (first submit .. last token).
(b)  one stream with an adapter, --single-tokens tokens: decode rate, the first token excluded
     (that one is prefill), for both sides.
(c)  time to first token over the requests of (a'), p50 and p99, on the caller's clock from submit
     (the engine's own `TokenOutput.elapsed` beside it).
(d), (e) with --prefix-chunking (instead of the above; bench/serve_prefix_chunking.py): a shared system
     prompt's TTFT and tok/s with prefix caching off and on; streams' inter-token latency p99 while long
     prompts join, chunked prefill off and on. About a minute on a 2-core CPU with the defaults.
Greedy agreement: the fraction of requests whose engine tokens equal HF's (1.0 expected in fp32).
Both sides are warmed up with one short request first. Never a pass/fail.

--peer vllm: tuneforge against vLLM instead, both as HTTP servers (`tuneforge serve`, vLLM's OpenAI
server, each a subprocess started and stopped here) driven by the same client (bench/serving_peers.py):
the same prompts as token ids, adapters and greedy `ignore_eos` completions of --new-tokens tokens
(both servers count exactly that many; the table shows the count), in --dtype on both.
Each server is warmed up first (one short request per adapter at once, then one alone); no timed
prompt repeats a warm-up's or another's, so vLLM's prefix cache saves nothing a real workload would not.
(a) every request at once: tok/s = completion tokens / wall time of the batch;
(b) one stream: --single-requests requests one after another, tok/s = tokens / their wall time
    (prefill included). vLLM runs from --vllm-python (`make vllm` builds .venv-vllm), compiled and
    with --enforce-eager (--vllm-mode); each ratio is against vLLM's faster mode on that scenario.
"LoRA acts": of one request per adapter, how many texts differ from the base model's (untimed).
Full run (32 requests, 8 LoRAs, 64 tokens, 8 single; about 6-10 minutes on a quiet 2-core CPU):
    .venv/bin/python bench/serve_throughput.py --peer vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the base model is built locally

BASE_MODEL = "smollm2-135m"
REPO = Path(__file__).resolve().parents[1]
SEED = 1234
LORA: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# Scale of the random LoRA factors: large enough that every adapter changes the generated text.
A_SCALE, B_SCALE = 0.02, 0.1
BASE_CHECK_TOKENS = 16  # tokens compared with the base model's to show that the adapters act
TOPICS = (
    "the moon",
    "rainbows",
    "volcanoes",
    "honey bees",
    "the ocean",
    "snowflakes",
    "thunderstorms",
    "the sun",
    "fossils",
    "magnets",
    "clouds",
    "earthquakes",
    "deserts",
    "coral reefs",
    "the wind",
    "rivers",
)
LINKS = ("tides", "light", "seasons", "gravity", "water", "heat", "plants", "time")


@dataclass
class Request:
    prompt_ids: list[int]
    adapter_id: str


@dataclass
class EngineRun:
    tokens: list[list[int]] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # submit → first token received, caller's clock
    engine_ttft: list[float] = field(default_factory=list)  # the first TokenOutput's `elapsed`
    seconds: float = 0.0


def adapter_ids(count: int) -> list[str]:
    return [f"bench/{n}" for n in range(1, count + 1)]


def make_adapters(model_dir: Path, root: Path, count: int) -> None:
    """Writes `count` random LoRAs of one shape as `<root>/bench/<N>` (PEFT save_pretrained, safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(SEED)
    for adapter_id in adapter_ids(count):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    scale = A_SCALE if "lora_A" in name else B_SCALE
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        peft_model.save_pretrained(str(root / adapter_id), safe_serialization=True)


def build_requests(tokenizer: Any, count: int, adapters: int) -> list[Request]:
    requests = []
    for i in range(count):
        topic, link = TOPICS[i % len(TOPICS)], LINKS[(i // len(TOPICS) + i) % len(LINKS)]
        prompt = (
            f"Question {i + 1}: In two or three sentences, explain to a curious child why {topic} "
            f"matter and what {link} has to do with it. Answer:"
        )
        requests.append(Request(tokenizer(prompt)["input_ids"], f"bench/{i % adapters + 1}"))
    return requests


# --- HF PEFT, one request at a time ------------------------------------------------------------------


def load_hf(model_dir: Path, root: Path, count: int, dtype: str) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    # EOS must not stop a request, and must stay choosable as on the engine side (`ignore_eos`
    # only keeps going; `min_new_tokens` would forbid EOS and change the greedy path).
    base.generation_config.eos_token_id = None
    ids = adapter_ids(count)
    model = PeftModel.from_pretrained(base, root / ids[0], adapter_name=_hf_name(ids[0]))
    for adapter_id in ids[1:]:
        model.load_adapter(root / adapter_id, adapter_name=_hf_name(adapter_id))
    return model.eval()


def _hf_name(adapter_id: str) -> str:
    return adapter_id.replace("/", "-")  # PEFT adapter names become module keys


def hf_generate(model: Any, request: Request, new_tokens: int) -> list[int]:
    import torch

    model.set_adapter(_hf_name(request.adapter_id))
    input_ids = torch.tensor([request.prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
    tokens: list[int] = out[0, input_ids.shape[1] :].tolist()
    return tokens


def run_hf(model: Any, requests: list[Request], new_tokens: int) -> tuple[list[list[int]], float]:
    hf_generate(model, Request(requests[0].prompt_ids, requests[0].adapter_id), 4)  # warm-up
    started = time.perf_counter()
    outputs = [hf_generate(model, request, new_tokens) for request in requests]
    return outputs, time.perf_counter() - started


def hf_decode_rate(model: Any, request: Request, new_tokens: int) -> float:
    """Tokens/s after the first: (n - 1) / (time for n tokens - time for 1 token)."""
    started = time.perf_counter()
    hf_generate(model, request, 1)
    first = time.perf_counter() - started
    started = time.perf_counter()
    got = hf_generate(model, request, new_tokens)
    return (len(got) - 1) / (time.perf_counter() - started - first)


# --- tuneforge's engine ---------------------------------------------------------------------------


def start_engine(model_dir: Path, root: Path, count: int, dtype: str, max_batch: int) -> Any:
    from worker.serving.adapters import LocalDirectorySource
    from worker.serving.async_engine import AsyncEngine
    from worker.serving.engine import EngineConfig

    config = EngineConfig(
        model_path=model_dir,
        model_name=BASE_MODEL,
        dtype=dtype,
        max_batch_size=max_batch,
        max_adapters=max(16, count),
    )
    engine = AsyncEngine(config, source=LocalDirectorySource(root))
    engine.start()
    engine.preload(adapter_ids(count))  # HF holds every adapter before its clock starts too
    deadline = time.monotonic() + 120
    while len(engine.loaded_adapters()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine loaded only {engine.loaded_adapters()} in 120 s")
        time.sleep(0.05)
    return engine


async def engine_request(
    engine: Any, request: Request, new_tokens: int
) -> tuple[list[int], list[float], list[float]]:
    """The request's tokens, the engine's `elapsed` of each, and when each reached this caller
    (`time.perf_counter()`)."""
    from worker.serving.params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens, elapsed, received = [], [], []
    adapter = None  # "" = the base model
    if request.adapter_id:  # resolved off the event loop, as the server does
        adapter = await asyncio.to_thread(engine.resolve_adapter, request.adapter_id, None)
    async for out in engine.generate(request.prompt_ids, params, adapter):
        received.append(time.perf_counter())
        tokens.append(out.token_id)
        elapsed.append(out.elapsed)
    return tokens, elapsed, received


async def run_engine(engine: Any, requests: list[Request], new_tokens: int) -> EngineRun:
    await engine_request(engine, requests[0], 4)  # warm-up
    started = time.perf_counter()
    results = await asyncio.gather(*(engine_request(engine, r, new_tokens) for r in requests))
    run = EngineRun(seconds=time.perf_counter() - started)
    for tokens, elapsed, received in results:
        run.tokens.append(tokens)
        run.ttft.append(received[0] - started)  # every request was submitted at `started`
        run.engine_ttft.append(elapsed[0])
    return run


async def base_outputs(engine: Any, requests: list[Request], new_tokens: int) -> list[list[int]]:
    """The same prompts without their adapters: shows that the adapters change what is generated."""
    bare = [Request(r.prompt_ids, "") for r in requests]
    results = await asyncio.gather(*(engine_request(engine, r, new_tokens) for r in bare))
    return [tokens for tokens, _, _ in results]


async def engine_decode_rate(engine: Any, request: Request, new_tokens: int) -> float:
    _, _, received = await engine_request(engine, request, new_tokens)
    return (len(received) - 1) / (received[-1] - received[0])


# --- the run ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--single-tokens", type=int, default=128, help="tokens of the single stream (b)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both sides' dtype")
    parser.add_argument("--skip-hf", action="store_true", help="engine only (no baseline, no agreement)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads", type=int, help="torch threads for both sides (1 is steadier on a CPU others share)"
    )
    parser.add_argument(
        "--peer", choices=["hf", "vllm"], default="hf", help="what tuneforge is compared with"
    )
    parser.add_argument("--single-requests", type=int, default=8, help="--peer vllm: requests of (b)")
    parser.add_argument(
        "--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python", help="vLLM's interpreter"
    )
    parser.add_argument(
        "--vllm-mode", choices=["both", "compiled", "eager"], default="both", help="--enforce-eager or not"
    )
    prefix = parser.add_argument_group("--prefix-chunking: workloads (d) and (e)")
    prefix.add_argument("--prefix-chunking", action="store_true", help="run (d) and (e) only")
    prefix.add_argument("--shared-requests", type=int, default=32, help="(d) requests")
    prefix.add_argument("--system-tokens", type=int, default=500, help="(d) shared system prompt")
    prefix.add_argument("--shared-new-tokens", type=int, default=16, help="(d) tokens of each request")
    prefix.add_argument("--streams", type=int, default=8, help="(e) decoding streams")
    prefix.add_argument("--stream-tokens", type=int, default=48, help="(e) tokens of each stream")
    prefix.add_argument("--long-prompts", type=int, default=8, help="(e) long prompts that join")
    prefix.add_argument("--long-tokens", type=int, default=1000, help="(e) tokens of each long prompt")
    prefix.add_argument("--step-tokens", type=int, default=256, help="(e) prefill tokens a step")
    args = parser.parse_args()
    if args.prefix_chunking:
        prefix_chunking(args)
        return
    if args.peer == "vllm":
        vllm_peer(args)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from worker.training.base_models import resolve_base_model

    model_dir = resolve_base_model(BASE_MODEL, args.cache_dir)
    requests = build_requests(AutoTokenizer.from_pretrained(model_dir), args.requests, args.adapters)
    lengths = [len(r.prompt_ids) for r in requests]
    print(
        f"{BASE_MODEL} {args.dtype}, {args.requests} requests x {args.new_tokens} new tokens, "
        f"{args.adapters} LoRAs r={LORA['r']} {'/'.join(LORA['target_modules'])}, prompts "
        f"{min(lengths)}-{max(lengths)} tokens; torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tuneforge-serve-bench-") as tmp:
        root = Path(tmp)
        make_adapters(model_dir, root, args.adapters)
        hf_tokens = None
        if not args.skip_hf:
            print("HF PEFT: sequential generate ...", file=sys.stderr, flush=True)
            model = load_hf(model_dir, root, args.adapters, args.dtype)
            hf_tokens, hf_seconds = run_hf(model, requests, args.new_tokens)
            results["hf_tok_s"] = sum(map(len, hf_tokens)) / hf_seconds
            results["hf_single_decode_tok_s"] = hf_decode_rate(model, requests[0], args.single_tokens)
            del model
        print("tuneforge engine: all requests at once ...", file=sys.stderr, flush=True)
        check_tokens = min(BASE_CHECK_TOKENS, args.new_tokens)
        engine = start_engine(model_dir, root, args.adapters, args.dtype, max(args.requests, 1))
        try:
            run = asyncio.run(run_engine(engine, requests, args.new_tokens))
            single = asyncio.run(engine_decode_rate(engine, requests[0], args.single_tokens))
            base = asyncio.run(base_outputs(engine, requests, check_tokens))
        finally:
            engine.shutdown()
    results["engine_tok_s"] = sum(map(len, run.tokens)) / run.seconds
    results["engine_single_decode_tok_s"] = single
    results["ttft_p50_s"], results["ttft_p99_s"] = percentile(run.ttft, 50), percentile(run.ttft, 99)
    results["engine_ttft_p50_s"] = percentile(run.engine_ttft, 50)
    results["engine_ttft_p99_s"] = percentile(run.engine_ttft, 99)
    changed = sum(t[:check_tokens] != b for t, b in zip(run.tokens, base, strict=True))
    results["adapter_changed_fraction"] = changed / len(base)
    results["adapter_check_tokens"] = check_tokens
    report(args, results, run, hf_tokens)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def prefix_chunking(args: argparse.Namespace) -> None:
    """Workloads (d) and (e) (bench/serve_prefix_chunking.py) on the base model, fp32."""
    import torch
    from serve_prefix_chunking import run
    from transformers import AutoConfig

    from worker.training.base_models import resolve_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_base_model(BASE_MODEL, args.cache_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    results = run(model_dir, BASE_MODEL, vocab, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def vllm_peer(args: argparse.Namespace) -> None:
    """tuneforge's server and vLLM's on the same workload, one after the other (see the docstring)."""
    import serving_peers as peers
    from transformers import AutoTokenizer

    from worker.training.base_models import resolve_base_model

    if not args.vllm_python.exists():
        raise SystemExit(
            f"--vllm-python {args.vllm_python} does not exist: run `make vllm`, or point it at one"
        )
    model_dir = resolve_base_model(BASE_MODEL, args.cache_dir)
    total = args.requests + args.single_requests + args.adapters  # no prompt used twice
    requests = build_requests(AutoTokenizer.from_pretrained(model_dir), total, args.adapters)
    workload = peers.Workload.split(
        [(r.prompt_ids, r.adapter_id) for r in requests], args.requests, args.single_requests, args.new_tokens
    )
    modes = {"both": [False, True], "compiled": [False], "eager": [True]}[args.vllm_mode]
    print(
        f"{BASE_MODEL} {args.dtype} on both, CPU; {args.requests} requests over {args.adapters} LoRAs "
        f"r={LORA['r']} {'/'.join(LORA['target_modules'])}, {args.new_tokens} greedy tokens each "
        f"(ignore_eos); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tuneforge-vllm-bench-") as tmp:
        root = Path(tmp)
        make_adapters(model_dir, root / "adapters", args.adapters)
        ours, theirs = peers.run_both(
            workload,
            model_dir=model_dir,
            base_model=BASE_MODEL,
            adapter_dir=root / "adapters",
            lora_rank=int(LORA["r"]),
            dtype=args.dtype,
            device="cpu",
            vllm_python=args.vllm_python,
            eager_modes=modes,
            work_dir=root,
        )
    summary = peers.compare(ours, theirs)
    peers.print_table(workload, ours, theirs, summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def report(
    args: argparse.Namespace, results: dict[str, Any], run: EngineRun, hf: list[list[int]] | None
) -> None:
    what = f"{args.requests} requests x {args.adapters} LoRAs"
    ours = results["engine_tok_s"]
    if hf is None:
        print(f"(a) {what}: engine {ours:.1f} tok/s (HF PEFT skipped)")
    else:
        peer = results["hf_tok_s"]
        print(
            f"(a) {what}: engine {ours:.1f} tok/s vs HF PEFT sequential {peer:.1f} tok/s = {ours / peer:.2f}x"
        )
    single = results["engine_single_decode_tok_s"]
    line = f"(b) single stream with an adapter, {args.single_tokens} tokens, decode rate "
    line += f"(first token excluded): engine {single:.1f} tok/s"
    if hf is not None:
        peer = results["hf_single_decode_tok_s"]
        line += f" vs HF PEFT {peer:.1f} tok/s = {single / peer:.2f}x"
    print(line)
    print(
        f"(c) TTFT over the {args.requests} requests of (a'), submit to first token received: "
        f"p50 {results['ttft_p50_s'] * 1000:.0f} ms, p99 {results['ttft_p99_s'] * 1000:.0f} ms "
        f"(the engine's own `elapsed`: p50 {results['engine_ttft_p50_s'] * 1000:.0f} ms, "
        f"p99 {results['engine_ttft_p99_s'] * 1000:.0f} ms)"
    )
    print(
        f"adapters act: {results['adapter_changed_fraction']:.2f} of the engine outputs differ from "
        f"the base model's within {results['adapter_check_tokens']} tokens"
    )
    if hf is not None:
        same = sum(ours_tokens == theirs for ours_tokens, theirs in zip(run.tokens, hf, strict=True))
        results["greedy_agreement"] = same / len(hf)
        first_diff = [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
            for x, y in zip(run.tokens, hf, strict=True)
        ]
        diverged = sorted(i for i in first_diff if i is not None)
        print(
            f"greedy agreement engine vs HF: {same}/{len(hf)} = {same / len(hf):.2f}"
            + (f" (first differing token positions: {diverged})" if diverged else "")
        )


if __name__ == "__main__":
    main()

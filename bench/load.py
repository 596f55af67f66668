"""Load on the embedded stack: several tenants at once, checked answers, bad requests, streams, hang-ups.

Run: .venv/bin/python bench/load.py [--seconds 180] [--model smollm2-135m|tiny-random-llama]
     [--tenants 4] [--concurrency 2] [--max-requests 20000]
Starts `tuneforge up` (no training worker) in a temporary data dir on a free 127.0.0.1 port, mints a
token per tenant, computes a reference answer for each prompt once (greedy, one request at a time),
has every tenant upload an adapter of its own under the same id `mine/1` (other random weights each)
and asks it each prompt once, then lets every tenant send, for `--seconds` or `--max-requests`:
greedy completions (OpenAI and LoRAX routes) whose text must equal the reference, completions with
its `mine/1` that must equal its own adapter's answer (another tenant's weights would be caught),
streams whose joined text must equal the reference too, bad requests that must get a 4xx, requests
to another tenant's URL that must get a 404, streams the client drops after the first event, and
control-plane reads. Nothing leaves 127.0.0.1.
Prints requests served, p50/p99 latency, answers by class (2xx/4xx/5xx/hung/wrong/error) and the
RSS of every process it started, at the start and at the end; then stops `tuneforge up` and checks
that no process it started is left running. Expected: zero 5xx, hung, wrong and error; RSS flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

PROMPTS = [
    "The capital of France is",
    "Write one word that rhymes with cat:",
    "1, 2, 3, 4,",
    "A haiku about the sea:",
]
MAX_TOKENS = 12
ADAPTER = "mine/1"
ADAPTER_RANK = 8
STARTUP_TIMEOUT_S = 120.0
# The first request starts the serving process (for smollm2: dequantizing its weights once).
FIRST_ANSWER_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Tally:
    """Every request's kind, class and latency; a few examples of what went wrong."""

    classes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, outcome: str, seconds: float, problem: str = "") -> None:
        self.kinds[kind] += 1
        self.classes[outcome] += 1
        self.seconds.append(seconds)
        if problem and len(self.problems) < 20:
            self.problems.append(f"{kind}: {outcome}: {problem[:300]}")

    @property
    def sent(self) -> int:
        return sum(self.kinds.values())


@dataclass
class Tenant:
    name: str
    api: str  # the control plane
    base: str  # the deployment's serving URL
    client: httpx.AsyncClient
    # Its own adapter `mine/1` (every tenant names its own so: the same id, other weights) and that
    # adapter's greedy answer to each prompt.
    adapter_answers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reference:
    openai: dict[str, str]
    lorax: dict[str, str]
    model: str


def _class(status: int) -> str:
    return f"{status // 100}xx"


async def good_completion(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    body = {"model": ref.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = await t.client.post(f"{t.base}/v1/completions", json=body)
    if response.status_code != 200:
        return _class(response.status_code), response.text
    text = response.json()["choices"][0]["text"]
    return ("2xx", "") if text == ref.openai[prompt] else ("wrong", f"{text!r} != {ref.openai[prompt]!r}")


async def good_generate(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_TOKENS, "do_sample": False}}
    response = await t.client.post(f"{t.base}/generate", json=body)
    if response.status_code != 200:
        return _class(response.status_code), response.text
    text = response.json()["generated_text"]
    return ("2xx", "") if text == ref.lorax[prompt] else ("wrong", f"{text!r} != {ref.lorax[prompt]!r}")


async def adapter_completion(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    """The tenant's own `mine/1`: the answer must be its adapter's, never another tenant's `mine/1`."""
    body = {"model": ADAPTER, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = await t.client.post(f"{t.base}/v1/completions", json=body)
    if response.status_code != 200:
        return _class(response.status_code), response.text
    text, expected = response.json()["choices"][0]["text"], t.adapter_answers[prompt]
    return ("2xx", "") if text == expected else ("wrong", f"{ADAPTER}: {text!r} != {expected!r}")


async def stream(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    """A whole stream; the text of its events, joined, must be the reference answer."""
    body = {"model": ref.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    parts: list[str] = []
    async with t.client.stream("POST", f"{t.base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return _class(response.status_code), (await response.aread()).decode(errors="replace")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    text = "".join(parts)
    return ("2xx", "") if text == ref.openai[prompt] else ("wrong", f"{text!r} != {ref.openai[prompt]!r}")


async def hang_up(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    """A long stream the client drops after its first event: the server must free the slot itself."""
    body = {"model": ref.model, "prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}
    async with t.client.stream("POST", f"{t.base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return _class(response.status_code), (await response.aread()).decode(errors="replace")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream
    return "2xx", ""


BAD_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}),
    ("no prompt", {"max_tokens": 4}),
    ("temperature as text", {"prompt": "x", "max_tokens": 4, "temperature": "hot"}),
    ("unknown adapter", {"model": "nope/9", "prompt": "x", "max_tokens": 4}),
    ("prompt beyond the context", {"prompt": "word " * 20000, "max_tokens": 4}),
    ("top_p above 1", {"prompt": "x", "max_tokens": 4, "top_p": 7}),
]


async def bad_request(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    what, body = random.choice(BAD_BODIES)
    response = await t.client.post(f"{t.base}/v1/completions", json={"model": ref.model} | body)
    if response.status_code < 300:
        return "wrong", f"{what} was accepted: {response.text}"
    return _class(response.status_code), "" if response.status_code < 500 else f"{what}: {response.text}"


def foreign_url(tenants: list[Tenant]) -> Callable[[Tenant, Reference, str], Awaitable[tuple[str, str]]]:
    async def send(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
        """Another tenant's serving URL with this tenant's token: a 404, as if it did not exist."""
        other = random.choice([o for o in tenants if o is not t] or [t])
        body = {"model": ref.model, "prompt": prompt, "max_tokens": 2}
        response = await t.client.post(f"{other.base}/v1/completions", json=body)
        expected = 404 if other is not t else 200
        outcome = _class(response.status_code)
        return (
            ("wrong", f"{response.status_code}: {response.text}")
            if response.status_code != expected
            else (outcome, "")
        )

    return send


async def control_read(t: Tenant, ref: Reference, prompt: str) -> tuple[str, str]:
    response = await t.client.get(f"{t.api}/v2/deployments")
    return _class(response.status_code), "" if response.status_code == 200 else response.text


async def _one(tally: Tally, kind: str, send: Any, t: Tenant, ref: Reference, timeout: float) -> None:
    started = time.monotonic()
    try:
        outcome, problem = await asyncio.wait_for(send(t, ref, random.choice(PROMPTS)), timeout)
    except TimeoutError:
        outcome, problem = "hung", f"no answer in {timeout:.0f}s"
    except httpx.HTTPError as exc:
        outcome, problem = "error", f"{type(exc).__name__}: {exc}"
    tally.add(kind, outcome, time.monotonic() - started, problem)


async def _tenant_loop(
    t: Tenant,
    ref: Reference,
    mix: list[tuple[str, Any, int]],
    tally: Tally,
    args: argparse.Namespace,
    deadline: float,
) -> None:
    kinds = [(name, send) for name, send, _ in mix]
    weights = [w for _, _, w in mix]
    while time.monotonic() < deadline and tally.sent < args.max_requests:
        name, send = random.choices(kinds, weights)[0]
        await _one(tally, name, send, t, ref, args.request_timeout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(data_dir: Path, port: int, cache_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_MODEL_CACHE_DIR": str(cache_dir.resolve()),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "tuneforge.cli", "up", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, "--no-worker", "--log-level", "warning"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _mint(data_dir: Path, tenant: str) -> str:
    env = os.environ | {"TUNEFORGE_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "token", "create", "--tenant", tenant],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip().splitlines()[-1]


def _processes(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss(processes: list[psutil.Process]) -> dict[int, tuple[str, int]]:
    found = {}
    for p in processes:
        try:
            command = " ".join(p.cmdline()[1:5])
            found[p.pid] = (command, p.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return found


async def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"tuneforge up exited:\n{log.read_text()[-3000:]}")
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"tuneforge up did not answer /healthz in {STARTUP_TIMEOUT_S:.0f}s")


async def _tenants(url: str, data_dir: Path, args: argparse.Namespace) -> list[Tenant]:
    tenants = []
    for i in range(args.tenants):
        name = f"load{i}"
        token = _mint(data_dir, name)
        client = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=args.request_timeout)
        deployment = "smollm2-135m"
        if args.model != "smollm2-135m":
            deployment = "load"
            body = {"name": deployment, "config": {"baseModel": args.model}}
            created = await client.post(f"{url}/v2/deployments", json=body)
            created.raise_for_status()
        tenants.append(Tenant(name, url, f"{url}/{name}/deployments/v2/llms/{deployment}", client))
    return tenants


async def _reference(t: Tenant, model: str) -> Reference:
    """Each prompt's greedy answer, asked once, one request at a time, before any load."""
    openai, lorax = {}, {}
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        response = await t.client.post(f"{t.base}/v1/completions", json=body, timeout=FIRST_ANSWER_TIMEOUT_S)
        response.raise_for_status()
        openai[prompt] = response.json()["choices"][0]["text"]
        generate = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_TOKENS, "do_sample": False}}
        response = await t.client.post(f"{t.base}/generate", json=generate, timeout=FIRST_ANSWER_TIMEOUT_S)
        response.raise_for_status()
        lorax[prompt] = response.json()["generated_text"]
    return Reference(openai, lorax, model)


def _adapter_files(model_config: dict[str, Any], seed: int) -> dict[str, bytes]:
    """A random LoRA on q_proj and v_proj of every layer, shaped for the base model (PEFT's files)."""
    import numpy as np
    from safetensors.numpy import save

    hidden, heads = model_config["hidden_size"], model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or hidden // heads
    kv_out = (model_config.get("num_key_value_heads") or heads) * head_dim
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(model_config["num_hidden_layers"]):
        for module, out in (("q_proj", heads * head_dim), ("v_proj", kv_out)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = rng.standard_normal((ADAPTER_RANK, hidden)) / np.sqrt(hidden)
            tensors[f"{name}.lora_A.weight"] = a.astype("float32")
            tensors[f"{name}.lora_B.weight"] = (0.3 * rng.standard_normal((out, ADAPTER_RANK))).astype(
                "float32"
            )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model_config["_name"],
        "r": ADAPTER_RANK,
        "lora_alpha": 2 * ADAPTER_RANK,
        "target_modules": ["q_proj", "v_proj"],
    }
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


async def _upload_adapters(tenants: list[Tenant], model: str, cache_dir: Path) -> None:
    """Each tenant uploads its own random `mine/1` and asks it each prompt once (its reference)."""
    model_config = json.loads((cache_dir / model / "config.json").read_text()) | {"_name": model}
    for seed, t in enumerate(tenants):
        begun = await t.client.post(f"{t.api}/v2/adapters/upload", json={"repo": "mine"})
        begun.raise_for_status()
        for name, content in _adapter_files(model_config, seed).items():
            put = await t.client.put(begun.json()["presignedUrls"][name], content=content)
            put.raise_for_status()
        done = await t.client.put(
            f"{t.api}/v2/adapters/upload/", json={"uploadToken": begun.json()["uploadToken"]}
        )
        done.raise_for_status()
        for prompt in PROMPTS:
            body = {"model": ADAPTER, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = await t.client.post(
                f"{t.base}/v1/completions", json=body, timeout=FIRST_ANSWER_TIMEOUT_S
            )
            response.raise_for_status()
            t.adapter_answers[prompt] = response.json()["choices"][0]["text"]
    distinct = {tuple(t.adapter_answers.values()) for t in tenants}
    print(f"adapters: {len(tenants)} tenants' own {ADAPTER}, {len(distinct)} distinct sets of answers")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def _print_rss(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> None:
    print("RSS of the processes started (MiB, start -> end):")
    for pid, (command, rss) in sorted(before.items()):
        end = after.get(pid)
        shown = f"{end[1] / 2**20:8.1f}" if end else "  (gone)"
        print(f"  pid {pid:>7}  {rss / 2**20:8.1f} -> {shown}  {command}")
    for pid, (command, rss) in sorted(after.items()):
        if pid not in before:
            print(f"  pid {pid:>7}      (new) -> {rss / 2**20:8.1f}  {command}")


def _stop(process: subprocess.Popen[bytes], started: list[psutil.Process]) -> list[int]:
    """SIGTERM `tuneforge up`; the pids of the processes it started that are still running after."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs([p for p in started if p.pid != process.pid], timeout=STOP_TIMEOUT_S)
    for leftover in alive:  # ours, by pid: report it, then do not leave it behind
        leftover.kill()
    return [p.pid for p in alive]


async def _load(url: str, tenants: list[Tenant], ref: Reference, args: argparse.Namespace) -> Tally:
    mix = [
        ("completion", good_completion, 20),
        ("adapter completion", adapter_completion, 15),
        ("generate", good_generate, 15),
        ("stream", stream, 20),
        ("bad request", bad_request, 15),
        ("hang-up", hang_up, 8),
        ("foreign url", foreign_url(tenants), 7),
        ("control read", control_read, 5),
    ]
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    loops = [
        _tenant_loop(t, ref, mix, tally, args, deadline) for t in tenants for _ in range(args.concurrency)
    ]
    await asyncio.gather(*loops)
    return tally


def _report(tally: Tally, seconds: float) -> None:
    served = tally.sent - tally.classes["hung"] - tally.classes["error"]
    print(f"requests sent {tally.sent}, served {served} in {seconds:.0f}s ({served / seconds:.1f}/s)")
    p50, p99 = (_percentile(tally.seconds, q) * 1000 for q in (0.5, 0.99))
    print(f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(
        "by class: "
        + ", ".join(f"{k} {tally.classes[k]}" for k in ("2xx", "4xx", "5xx", "hung", "wrong", "error"))
    )
    print("by kind:  " + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
    for problem in tally.problems:
        print(f"  ! {problem}")


async def main_async(args: argparse.Namespace) -> int:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tuneforge-load-") as scratch:
        data_dir, log = Path(scratch) / "data", Path(scratch) / "up.log"
        process = _start(data_dir, port, args.cache_dir, log)
        root = psutil.Process(process.pid)
        started: list[psutil.Process] = []
        try:
            await _wait_healthy(url, process, log)
            tenants = await _tenants(url, data_dir, args)
            print(f"tuneforge up on {url}, {len(tenants)} tenants, model {args.model}; computing references")
            ref = await _reference(tenants[0], args.model)
            await _upload_adapters(tenants, args.model, args.cache_dir)
            started = _processes(root)
            before = _rss(started)
            began = time.monotonic()
            tally = await _load(url, tenants, ref, args)
            elapsed = time.monotonic() - began
            started = _processes(root) or started
            after = _rss(started)
            for t in tenants:
                await t.client.aclose()
        finally:
            left = _stop(process, started or _processes(root))
        _report(tally, elapsed)
        _print_rss(before, after)
        print(f"after stopping tuneforge up: {len(left)} process(es) it started were still running {left}")
        bad = sum(tally.classes[k] for k in ("5xx", "hung", "wrong", "error"))
        return 0 if bad == 0 and not left else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--model", choices=["smollm2-135m", "tiny-random-llama"], default="smollm2-135m")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight per tenant")
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds before a request is hung"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".tuneforge/models"), help="built base models")
    parser.add_argument("--seed", type=int, default=0, help="for the mix of requests")
    args = parser.parse_args()
    random.seed(args.seed)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

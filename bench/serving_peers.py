"""Serving processes a benchmark starts (`tuneforge serve`, vLLM's OpenAI server) and the one HTTP workload
measured the same way against each: many adapters at once, and one stream at a time.

Both servers run as subprocesses of their own and are driven by the same httpx client code
(`POST /v1/completions`, the prompt as token ids, greedy, `ignore_eos`, not streamed), so neither side
shares an interpreter, a GIL or a thread pool with the client. tuneforge's requests carry the control
plane's signed tenant assertion (the server always verifies one), signed here with a secret made for
the run; vLLM's carry nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEALTH_TIMEOUT_S = 900.0  # vLLM's first start compiles (torch.compile) for minutes on a small CPU
REQUEST_TIMEOUT_S = 900.0
COMPLETIONS = "/v1/completions"
WARMUP_TOKENS = 8


Prompt = tuple[list[int], str]  # token ids, and the adapter id as tuneforge names it (`bench/N`; "" = none)


@dataclass(frozen=True)
class Workload:
    """The same requests for every server. No timed prompt repeats another (nor a warm-up's), so a prefix
    cache (vLLM's is on by default) saves no prefill that a real workload of fresh prompts would not."""

    concurrent: list[Prompt]  # (a): all at once
    single: list[Prompt]  # (b): one after another
    warmup: list[Prompt]  # one per adapter
    new_tokens: int

    @classmethod
    def split(cls, prompts: list[Prompt], concurrent: int, single: int, new_tokens: int) -> Workload:
        """(a)'s, (b)'s and the warm-up's prompts from one list: the first `concurrent`, the next `single`,
        then one per adapter of (a)."""
        adapters = sorted({adapter for _, adapter in prompts[:concurrent]})
        rest = prompts[concurrent + single :]
        warmup = [next(p for p in rest if p[1] == adapter) for adapter in adapters]
        return cls(prompts[:concurrent], prompts[concurrent : concurrent + single], warmup, new_tokens)

    @property
    def adapters(self) -> list[str]:
        return sorted({adapter for _, adapter in self.concurrent + self.single + self.warmup})


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and address it."""

    label: str
    port: int
    command: list[str]
    env: dict[str, str]
    model_name: Callable[[str], str]  # adapter id -> the `model` field that selects it
    headers: Callable[[str, bytes], dict[str, str]] = lambda path, body: {}
    describe: str = ""  # what the table says this side ran


@dataclass
class Measured:
    """One server's numbers on the workload, and its outputs (to compare the servers' greedy text)."""

    label: str
    describe: str = ""
    concurrent_tok_s: float = 0.0
    concurrent_s: float = 0.0
    single_tok_s: float = 0.0
    tokens: list[int] = field(default_factory=list)  # completion tokens per request of (a)
    texts: list[str] = field(default_factory=list)
    adapters_act: str = ""  # of one request per adapter: how many differ from the base model's text
    startup_s: float = 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tuneforge_spec(
    tuneforge_cli: Path,
    *,
    port: int,
    base_model: str,
    cache_dir: Path,
    adapter_dir: Path,
    adapters: list[str],
    data_dir: Path,
    dtype: str,
    device: str,
    max_batch: int,
    lora_rank: int,
) -> ServerSpec:
    """`tuneforge serve` over a directory of adapters, exactly as an operator starts it."""
    from tuneforge.serving_auth import TenantAssertions

    secret = secrets.token_urlsafe(32)
    assertions = TenantAssertions(secret)
    command = [str(tuneforge_cli), "serve", "--base-model", base_model, "--port", str(port)]
    command += ["--adapter-dir", str(adapter_dir), "--data-dir", str(data_dir), "--dtype", dtype]
    command += ["--device", device, "--max-batch-size", str(max_batch), "--max-lora-rank", str(lora_rank)]
    command += ["--max-adapters", str(max(16, len(set(adapters)))), "--log-level", "warning"]
    command += ["--preload", *sorted(set(adapters))]
    env = {"TUNEFORGE_SECRET_KEY": secret, "TUNEFORGE_MODEL_CACHE_DIR": str(cache_dir.absolute())}
    return ServerSpec(
        label="tuneforge",
        port=port,
        command=command,
        env=env,
        model_name=lambda adapter: adapter,
        headers=lambda path, body: assertions.headers(tenant="dev", method="POST", path=path, body=body),
        describe=f"tuneforge serve --dtype {dtype} --device {device} --max-batch-size {max_batch} "
        "(continuous batching, mixed LoRAs per step; CPU kernels as configured, on by default)",
    )


def vllm_spec(
    vllm_python: Path,
    *,
    port: int,
    model_dir: Path,
    served_name: str,
    adapter_dir: Path,
    adapters: list[str],
    dtype: str,
    lora_rank: int,
    eager: bool,
    device: str,
) -> ServerSpec:
    """vLLM's OpenAI server with every adapter registered up front (`--lora-modules`)."""
    names = sorted(set(adapters))
    command = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--enable-lora", "--lora-modules"]
    command += [f"{_vllm_name(a)}={adapter_dir / a}" for a in names]
    command += ["--max-loras", str(len(names)), "--max-lora-rank", str(lora_rank)]
    command += ["--max-model-len", "2048", "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype]]
    command += ["--enforce-eager"] if eager else []
    # On the CPU vLLM reserves its KV cache up front (default 4 GiB and up): 2 GiB holds this workload.
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"} if device == "cpu" else {}
    if device != "cpu":
        command += ["--gpu-memory-utilization", "0.5"]
    return ServerSpec(
        label=f"vLLM {'eager' if eager else 'compiled'}",
        port=port,
        command=command,
        env=env,
        model_name=lambda adapter: _vllm_name(adapter) if adapter else served_name,
        describe=" ".join(
            ["vllm api_server", *command[command.index("--max-loras") :]]
            + [f"{k}={v}" for k, v in env.items()]
        ),
    )


def _vllm_name(adapter_id: str) -> str:
    return adapter_id.replace("/", "-")


@contextlib.contextmanager
def running(spec: ServerSpec, log_path: Path) -> Iterator[str]:
    """Starts the server, waits until /health answers, yields its URL, and stops it (its whole process
    group: vLLM runs its engine core in a child process)."""
    import httpx

    url = f"http://127.0.0.1:{spec.port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            spec.command,
            env={**os.environ, **spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{spec.label} exited with {process.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{spec.label} not healthy in {HEALTH_TIMEOUT_S:.0f} s:\n{_tail(log_path)}"
                )
            time.sleep(0.5)  # a subprocess's readiness has no event to await but its port
        yield url
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def measure(spec: ServerSpec, workload: Workload, log_path: Path) -> Measured:
    """Start the server, warm it up (every adapter once, concurrently, then one stream), time (a) and (b)."""
    started = time.perf_counter()
    with running(spec, log_path) as url:
        startup = time.perf_counter() - started
        result = asyncio.run(_measure(spec, url, workload))
    result.startup_s, result.describe = startup, spec.describe
    return result


async def _measure(spec: ServerSpec, url: str, workload: Workload) -> Measured:
    import httpx

    n = len(workload.concurrent)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        await asyncio.gather(*(_complete(client, spec, p, WARMUP_TOKENS) for p in workload.warmup))
        await _complete(client, spec, workload.warmup[0], WARMUP_TOKENS)
        started = time.perf_counter()
        outs = await asyncio.gather(
            *(_complete(client, spec, p, workload.new_tokens) for p in workload.concurrent)
        )
        concurrent = time.perf_counter() - started
        single_tokens, single_seconds = 0, 0.0
        for prompt in workload.single:
            started = time.perf_counter()
            tokens, _ = await _complete(client, spec, prompt, workload.new_tokens)
            single_seconds += time.perf_counter() - started
            single_tokens += tokens
        # Not timed: the first request of each adapter in (a) again on the bare base model.
        firsts = sorted(
            {adapter: i for i, (_, adapter) in reversed(list(enumerate(workload.concurrent)))}.values()
        )
        bare = [(workload.concurrent[i][0], "") for i in firsts]
        base = await asyncio.gather(*(_complete(client, spec, p, workload.new_tokens) for p in bare))
    differ = sum(outs[i][1] != text for i, (_, text) in zip(firsts, base, strict=True))
    return Measured(
        label=spec.label,
        concurrent_tok_s=sum(t for t, _ in outs) / concurrent,
        concurrent_s=concurrent,
        single_tok_s=single_tokens / single_seconds if single_seconds else 0.0,
        tokens=[t for t, _ in outs],
        texts=[text for _, text in outs],
        adapters_act=f"{differ}/{len(firsts)}",
    )


async def _complete(client: Any, spec: ServerSpec, prompt: Prompt, tokens: int) -> tuple[int, str]:
    """One greedy completion: (the completion tokens the server counted, its text)."""
    body = {
        "model": spec.model_name(prompt[1]),
        "prompt": prompt[0],
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # both servers take it: every request generates exactly `tokens`
    }
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json", **spec.headers(COMPLETIONS, content)}
    response = await client.post(COMPLETIONS, content=content, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"{spec.label}: {response.status_code} {response.text[:500]}")
    data = response.json()
    return int(data["usage"]["completion_tokens"]), str(data["choices"][0]["text"])


def run_both(
    workload: Workload,
    *,
    model_dir: Path,
    base_model: str,
    adapter_dir: Path,
    lora_rank: int,
    dtype: str,
    device: str,
    vllm_python: Path,
    eager_modes: list[bool],
    work_dir: Path,
) -> tuple[Measured, list[Measured]]:
    """tuneforge's server, then vLLM's in each mode, one at a time on the same workload (logs in work_dir)."""
    common: dict[str, Any] = {"adapter_dir": adapter_dir, "adapters": workload.adapters, "dtype": dtype}
    common |= {"lora_rank": lora_rank, "device": device}
    ours_spec = tuneforge_spec(
        Path(sys.executable).parent / "tuneforge",  # the console script of this interpreter's install
        port=free_port(),
        base_model=base_model,
        cache_dir=model_dir.parent,  # built-ins live in <cache_dir>/<name>
        data_dir=work_dir / "data",
        max_batch=max(32, len(workload.concurrent)),
        **common,
    )
    print(f"{ours_spec.label} ...", file=sys.stderr, flush=True)
    ours = measure(ours_spec, workload, work_dir / "tuneforge.log")
    theirs = []
    for eager in eager_modes:
        spec = vllm_spec(
            vllm_python, port=free_port(), model_dir=model_dir, served_name=base_model, eager=eager, **common
        )
        print(f"{spec.label} ...", file=sys.stderr, flush=True)
        theirs.append(measure(spec, workload, work_dir / f"vllm-{'eager' if eager else 'compiled'}.log"))
    return ours, theirs


def compare(ours: Measured, peers: list[Measured]) -> dict[str, Any]:
    """The table's numbers: each side, the peer's best mode per scenario, and tuneforge / that."""
    best_a = max(peers, key=lambda m: m.concurrent_tok_s)
    best_b = max(peers, key=lambda m: m.single_tok_s)
    same = sum(a == b for a, b in zip(ours.texts, best_a.texts, strict=True))
    return {
        "sides": {m.label: _numbers(m) for m in (ours, *peers)},
        "concurrent": {"peer": best_a.label, "ratio": ours.concurrent_tok_s / best_a.concurrent_tok_s},
        "single": {"peer": best_b.label, "ratio": ours.single_tok_s / best_b.single_tok_s},
        "same_text": f"{same}/{len(ours.texts)}",
    }


def _numbers(m: Measured) -> dict[str, Any]:
    return {
        "concurrent_tok_s": m.concurrent_tok_s,
        "single_tok_s": m.single_tok_s,
        "startup_s": m.startup_s,
        "ran": m.describe,
        "completion_tokens": sorted(set(m.tokens)),
        "adapters_change_text": m.adapters_act,
    }


def print_table(workload: Workload, ours: Measured, peers: list[Measured], summary: dict[str, Any]) -> None:
    n, k = len(workload.concurrent), len({adapter for _, adapter in workload.concurrent})
    print(
        f"\n{'server':<20}{'(a) tok/s':>11}{'(b) tok/s':>11}{'start s':>9}{'tokens/req':>12}{'LoRA acts':>11}"
    )
    for m in (ours, *peers):
        print(
            f"{m.label:<20}{m.concurrent_tok_s:>11.1f}{m.single_tok_s:>11.1f}{m.startup_s:>9.0f}"
            f"{','.join(map(str, sorted(set(m.tokens)))):>12}{m.adapters_act:>11}"
        )
    for m in (ours, *peers):
        print(f"  {m.label}: {m.describe}")
    conc, single = summary["concurrent"], summary["single"]
    print(
        f"(a) {n} requests over {k} LoRAs at once, {workload.new_tokens} tokens each: "
        f"tuneforge / {conc['peer']} = {conc['ratio']:.2f}x"
    )
    print(
        f"(b) one stream, {len(workload.single)} requests one after another, {workload.new_tokens} "
        f"tokens each: tuneforge / {single['peer']} = {single['ratio']:.2f}x"
    )
    print(f"same greedy text as {conc['peer']} on (a): {summary['same_text']} requests")

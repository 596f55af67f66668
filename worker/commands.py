"""The data plane's part of the `tuneforge` command: `worker` (training and dataset validation) and
`serve` (one base model's serving process), added through the `tuneforge.commands` entry-point group
beside the control plane's commands (`app/cli`).

Worker glue: it may use the control plane's settings and database; torch loads only inside the
commands that need it, so the API image (no torch) still runs `tuneforge worker --queues validate`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from app.cli.server_commands import WORKER_QUEUES, server_settings
from app.cli.server_parser import data_dir_option
from app.db import migrate
from app.settings import DEVELOPMENT_SECRET_KEY, MAX_LORA_RANK_LIMIT, Settings

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["SERVE_DTYPE", "SUMMARY", "add_commands", "failure"]

SUMMARY = "run its data plane here (worker, serve)"
# What `tuneforge serve` computes in unless told otherwise, and so every deployment the control plane
# starts (it passes no --dtype); the worker's checks of a published artifact use it too.
SERVE_DTYPE = "fp32"


def add_commands(commands: Commands) -> None:
    """Register `worker` and `serve`."""
    _worker(commands)
    _serve(commands)


def failure(exc: Exception) -> tuple[str, int] | None:
    """The data plane's commands raise only what the CLI or the control plane's commands report."""
    return None


def _worker(commands: Commands) -> None:
    worker = commands.add_parser(
        "worker", help="run a training worker (needs the `worker` extra: torch, ...) and a dataset validator"
    )
    worker.add_argument(
        "--queues",
        type=_queues,
        default=WORKER_QUEUES,
        help="train, validate or both (default): `validate` alone needs no torch, e.g. in the API image",
    )
    worker.add_argument(
        "--worker-class",
        default=None,
        help="the worker class (one of TUNEFORGE_WORKER_CLASSES) whose train queue this worker consumes; "
        "default: TUNEFORGE_WORKER_CLASS, else the default train queue",
    )
    data_dir_option(worker)
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=cmd_worker)


def _serve(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve one base model and its adapters over HTTP (OpenAI and LoRAX APIs; `worker` extra)",
    )
    serve.add_argument(
        "--base-model",
        required=True,
        help="a built-in name, an HF id (org/name[@rev]) or Predibase catalogue name found in the HF cache "
        "or the model store (`tuneforge models pull|import`), an operator's local dir, or version:<uuid> "
        "(an adapter version merged into its base: what a deployment of repo/N runs)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, required=True)
    _engine_options(serve)
    serve.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        metavar="PID",
        help="stop when process PID ends (the control plane passes its own, so that its serving processes "
        "never outlive it)",
    )
    serve.add_argument(
        "--dtype",
        choices=tuple(_VLLM_DTYPES),
        default=None,
        help=f"weights and compute (default: {SERVE_DTYPE}; with --engine vllm: TUNEFORGE_VLLM_DTYPE, auto)",
    )
    serve.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    _adapter_options(serve)
    _vllm_options(serve)
    data_dir_option(serve)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)


def _vllm_options(serve: argparse.ArgumentParser) -> None:
    """Which engine serves, and vLLM's knobs (each defaults to its TUNEFORGE_VLLM_* setting)."""
    serve.add_argument(
        "--engine",
        choices=("tuneforge", "vllm"),
        default="tuneforge",
        help="the serving engine (a --base-model of the form vllm:<model> picks vllm too); vllm runs with "
        "TUNEFORGE_VLLM_PYTHON (`make vllm`) and serves Turbo adapters without their speculators",
    )
    serve.add_argument("--max-loras", type=int, default=None, help="vllm: adapters on the device at once")
    serve.add_argument("--max-cpu-loras", type=int, default=None, help="vllm: adapters kept in host memory")
    serve.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm: GPUs per replica")
    serve.add_argument(
        "--gpu-memory-utilization", type=float, default=None, help="vllm: share of GPU memory it takes"
    )
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of shared prompt prefixes (tuneforge engine: on unless --no-...; "
        "vllm: its setting when given)",
    )
    serve.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tuneforge engine: prefill long prompts in chunks in steps that also decode the running "
        "streams (default: on)",
    )
    serve.add_argument(
        "--max-model-len", type=int, default=None, help="vllm: context length (default: the model's)"
    )


def _engine_options(serve: argparse.ArgumentParser) -> None:
    """How much the engine holds and batches, and when Turbo adapters speculate."""
    serve.add_argument("--max-adapters", type=int, default=16, help="adapters kept in memory (LRU)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    serve.add_argument(
        "--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes (default: 1 GiB)"
    )
    serve.add_argument(
        "--speculation-max-batch",
        type=int,
        default=None,
        metavar="N",
        help="Turbo adapters draft and verify only while at most N sequences decode together "
        "(default: 2 on the CPU, 16 on a GPU)",
    )
    serve.add_argument(
        "--speculation-depth",
        type=int,
        default=None,
        metavar="K",
        help="at most K drafts a step (default: each Turbo adapter's trained depth)",
    )
    serve.add_argument(
        "--max-lora-rank",
        type=_lora_rank,
        default=None,
        metavar="R",
        help="adapters of a higher rank are refused at load (default: TUNEFORGE_MAX_LORA_RANK, 512)",
    )


def _adapter_options(serve: argparse.ArgumentParser) -> None:
    """Which adapters are loaded up front, where they come from, and whose they are."""
    serve.add_argument(
        "--preload", nargs="+", action="extend", default=[], metavar="ID", help="adapters to load at start"
    )
    serve.add_argument(
        "--adapter-dir", help="serve adapters from <dir>/<repo>/<N> instead of tuneforge storage"
    )
    serve.add_argument(
        "--tenant", help="the tenant adapters resolve in when a request names none (default: dev)"
    )


# --- the commands ----------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker  # light: the training stack loads only where it trains

    if "train" in args.queues and importlib.util.find_spec("torch") is None:
        raise ValueError(
            "the training worker needs the data-plane packages (torch is missing): pip install "
            "'tuneforge[worker]', or run only dataset validation with `tuneforge worker --queues validate`"
        )
    if args.worker_class:
        os.environ["TUNEFORGE_WORKER_CLASS"] = args.worker_class  # Settings validates it against the classes
    settings = server_settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    run_worker(settings, queues=args.queues, loglevel=args.log_level)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from worker.serve_main import EngineOptions, VllmOverrides, run_server
    except ImportError as exc:
        raise ValueError(
            f"serving needs the data-plane packages ({exc.name} is missing): pip install 'tuneforge[worker]'"
        ) from None

    settings = server_settings(args.data_dir)
    _refuse_public_dev_secret(settings, args.host)
    options = EngineOptions(
        max_adapters=args.max_adapters,
        max_batch_size=args.max_batch_size,
        kv_cache_bytes=args.kv_cache_bytes,
        speculation_max_batch=args.speculation_max_batch,
        speculation_depth=args.speculation_depth,
        max_lora_rank=args.max_lora_rank or settings.max_lora_rank,
        dtype=_tuneforge_dtype(args.dtype),
        device=args.device,
        engine=args.engine,
        enable_prefix_caching=args.enable_prefix_caching is not False,
        enable_chunked_prefill=args.enable_chunked_prefill,
        vllm=VllmOverrides(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=_VLLM_DTYPES[args.dtype] if args.dtype else None,
            enable_prefix_caching=args.enable_prefix_caching,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
        ),
    )
    return run_server(
        settings,
        base_model=args.base_model,
        host=args.host,
        port=args.port,
        options=options,
        preload=args.preload,
        adapter_dir=Path(args.adapter_dir) if args.adapter_dir else None,
        tenant=args.tenant,
        log_level=args.log_level,
        parent_pid=args.parent_pid,
    )


def _refuse_public_dev_secret(settings: Settings, host: str) -> None:
    """Serving trusts whoever signs with the secret; the development secret is public, so a process
    signed with it may listen on loopback only (where only this machine's users reach it)."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if settings.secret_key == DEVELOPMENT_SECRET_KEY and not loopback:
        raise ValueError(
            f"--host {host}: a serving process reachable from other machines needs a real secret; set "
            "TUNEFORGE_SECRET_KEY (the control plane's) or keep the default --host 127.0.0.1"
        )


# --- argument types -------------------------------------------------------------------------------


def _queues(value: str) -> tuple[str, ...]:
    """`train`, `validate` or `train,validate`: the worker nodes to run."""
    chosen = tuple(dict.fromkeys(q.strip() for q in value.split(",") if q.strip()))
    unknown = [q for q in chosen if q not in WORKER_QUEUES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(
            f"{value!r}: name one or both of {', '.join(WORKER_QUEUES)}, separated by a comma"
        )
    return chosen


# --dtype's names → vLLM's.
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _tuneforge_dtype(value: str | None) -> str:
    return value or SERVE_DTYPE


def _lora_rank(value: str) -> int:  # argparse names a type by its function: "invalid _lora_rank value"
    rank = int(value)
    if not 1 <= rank <= MAX_LORA_RANK_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_LORA_RANK_LIMIT}")
    return rank

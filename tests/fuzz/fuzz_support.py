"""Schemathesis over an app's own OpenAPI, in process: every operation, a timeout per request, every 5xx kept.

`fuzz` sends generated requests (bodies, path and query parameters, headers; inputs that fit the
schema and inputs that do not) to an ASGI app through Schemathesis's in-process transport, and
records each answer by class. A 5xx, an exception escaping the app and a request with no answer
within the timeout are findings; for each kind of finding on each operation the smallest request
seen is kept as its reproducer. A target that stops answering (its probe fails after a finding) is
restarted, so one fatal request cannot hide the rest of the run. Used by `tests/fuzz` and by
`bench/fuzz.py`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
from fuzz_inputs import (
    EXTREME_NUMBERS,
    Choices,
    DrawnChoices,
    PlainChoices,
    SeededChoices,
    mutate,
    set_at,
    sweep_paths,
)
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.schemas import APIOperation, BaseSchema

# A request longer than this has hung: the slowest legitimate call here (the longest completion the
# fuzz engine's context allows, a dataset upload on a loaded machine) takes about a second.
REQUEST_TIMEOUT_SECONDS = 10.0
# The transport enforces the timeout on the app's event loop; if that loop itself is blocked, the
# call never returns, so the caller's thread gives up this much later.
_LOOP_GRACE_SECONDS = 10.0


class FuzzTarget(Protocol):
    """An app to fuzz: its schema, how to fill a generated case in, and how to check and revive it."""

    name: str
    schema: BaseSchema
    # "METHOD /path" -> (path parameters, body) of requests known to be accepted: where the sweep of
    # extreme numbers starts when generation alone rarely gets a body past the lookups.
    known_good: dict[str, list[tuple[dict[str, Any], Any]]]

    @property
    def app(self) -> Any: ...

    def prepare(self, case: Case, choices: Choices) -> dict[str, str]:
        """Swap real resource names into `case` (sometimes); the headers to add."""
        ...

    def alive(self) -> bool: ...

    def restart(self) -> None: ...


@dataclass(frozen=True)
class Finding:
    """A request that got a 5xx, raised out of the app, or got no answer; `reproducer()` is what to send."""

    kind: str  # "5xx", "exception" or "hung"
    operation: str
    method: str
    path: str
    query: dict[str, Any]
    headers: dict[str, Any]
    body: Any
    detail: str

    def size(self) -> int:
        return len(json.dumps([self.path, self.query, self.headers, self.body], default=str))

    def reproducer(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        target = self.path + (f"?{query}" if query else "")
        parts = [f"{self.method} {target}"]
        if self.headers:
            parts.append(f"headers={json.dumps(self.headers, default=str)}")
        if self.body is not None:
            parts.append(f"body={json.dumps(self.body, default=str)[:600]}")
        return f"[{self.kind}] {' '.join(parts)}  -> {self.detail[:300]}"


@dataclass
class FuzzRun:
    """Requests sent, their answers by class, and the smallest reproducer of each finding."""

    sent: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    restarts: int = 0
    stopped: str = ""
    seconds: list[float] = field(default_factory=list)

    def record(self, operation: str, answer: str, finding: Finding | None, seconds: float = 0.0) -> None:
        self.sent += 1
        self.seconds.append(seconds)
        self.by_class[answer] += 1
        self.by_operation[operation] += 1
        if finding is None:
            return
        key = (finding.operation, finding.kind, finding.detail.split("\n")[0][:120])
        kept = self.findings.get(key)
        if kept is None or finding.size() < kept.size():
            self.findings[key] = finding

    def summary(self, name: str) -> str:
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_class.items()))
        lines = [f"{name}: {self.sent} requests over {len(self.by_operation)} operations ({classes})"]
        if self.seconds:
            ordered = sorted(self.seconds)
            p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]
            lines.append(
                f"  latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {ordered[-1]:.1f} s"
            )
        if self.restarts:
            lines.append(f"  target restarted {self.restarts} time(s) after it stopped answering")
        if self.stopped:
            lines.append(f"  stopped early: {self.stopped}")
        lines += [f"  {f.reproducer()}" for f in self.findings.values()]
        return "\n".join(lines)


def operations(schema: BaseSchema) -> list[APIOperation]:
    """Every operation in the schema; deletes last, so that the others still find what they read."""
    found = [result.ok() for result in schema.get_all_operations()]
    return sorted(found, key=lambda op: (op.method.upper() == "DELETE", op.path, op.method))


def _name(operation: APIOperation) -> str:
    return f"{operation.method.upper()} {operation.path}"


def _answer(status: int) -> str:
    return f"{status // 100}xx"


def _raised_in_the_app(error: BaseException) -> bool:
    """Whether the exception came out of the ASGI app, not out of the client preparing the request."""
    frames = traceback.extract_tb(error.__traceback__)
    return any("/starlette/" in f.filename or "/fastapi/" in f.filename for f in frames)


def _shown(header: str, value: Any) -> Any:
    # The tenant's real token is named, not printed: a reproducer says whether it was sent.
    if header.lower() == "authorization" and "pb_" in str(value):
        return "Bearer <the tenant's token>"
    return value


def _finding(case: Case, kind: str, detail: str) -> Finding:
    return Finding(
        kind=kind,
        operation=_name(case.operation),
        method=case.method.upper(),
        path=case.formatted_path,
        query=dict(case.query or {}),
        headers={k: _shown(k, v) for k, v in (case.headers or {}).items()},
        body=None if case.body is None or type(case.body).__name__ == "NotSet" else case.body,
        detail=detail,
    )


def _call(
    target: FuzzTarget, case: Case, headers: dict[str, str], timeout: float
) -> tuple[str, Finding | None]:
    """Send one case; its answer class and, for a 5xx, an exception or no answer, the finding."""
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["response"] = case.call(app=target.app, headers=headers, timeout=timeout)
        except BaseException as exc:  # every way out of the app is a result here
            outcome["error"] = exc

    thread = threading.Thread(target=send, daemon=True, name="fuzz-call")
    thread.start()
    thread.join(timeout + _LOOP_GRACE_SECONDS)
    if thread.is_alive():
        return "hung", _finding(
            case, "hung", f"no answer in {timeout + _LOOP_GRACE_SECONDS:.0f}s (event loop blocked)"
        )
    error = outcome.get("error")
    if isinstance(error, requests.exceptions.ReadTimeout):
        return "hung", _finding(case, "hung", f"no answer in {timeout:.0f}s")
    if error is not None and not _raised_in_the_app(error):
        return "unsent", None  # the client could not build it (a URL that cannot be encoded)
    if error is not None:
        return "5xx", _finding(case, "exception", f"{type(error).__name__}: {error}")
    response = outcome["response"]
    if response.status_code >= 500:
        return _answer(response.status_code), _finding(case, "5xx", f"{response.status_code} {response.text}")
    return _answer(response.status_code), None


@dataclass
class Budget:
    """When a run stops: examples per operation and mode, and caps on requests and seconds."""

    examples_per_operation: int
    coverage_per_operation: int = 400
    max_requests: int = 1_000_000
    max_seconds: float = 3600.0
    request_timeout: float = REQUEST_TIMEOUT_SECONDS
    derandomize: bool = True
    seed: int | None = None  # Hypothesis's, when not derandomized: a run to repeat
    max_restarts: int = 5
    started: float = field(default_factory=time.monotonic)

    def spent(self, run: FuzzRun) -> str:
        if run.sent >= self.max_requests:
            return f"request budget ({self.max_requests}) spent"
        if time.monotonic() - self.started >= self.max_seconds:
            return f"time budget ({self.max_seconds:.0f}s) spent"
        return ""


def fuzz(target: FuzzTarget, budget: Budget, run: FuzzRun | None = None) -> FuzzRun:
    """Every operation of `target` until `budget` is spent: Schemathesis's coverage cases (boundaries,
    wrong types, missing parts), generated requests that fit the schema and requests that do not,
    then the accepted request with the most numbers, sent again with each number made extreme."""
    run = run or FuzzRun()
    for operation in operations(target.schema):
        if run.stopped:
            break
        accepted = _Accepted()
        _send_coverage_cases(target, operation, budget, run, accepted)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _send_generated_cases(target, operation, mode, budget, run, accepted)
        for path_parameters, body in target.known_good.get(_name(operation), []):
            case = operation.Case(path_parameters=path_parameters, body=copy.deepcopy(body))
            if _send(target, case, PlainChoices(), budget, run) == "2xx":
                accepted.offer(case)
        _sweep_extreme_numbers(target, operation, accepted.case, budget, run)
    return run


@dataclass
class _Accepted:
    """The 2xx-answered request of one operation with the most numbers and nulls in body and query."""

    case: Case | None = None

    def offer(self, case: Case) -> None:
        if self.case is None or len(_sweepable(case)) > len(_sweepable(self.case)):
            self.case = case


def _sweepable(case: Case) -> list[tuple[str, tuple[Any, ...]]]:
    """(part, path) of every number or null in the case's body and query."""
    return [
        (part, path)
        for part, value in (("body", case.body), ("query", case.query))
        if isinstance(value, dict | list)
        for path in sweep_paths(value)
    ]


def _send(target: FuzzTarget, case: Case, choices: Choices, budget: Budget, run: FuzzRun) -> str:
    """Fill in and send one case; its answer class, or "" once the run must stop."""
    # Filled in before the budget is looked at: Hypothesis replays draws and needs the same ones.
    headers = target.prepare(case, choices)
    if run.stopped or (reason := budget.spent(run)):
        run.stopped = run.stopped or reason
        return ""
    started = time.monotonic()
    answer, finding = _call(target, case, headers, budget.request_timeout)
    run.record(_name(case.operation), answer, finding, time.monotonic() - started)
    if finding is not None and not target.alive():
        _revive(target, budget, run)
    return "" if run.stopped else answer


def _send_coverage_cases(
    target: FuzzTarget, operation: APIOperation, budget: Budget, run: FuzzRun, accepted: _Accepted
) -> None:
    """Schemathesis's deterministic cases for `operation` (its coverage phase), at most a budget's worth."""
    cases = operation.schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=operation.schema.config.generation_for(operation=operation),
    )
    choices = SeededChoices(len(run.seconds))
    for case in itertools.islice(cases, budget.coverage_per_operation):
        mutate(case, choices)
        answer = _send(target, case, choices, budget, run)
        if not answer:
            return
        if answer == "2xx":
            accepted.offer(case)


def _sweep_extreme_numbers(
    target: FuzzTarget, operation: APIOperation, base: Case | None, budget: Budget, run: FuzzRun
) -> None:
    """`base` sent once per (number or null in its body or query, extreme value), the rest as accepted."""
    for part, path in _sweepable(base) if base is not None else []:
        for value in EXTREME_NUMBERS:
            assert base is not None
            body = copy.deepcopy(base.body) if isinstance(base.body, dict | list) else base.body  # or NOT_SET
            parts = {"body": body, "query": dict(base.query or {})}
            set_at(parts[part], path, value)
            case = operation.Case(
                path_parameters=dict(base.path_parameters or {}),
                query=parts["query"],
                headers=dict(base.headers or {}),
                body=parts["body"],
                media_type=base.media_type,
            )
            if not _send(target, case, PlainChoices(), budget, run):
                return


def _send_generated_cases(
    target: FuzzTarget,
    operation: APIOperation,
    mode: GenerationMode,
    budget: Budget,
    run: FuzzRun,
    accepted: _Accepted,
) -> None:
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(
        max_examples=budget.examples_per_operation,
        derandomize=budget.derandomize,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # the smallest request per finding is kept instead of shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def send_generated(data: st.DataObject) -> None:
        case, choices = data.draw(strategy), DrawnChoices(data)
        mutate(case, choices)
        if _send(target, case, choices, budget, run) == "2xx":
            accepted.offer(case)

    if budget.seed is not None:
        send_generated = seed(budget.seed)(send_generated)
    # Unsatisfiable: nothing of this mode to generate (no parameter that could be made invalid).
    with contextlib.suppress(Unsatisfiable):
        send_generated()


def _revive(target: FuzzTarget, budget: Budget, run: FuzzRun) -> None:
    if run.restarts >= budget.max_restarts:
        run.stopped = f"{target.name} stopped answering {run.restarts + 1} times"
        return
    run.restarts += 1
    target.restart()


def probe(app: Any, path: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> bool:
    """True when `GET path` answers 200 within `timeout` seconds (in a thread: the loop may be stuck)."""
    from schemathesis.python import asgi

    result: dict[str, int] = {}

    def get() -> None:
        try:
            with asgi.get_client(app) as client:
                result["status"] = client.get(path, headers=headers, timeout=timeout).status_code
        except Exception:
            result["status"] = 0

    thread = threading.Thread(target=get, daemon=True, name="fuzz-probe")
    thread.start()
    thread.join(timeout + _LOOP_GRACE_SECONDS)
    return result.get("status") == 200

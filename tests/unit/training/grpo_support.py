"""GRPO tests' reward sandbox: the real worker/training/reward_sandbox.py when it is there.

TEST DOUBLE, TEMPORARY: until the real sandbox lands, `InProcessSandbox` stands in for it with the same
interface. It runs the test's own reward functions in this process (never user code: only these tests
use it). Delete it once worker/training/reward_sandbox.py is merged.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Scores:
    values: dict[str, list[float]]
    failures: dict[str, int]
    errors: dict[str, str]


class InProcessSandbox:
    """TEST DOUBLE of RewardSandbox (see the module docstring)."""

    def __init__(
        self, functions: Mapping[str, str], limits: Any = None, packages: Sequence[str] = ()
    ) -> None:
        self.functions = {}
        for name, source in functions.items():
            scope: dict[str, Any] = {}
            exec(compile(source, f"<reward {name}>", "exec"), scope)  # the tests' own functions only
            self.functions[name] = next(v for v in scope.values() if callable(v))

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
    ) -> Scores:
        values: dict[str, list[float]] = {}
        failures: dict[str, int] = {}
        errors: dict[str, str] = {}
        for name, fn in self.functions.items():
            column = []
            for prompt, completion, example in zip(prompts, completions, examples, strict=True):
                try:
                    value = float(fn(prompt, completion, dict(example)))
                    column.append(value if math.isfinite(value) else 0.0)
                except Exception as exc:
                    column.append(0.0)
                    failures[name] = failures.get(name, 0) + 1
                    errors[name] = repr(exc)
            values[name] = column
            failures.setdefault(name, 0)
        return Scores(values, failures, errors)

    def close(self) -> None:
        pass


def reward_sandbox_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `worker.training.reward_sandbox` importable: the real one, else the test double."""
    try:
        importlib.import_module("worker.training.reward_sandbox")
        return
    except ModuleNotFoundError:
        pass
    module = types.ModuleType("worker.training.reward_sandbox")
    module.RewardSandbox = InProcessSandbox  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.training.reward_sandbox", module)

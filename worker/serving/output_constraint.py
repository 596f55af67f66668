"""`Constraint`: what a request's output must match, as the engines get it (constraints.py builds one
from the request's fields; guided.py compiles it; the vLLM engine passes it on)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ConstraintKind = Literal["json", "regex"]


@dataclass(frozen=True)
class Constraint:
    """A JSON schema (as compact, key-sorted JSON text) or a regex; `field` names the request field
    that carried it, for error messages only (two requests with the same grammar share its compilation)."""

    kind: ConstraintKind
    spec: str
    field: str = field(default="response_format", compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.spec)

    @property
    def schema(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.spec)
        return loaded

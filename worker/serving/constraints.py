"""What a request's output must match: `Constraint` (a JSON schema or a regex), read from the request
fields that carry one and bounded there, before anything is compiled.

The routes build a Constraint from OpenAI's `response_format` / tuneforge's `guided_regex` and
`guided_json`, LoRAX's `parameters.response_format`, or a forced tool call (tool_calls.py); guided.py
compiles it for tuneforge's engine, and the vLLM engine passes it on as vLLM's `structured_outputs`.
"""

from __future__ import annotations

import json
from typing import Any

from worker.serving.errors import GrammarError
from worker.serving.output_constraint import Constraint
from worker.serving.params import MAX_REGEX_CHARS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def json_constraint(schema: object, field: str) -> Constraint:
    """A schema checked for shape and bounds: an object, at most MAX_SCHEMA_BYTES as JSON, nested at
    most MAX_SCHEMA_DEPTH deep."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{field} must be a JSON schema object", field=field)
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(
            f"{field} is nested {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are accepted", field=field
        )
    spec = json.dumps(schema, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    size = len(spec.encode())
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(
            f"{field} is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are accepted", field=field
        )
    return Constraint("json", spec, field)


def regex_constraint(pattern: object, field: str) -> Constraint:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError(f"{field} must be a non-empty regular expression string", field=field)
    if len(pattern) > MAX_REGEX_CHARS:
        raise GrammarError(f"{field} has {len(pattern)} characters; at most {MAX_REGEX_CHARS}", field=field)
    return Constraint("regex", pattern, field)


def openai_constraint(
    response_format: dict[str, Any] | None, guided_regex: str | None, guided_json: object | None
) -> Constraint | None:
    """OpenAI's `response_format` (text, json_object, json_schema) or vLLM-style `guided_regex` /
    `guided_json`; at most one of them may constrain the output."""
    chosen = [
        name
        for name, value in (
            ("response_format", _constrains(response_format)),
            ("guided_regex", guided_regex is not None),
            ("guided_json", guided_json is not None),
        )
        if value
    ]
    if len(chosen) > 1:
        raise GrammarError(f"{chosen[1]} cannot be combined with {chosen[0]}; send one", field=chosen[1])
    if guided_regex is not None:
        return regex_constraint(guided_regex, "guided_regex")
    if guided_json is not None:
        return json_constraint(guided_json, "guided_json")
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_constraint(ANY_JSON_OBJECT, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise GrammarError(
                "response_format.json_schema must be an object with a 'schema' (and a 'name')",
                field="response_format",
            )
        return json_constraint(spec["schema"], "response_format")
    raise GrammarError(
        "response_format type must be 'text', 'json_object' or 'json_schema'", field="response_format"
    )


def lorax_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """LoRAX's `{"type": "json_object", "schema": {...}}` (no schema: any JSON object), and tuneforge's
    `{"type": "regex", "schema": "<pattern>"}`."""
    if response_format is None:
        return None
    kind, schema = response_format.get("type"), response_format.get("schema")
    if kind == "json_object":
        return json_constraint(ANY_JSON_OBJECT if schema is None else schema, "response_format")
    if kind == "regex":
        return regex_constraint(schema, "response_format")
    raise GrammarError("response_format type must be 'json_object' or 'regex'", field="response_format")


def _constrains(response_format: dict[str, Any] | None) -> bool:
    return response_format is not None and response_format.get("type") != "text"


def _depth(document: object) -> int:
    """Nesting depth of dicts and lists, without recursion (a deep document must not overflow the stack)."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_SCHEMA_DEPTH:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest

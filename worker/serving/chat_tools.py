"""Tool calling for chat: the declared `tools` checked and rendered into the prompt, the grammar of a
forced call (`tool_choice` "required" or a named function), and the calls parsed back out of the output.

Output formats. A named call is constrained to the function's arguments (a JSON object valid against its
`parameters`); "required" to a JSON array of `{"name": ..., "arguments": {...}}` (one item unless
`parallel_tool_calls`). With "auto" the model writes freely, and its output is read as tool calls when
it holds Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or is as a whole
one such JSON object (or an array of them) naming a declared function. A chat template that renders no
tools gets a system message listing them (as JSON) and asking for the `<tool_call>` format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from worker.serving.constraints import json_constraint
from worker.serving.errors import GrammarError
from worker.serving.output_constraint import Constraint
from worker.serving.params import MAX_CHOICES, MAX_TOOLS

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TAG_OPEN = "<tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def _fail(field: str, message: str) -> GrammarError:
    return GrammarError(f"{field} {message}", field=field)


def parse_tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    """The declared functions, each checked: a unique name, a parameters schema within the schema bounds."""
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise _fail("tools", f"may declare at most {MAX_TOOLS} functions")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise _fail(f"tools[{i}]", "must be {'type': 'function', 'function': {...}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in {t.name for t in parsed}:
            raise _fail(f"tools[{i}].function.name", "must be a unique name of 1-64 letters, digits, _ or -")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        json_constraint(parameters, f"tools[{i}].function.parameters")  # bounds only: compiled when forced
        description = function.get("description", "")
        parsed.append(Tool(name, description if isinstance(description, str) else "", parameters))
    return parsed


@dataclass(frozen=True)
class ChatTools:
    """One chat request's tools and how it may use them: mode "none", "auto", "required" or "named"."""

    tools: list[Tool]
    mode: str
    named: Tool | None = None
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, choice: object, parallel: bool | None) -> ChatTools:
        declared = parse_tools(tools)
        if choice is None:
            choice = "auto" if declared else "none"
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            named = next((t for t in declared if t.name == name), None)
            if choice.get("type") != "function" or named is None:
                raise _fail("tool_choice", "must name a function declared in tools")
            return cls(declared, "named", named, parallel is not False)
        if choice not in ("none", "auto", "required"):
            raise _fail("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', ...}")
        if choice != "none" and not declared:
            raise _fail("tool_choice", f"is {choice!r} but no tools are declared")
        return cls(declared, str(choice), None, parallel is not False)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def constraint(self) -> Constraint | None:
        """The grammar of a forced call; None when the model may answer in text."""
        if self.named is not None:
            return Constraint("json", json_constraint(self.named.parameters, "tools").spec, "tools")
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        schema["maxItems"] = MAX_CHOICES if self.parallel else 1
        return json_constraint(schema, "tools")

    def system_prompt(self) -> str:
        listed = json.dumps([t.as_openai() for t in self.tools], ensure_ascii=False)
        return (
            f"You can call these functions: {listed}\n"
            'To call one, answer with <tool_call>{"name": <function name>, "arguments": <JSON object>}'
            "</tool_call> (one block per call) and nothing else."
        )

    def calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The output as (content, tool calls in OpenAI's form); no calls if it holds none."""
        if self.named is not None:
            return None, [_call(self.named.name, _arguments(text))]
        found: list[tuple[str, Any]] = []
        tagged = _TAGGED.findall(text)
        for block in tagged or [text]:
            found += _named_calls(block, {t.name for t in self.tools})
        if not found:
            return text, []
        content = _TAGGED.sub("", text).strip() if tagged else ""
        return content or None, [_call(name, arguments) for name, arguments in found]


def _named_calls(text: str, names: set[str]) -> list[tuple[str, Any]]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        calls.append((item["name"], item.get("arguments", item.get("parameters", {}))))
    return calls


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # cut short by max_tokens: passed on as written
        return text


def _call(name: str, arguments: Any) -> dict[str, Any]:
    encoded = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": encoded},
    }


def template_messages(
    conversation: list[dict[str, Any]], tools: ChatTools, renders_tools: bool
) -> list[dict[str, Any]]:
    """The conversation as the chat template gets it: assistant tool calls with parsed arguments (HF's
    convention) for a template that renders tools, else as `<tool_call>` text after a system message
    that lists the tools."""
    messages = []
    for turn in conversation:
        calls = turn.get("tool_calls") or []
        if calls and not renders_tools:
            blocks = [
                f"{TAG_OPEN}{json.dumps(_plain_call(c), ensure_ascii=False)}</tool_call>" for c in calls
            ]
            turn = {"role": turn["role"], "content": (turn.get("content") or "") + "".join(blocks)}
        elif calls:
            turn = turn | {"tool_calls": [{"type": "function", "function": _plain_call(c)} for c in calls]}
        messages.append(turn)
    if tools.active and not renders_tools:
        if messages and messages[0]["role"] == "system":
            first = messages[0]
            messages[0] = first | {"content": f"{first['content']}\n\n{tools.system_prompt()}"}
        else:
            messages.insert(0, {"role": "system", "content": tools.system_prompt()})
    return messages


def _plain_call(call: object) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _fail(
            "messages", "tool_calls entries must be {'type': 'function', 'function': {'name', 'arguments'}}"
        )
    arguments = function.get("arguments", "{}")
    return {
        "name": function["name"],
        "arguments": _arguments(arguments) if isinstance(arguments, str) else arguments,
    }

"""`FinetuningConfig` validation errors as (field, message) pairs: one wording for the client's local
check and the server's 422.

pydantic reports a value that fits no member of a union (`rank: int | 'auto'`) once per member,
with the member's tag in the location (`rank.int`, `rank.literal['auto']`); users know only the
field, so the tags are dropped and the member messages joined with "or". A check across fields
(the model validator) has no location; its message starts with the field it names.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydantic

from tuneforge.config import FinetuningConfig


def config_errors(error: pydantic.ValidationError) -> list[tuple[str, str]]:
    """`(field, message)` per problem, in pydantic's order; field is "" for a check across fields."""
    pairs: list[tuple[str, str]] = []
    previous_was_union = False
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            known = ", ".join(sorted(_model_at(loc[:-1]).model_fields))
            pairs.append((".".join(map(str, loc)), f"unknown field; the accepted fields are {known}"))
            previous_was_union = False
            continue
        field, is_union_member = _field_path(loc)
        message = "required" if item["type"] == "missing" else str(item["msg"]).removeprefix("Value error, ")
        if is_union_member and previous_was_union and pairs and pairs[-1][0] == field:
            pairs[-1] = (field, f"{pairs[-1][1]}, or {message}")
        else:
            pairs.append((field, message))
        previous_was_union = is_union_member
    return pairs


def _field_path(loc: Sequence[int | str]) -> tuple[str, bool]:
    """The dotted field path within the config, and whether a union member's tag followed it."""
    model: type[pydantic.BaseModel] | None = FinetuningConfig
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif model is not None and part in model.model_fields:
            parts.append(part)
            model = _nested_model(model, part)
        else:
            return ".".join(parts), True
    return ".".join(parts), False


def _model_at(loc: Sequence[int | str]) -> type[pydantic.BaseModel]:
    """The (nested) config model at `loc`, for listing the fields it accepts."""
    model: type[pydantic.BaseModel] = FinetuningConfig
    for part in loc:
        nested = _nested_model(model, part) if isinstance(part, str) and part in model.model_fields else None
        if nested is None:
            break
        model = nested
    return model


def _nested_model(model: type[pydantic.BaseModel], name: str) -> type[pydantic.BaseModel] | None:
    annotation = model.model_fields[name].annotation
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None

"""Adapter ids as the client takes them (`"repo/3"`, a version object, or a checkpoint `"repo/3@40"`),
checked by the shared reference rule and refused with a ValidationError that says what was expected."""

from __future__ import annotations

from tuneforge.errors import ValidationError
from tuneforge.models import AdapterVersion, VersionSummary
from tuneforge.rules import adapter_ref

AdapterRef = str | AdapterVersion | VersionSummary


def parse_adapter_id(adapter: AdapterRef) -> tuple[str, int]:
    """`"repo/3"` (or an AdapterVersion / VersionSummary) → `("repo", 3)`; refuses anything else."""
    if isinstance(adapter, AdapterVersion | VersionSummary):
        adapter = adapter.id
    if "@" in adapter.partition("/")[2]:
        raise ValidationError(f"adapter id {adapter!r}: checkpoint ids (repo/tag@N) are not accepted here")
    try:
        ref = adapter_ref.AdapterRef.parse(adapter)
    except adapter_ref.AdapterRefError:
        raise ValidationError(
            f"adapter id {adapter!r}: expected '<repo>/<version>', e.g. 'my-repo/3'"
        ) from None
    return ref.repo, ref.number


def parse_version_ref(ref: AdapterRef) -> tuple[str, int, int | None]:
    """A version or one of its checkpoints: `"r/3"` → `("r", 3, None)`, `"r/3@40"` → `("r", 3, 40)`.

    What `continue_from_version` takes: a run continues from a finished version or a checkpoint.
    """
    if isinstance(ref, str) and "@" in ref:
        try:
            parsed = adapter_ref.AdapterRef.parse(ref)
        except adapter_ref.AdapterRefError:
            raise ValidationError(
                f"checkpoint id {ref!r}: expected '<repo>/<version>@<step>', e.g. 'my-repo/3@40'"
            ) from None
        return parsed.repo, parsed.number, parsed.step
    repo, tag = parse_adapter_id(ref)
    return repo, tag, None

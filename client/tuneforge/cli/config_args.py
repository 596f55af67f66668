"""A fine-tuning config from the command line: a YAML/JSON file, the named flags, then `--set key=value`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.errors import ValidationError


def parse_value(text: str) -> Any:
    """`--set` values are JSON where they parse as JSON (numbers, true, null, lists), else plain text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_setting(config: dict[str, Any], assignment: str) -> None:
    """Apply one `key=value`; a dotted key (`lr_scheduler.type=cosine`) sets a field of a nested object."""
    key, equals, raw = assignment.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ValidationError(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    target = config
    for part in parents:
        nested = target.setdefault(part, {})
        if not isinstance(nested, dict):
            raise ValidationError(f"--set {key}: {part} is not an object")
        target = nested
    target[leaf] = parse_value(raw)


def load_config_file(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping: JSON, or YAML for `.yaml`/`.yml` (YAML needs PyYAML)."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValidationError(
                f"{path}: YAML configs need PyYAML (pip install pyyaml); or use JSON"
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValidationError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValidationError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
    return loaded


def build_config(config_file: str | None, flags: dict[str, Any], settings: Sequence[str]) -> dict[str, Any]:
    """The config the user asked for, unvalidated (the client checks it, naming any bad field).

    Later sources win: the file, then the named flags that were given, then each `--set` in order.
    """
    config: dict[str, Any] = load_config_file(Path(config_file)) if config_file else {}
    config.update({key: value for key, value in flags.items() if value is not None})
    for assignment in settings:
        apply_setting(config, assignment)
    return config

"""A classification adapter's label file (classifier_labels.json): its format, bounds and checks, shared by
the trainer that writes it and the serving engine that loads it (a stored file is hostile until checked)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tuneforge.rules.artifacts import CLASSIFIER_LABELS

LABELS_FORMAT = 1
# Far above any real label set; the score head is [labels, hidden], so this also bounds its size.
MAX_LABELS = 4096
MAX_LABEL_CHARS = 256
# A file of MAX_LABELS labels of MAX_LABEL_CHARS (escaped, twice: id2label and label2id) fits well under this.
MAX_LABELS_FILE_BYTES = 8 * 1024 * 1024


class ClassifierLabelsError(ValueError):
    """The label file breaks a rule; the message names the field."""


def label_name(value: Any) -> str | None:
    """A row's label as the label set holds it (ints as their decimal string); None if it is neither a
    string nor an integer, or out of bounds."""
    if isinstance(value, bool):  # a JSON true is not a class
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL_CHARS:
        return None
    return value


def encode_labels(labels: Sequence[str]) -> str:
    """The file's text: the labels in class-index order, and both maps (as HF configs spell them)."""
    check_labels(list(labels))
    document = {
        "format": LABELS_FORMAT,
        "labels": list(labels),
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    return json.dumps(document, indent=2) + "\n"


def parse_labels(raw: bytes) -> list[str]:
    """The labels, in class-index order, of a label file's bytes; ClassifierLabelsError on a broken rule."""
    if len(raw) > MAX_LABELS_FILE_BYTES:
        raise ClassifierLabelsError(f"{CLASSIFIER_LABELS} is over {MAX_LABELS_FILE_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClassifierLabelsError(f"{CLASSIFIER_LABELS} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != LABELS_FORMAT:
        raise ClassifierLabelsError(f"{CLASSIFIER_LABELS}: format must be {LABELS_FORMAT}")
    labels = document.get("labels")
    if not isinstance(labels, list):
        raise ClassifierLabelsError(f"{CLASSIFIER_LABELS}: labels must be a list of strings")
    check_labels(labels)
    return [str(label) for label in labels]


def check_labels(labels: list[Any]) -> None:
    if not 2 <= len(labels) <= MAX_LABELS:
        raise ClassifierLabelsError(f"{CLASSIFIER_LABELS}: labels: {len(labels)} labels; 2..{MAX_LABELS}")
    for label in labels:
        if not isinstance(label, str) or label_name(label) != label:
            raise ClassifierLabelsError(
                f"{CLASSIFIER_LABELS}: labels: {str(label)[:80]!r} is not a label of "
                f"1..{MAX_LABEL_CHARS} characters"
            )
    if len(set(labels)) != len(labels):
        raise ClassifierLabelsError(f"{CLASSIFIER_LABELS}: labels: a label appears twice")

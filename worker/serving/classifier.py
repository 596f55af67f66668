"""A classification adapter's head in the engine: loading its `score` weight and label set (checked: hostile
until proven otherwise), and turning each input's last-token hidden state into label probabilities.

The adapter is what task 'classification' trains (worker/training/classification.py): a LoRA on the base
plus `score` [labels, hidden] applied to the final-norm hidden state of the input's last token, softmaxed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tuneforge import lora_rules
from tuneforge.rules.artifacts import ADAPTER_WEIGHTS, CLASSIFIER_LABELS
from tuneforge.rules.classifier import MAX_LABELS_FILE_BYTES, ClassifierLabelsError, parse_labels

from worker.serving.errors import AdapterLoadError


@dataclass(frozen=True)
class ClassifierHead:
    """`weight` [labels, hidden] float32 on the engine's device; `labels[i]` names class i."""

    weight: torch.Tensor
    labels: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)

    def probabilities(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] last-token hidden states -> [N, labels] float32 probabilities."""
        logits = last_hidden.float() @ self.weight.T  # [N, L]
        return torch.softmax(logits, dim=-1)


def load_head(
    directory: Path, config: Mapping[str, Any], *, hidden_size: int | None, device: torch.device
) -> ClassifierHead:
    """The head of a classification adapter (its adapter_config.json says task_type SEQ_CLS): the label set
    and the one `score` weight, whose shape must be [len(labels), hidden_size] and values finite."""
    if hidden_size is None:
        raise AdapterLoadError("this engine cannot serve classification adapters (no hidden size to check)")
    path = directory / CLASSIFIER_LABELS
    try:
        if path.stat().st_size > MAX_LABELS_FILE_BYTES:
            raise AdapterLoadError(f"{CLASSIFIER_LABELS} is over {MAX_LABELS_FILE_BYTES} bytes")
        labels = parse_labels(path.read_bytes())
    except OSError:
        raise AdapterLoadError(
            f"it is a classification adapter ({lora_rules.CLASSIFICATION_TASK_TYPE}) "
            f"without {CLASSIFIER_LABELS}"
        ) from None
    except ClassifierLabelsError as exc:
        raise AdapterLoadError(str(exc)) from None
    weight = _read_head_weight(directory / ADAPTER_WEIGHTS, len(labels), hidden_size)
    weight = weight.to(device=device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(weight).all()):
        raise AdapterLoadError("score.weight holds NaN or infinite values")
    return ClassifierHead(weight, tuple(labels))


def _read_head_weight(weights: Path, n_labels: int, hidden_size: int) -> torch.Tensor:
    model = {"hidden_size": hidden_size}
    found: torch.Tensor | None = None
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not lora_rules.is_head_weight(name):
                    continue
                if found is not None:
                    raise AdapterLoadError(f"{name}: a second classification head weight")
                tensor_slice = f.get_slice(name)
                if tensor_slice.get_dtype() not in lora_rules.FLOAT_DTYPES:
                    raise AdapterLoadError(f"{name}: dtype {tensor_slice.get_dtype()} is not a float type")
                shape = list(tensor_slice.get_shape())
                labels = lora_rules.check_head_shape(name, shape, model)
                if labels != n_labels:
                    raise AdapterLoadError(
                        f"{name}: the head has {labels} rows but {CLASSIFIER_LABELS} names {n_labels} labels"
                    )
                found = f.get_tensor(name)
    except lora_rules.AdapterRuleError as exc:
        raise AdapterLoadError(str(exc)) from None
    except (OSError, ValueError, RuntimeError, SafetensorError):
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS} is not a readable safetensors file") from None
    if found is None:
        raise AdapterLoadError(f"a classification adapter's {ADAPTER_WEIGHTS} holds no score.weight head")
    return found

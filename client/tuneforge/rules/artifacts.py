"""What an adapter directory holds: its file names, and a manifest of which kinds of files are there."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# PEFT's pair, as `save_pretrained` writes it.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's older pickled weights: recognised only to refuse them (unpickling can run arbitrary code).
PICKLED_WEIGHTS = "adapter_model.bin"
# A Turbo adapter's speculator (Medusa heads or an eagle draft layer), beside or instead of the LoRA.
SPECULATOR_CONFIG = "speculator_config.json"
SPECULATOR_WEIGHTS = "speculator.safetensors"
# The trainer's report on a published run (losses, timings, the speculator's measured speedup).
TRAINING_SUMMARY = "training_summary.json"
# A classification adapter's label set (task 'classification'), beside its LoRA and `score` head weights.
CLASSIFIER_LABELS = "classifier_labels.json"

LORA_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
SPECULATOR_FILES = (SPECULATOR_CONFIG, SPECULATOR_WEIGHTS)
# What a serving engine loads from an adapter directory; anything else stored there stays put.
SERVABLE_FILES = LORA_FILES + SPECULATOR_FILES + (CLASSIFIER_LABELS,)


@dataclass(frozen=True)
class ArtifactManifest:
    """The file names at the top level of an adapter directory (or of a stored version's file list)."""

    names: frozenset[str]

    @classmethod
    def of_names(cls, names: Iterable[str]) -> ArtifactManifest:
        return cls(frozenset(names))

    @classmethod
    def of_directory(cls, directory: Path) -> ArtifactManifest:
        """The regular files directly in `directory`; an absent directory holds nothing."""
        if not directory.is_dir():
            return cls(frozenset())
        return cls(frozenset(path.name for path in directory.iterdir() if path.is_file()))

    @property
    def has_lora_config(self) -> bool:
        return ADAPTER_CONFIG in self.names

    @property
    def has_lora_weights(self) -> bool:
        """Safetensors LoRA weights (pickled ones do not count: they are never loaded)."""
        return ADAPTER_WEIGHTS in self.names

    @property
    def has_lora(self) -> bool:
        return all(name in self.names for name in LORA_FILES)

    @property
    def has_pickled_weights(self) -> bool:
        return PICKLED_WEIGHTS in self.names

    @property
    def has_speculator(self) -> bool:
        return all(name in self.names for name in SPECULATOR_FILES)

    @property
    def has_classifier_labels(self) -> bool:
        return CLASSIFIER_LABELS in self.names

    @property
    def has_summary(self) -> bool:
        return TRAINING_SUMMARY in self.names

    @property
    def is_speculator_only(self) -> bool:
        """A `turbo` adapter trained on the base model alone: heads, and no LoRA weights of any kind."""
        return self.has_speculator and not self.has_lora_weights and not self.has_pickled_weights

    def servable(self) -> tuple[str, ...]:
        """The files of this directory a serving engine loads, in a fixed order."""
        return tuple(name for name in SERVABLE_FILES if name in self.names)

"""What the engine needs of any speculator kind (`DraftModel`), and of the base model's LM head (`LMHead`).

A Turbo adapter's speculator is Medusa heads (speculator.py) or an eagle draft layer (eagle.py);
adapter_loader.py picks the kind by the architecture its speculator_config.json names.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LMHead(Protocol):
    """The runner's LM head: called on hidden states `[N, D]`, weight `[V, D]`."""

    weight: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DraftModel(Protocol):
    """A loaded speculator, shared by every request of its adapter."""

    @property
    def num_heads(self) -> int:
        """Its trained depth: drafts proposed per step at most."""
        ...

    @property
    def nbytes(self) -> int:
        """Memory its weights take (counted with the adapter's in the cache)."""
        ...

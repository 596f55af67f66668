"""LoRA adapters for batched serving: a loaded adapter's weights, and one low-rank delta for a mixed batch.

Every token in a step may belong to a different adapter (or none). For each layer and group of
projections sharing an input (q/k/v, o, gate/up, down) the adapters active in the step are
concatenated once (`A_cat [R, in]` over adapters and modules, R = sum of their ranks; `B·scaling`
stacked per module) and the delta for all tokens is

    shrink = select(x @ A_cat^T, own)      # [T, R]; each token keeps only its own adapter's columns
    y[:, module] += shrink[:, module cols] @ B_module^T     # one GEMM per module of the group

a few small GEMMs for the whole batch whatever mix of adapters, ranks and targets it holds (the
BGMV "gather per row" done as a column selection, which CPUs prefer to per-row gathers). The baseline
it replaces is one sub-batch per adapter.

Isolation between adapters rests on two things. The selection writes zeros into the other adapters'
columns (it does not multiply by a 0/1 mask: an overflow to Inf times 0 would be NaN in another
tenant's row). And every tensor is checked finite at load (adapter_loader.py), after scaling and the
cast to the serving dtype, so the expand multiplies those zeros by finite numbers only. A token's delta
is therefore the same, value for value, whichever other adapters share its step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from worker.serving.classifier import ClassifierHead
from worker.serving.draft_model import DraftModel


@dataclass
class AdapterWeights:
    """One loaded adapter: `(layer, module) → (A [r, in], B·scaling [out, r])`."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_model: str | None
    nbytes: int
    speculator: DraftModel | None = None  # a Turbo adapter's Medusa heads or draft layer
    classifier: ClassifierHead | None = None  # a classification adapter's head and labels


# The runner fuses projections that share an input into one GEMM; LoRA follows the same groups so a
# group's adapters need one shrink GEMM, then one expand per module into its slice of the output.
# Phi3's checkpoint is fused already: its LoRAs target `qkv_proj` / `gate_up_proj` whole.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj", "gate_up_proj"),
    "down": ("down_proj",),
}


@dataclass
class _Expand:
    columns: slice  # this module's columns of the group's shrink output
    b_t: torch.Tensor  # [r_module_total, out], B·scaling of each adapter, stacked and transposed
    module: str


@dataclass
class _GroupStack:
    a_cat: torch.Tensor  # [R, in]: every active adapter's A for every module of the group
    owners: torch.Tensor  # [R] which active adapter owns each column
    expands: list[_Expand]


class LoraBatch:
    """The low-rank deltas of one step: adapters stacked per group, and which columns each token keeps."""

    def __init__(self, stacks: dict[tuple[int, str], _GroupStack], token_adapter: torch.Tensor) -> None:
        # token_adapter: [T] long, index into the step's active adapter list, -1 = base model only.
        self.stacks = stacks
        self._token_adapter = token_adapter[:, None]
        # Keyed by the owners tensor: layers usually share one.
        self._foreign: dict[int, torch.Tensor] = {}

    def apply(
        self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, offsets: dict[str, slice]
    ) -> None:
        """Adds the group's deltas for x `[T, in]` into y `[T, out]` in place, per module `offsets`."""
        stacked = self.stacks.get((layer, group))
        if stacked is None:
            return
        foreign = self._foreign.get(id(stacked.owners))
        if foreign is None:  # [T, R] True where the column is another adapter's (or the token has none)
            foreign = self._foreign[id(stacked.owners)] = self._token_adapter != stacked.owners[None, :]
        # Zeros written, not a 0/1 mask multiplied: Inf x 0 is NaN, and would reach other rows.
        shrink = (x @ stacked.a_cat.T).masked_fill_(foreign, 0)  # [T, R]
        for expand in stacked.expands:
            y[:, offsets[expand.module]].addmm_(shrink[:, expand.columns], expand.b_t)


class LoraStacker:
    """Concatenates the active adapters' weights, reusing the stacks of recent active lists.

    Continuous batching changes the list only when a request joins or leaves, and alternates between
    a prefill step's list and the decode list, so a few remembered stacks cover most steps.
    """

    KEEP = 4

    def __init__(self) -> None:
        self._recent: OrderedDict[
            tuple[int, ...], tuple[list[AdapterWeights], dict[tuple[int, str], _GroupStack]]
        ]
        self._recent = OrderedDict()

    def stacks(self, active: list[AdapterWeights]) -> dict[tuple[int, str], _GroupStack]:
        key = tuple(id(a) for a in active)
        hit = self._recent.get(key)
        if hit is not None and all(a is b for a, b in zip(active, hit[0], strict=True)):
            self._recent.move_to_end(key)
            return hit[1]
        stacks: dict[tuple[int, str], _GroupStack] = {}
        owner_cache: dict[tuple[int, ...], torch.Tensor] = {}
        layers = sorted({layer for adapter in active for layer, _ in adapter.modules})
        for layer in layers:
            for group, modules in GROUPS.items():
                stacked = _stack_group(active, layer, modules, owner_cache)
                if stacked is not None:
                    stacks[(layer, group)] = stacked
        self._recent[key] = (list(active), stacks)
        while len(self._recent) > self.KEEP:
            self._recent.popitem(last=False)
        return stacks


def _stack_group(
    active: list[AdapterWeights],
    layer: int,
    modules: tuple[str, ...],
    owner_cache: dict[tuple[int, ...], torch.Tensor],
) -> _GroupStack | None:
    a_parts: list[torch.Tensor] = []
    owners: list[int] = []
    expands: list[_Expand] = []
    for module in modules:
        start = len(owners)
        b_parts = []
        for pos, adapter in enumerate(active):
            pair = adapter.modules.get((layer, module))
            if pair is None:
                continue
            a, b = pair
            a_parts.append(a)
            b_parts.append(b)
            owners.extend([pos] * a.shape[0])
        if b_parts:
            b_t = torch.cat(b_parts, dim=1).T.contiguous()
            expands.append(_Expand(columns=slice(start, len(owners)), b_t=b_t, module=module))
    if not expands:
        return None
    key = tuple(owners)
    if key not in owner_cache:  # same layout in every layer → one tensor → one mask per step
        owner_cache[key] = torch.tensor(owners, device=a_parts[0].device)
    return _GroupStack(a_cat=torch.cat(a_parts), owners=owner_cache[key], expands=expands)

"""LoRA adapters for batched serving: loading PEFT files, and one low-rank delta for a mixed batch.

Every token in a step may belong to a different adapter (or none). For each (layer, module) the
adapters active in the step are concatenated once (`A_cat [R, in]`, `B_cat [out, R]` with the PEFT
scaling folded into B, R = sum of their ranks) and the delta for all tokens is

    shrink = (x @ A_cat^T) * mask      # [T, R]; mask keeps only each token's own adapter's columns
    y     += shrink @ B_cat^T          # [T, out]

two small GEMMs for the whole batch whatever mix of adapters, ranks and targets it holds (the
BGMV "gather per row" done as a column mask, which CPUs prefer to per-row gathers). The baseline it
replaces is one sub-batch per adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from worker.serving.errors import AdapterLoadError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class AdapterWeights:
    """One loaded adapter: `(layer, module) → (A [r, in], B·scaling [out, r])`."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_model: str | None
    nbytes: int

    @classmethod
    def load(cls, key: str, directory: Path, *, num_layers: int, dtype: torch.dtype) -> AdapterWeights:
        config = _read_config(directory)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file():
            raise AdapterLoadError(
                f"adapter {key} has no adapter_model.safetensors; only safetensors weights are served "
                "(convert a pickle adapter_model.bin with safetensors.torch.save_file)"
            )
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        try:
            with safe_open(str(weights), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    match = _KEY.search(name)
                    if match is None:
                        raise AdapterLoadError(
                            f"adapter {key}: weight {name} is not a LoRA projection we serve"
                        )
                    layer, module, which = int(match[1]), match[2], match[3]
                    if module not in TARGETS or layer >= num_layers:
                        raise AdapterLoadError(f"adapter {key}: {name} does not fit this base model")
                    pairs.setdefault((layer, module), {})[which] = f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:  # corrupt or truncated file
            raise AdapterLoadError(f"adapter {key}: cannot read adapter_model.safetensors ({exc})") from exc
        modules = {}
        for (layer, module), pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise AdapterLoadError(f"adapter {key}: layer {layer} {module} lacks lora_A or lora_B")
            a, b = pair["A"], pair["B"]
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise AdapterLoadError(f"adapter {key}: layer {layer} {module} has mismatched ranks")
            scaling = _scaling(config, f"model.layers.{layer}.{_parent(module)}.{module}", rank)
            modules[(layer, module)] = (
                a.to(dtype).contiguous(),
                (b.float() * scaling).to(dtype).contiguous(),
            )
        nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
        return cls(key=key, modules=modules, base_model=config.get("base_model_name_or_path"), nbytes=nbytes)


def _parent(module: str) -> str:
    return "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"


def _read_config(directory: Path) -> dict:  # type: ignore[type-arg]
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"adapter_config.json is missing or not JSON ({exc})") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterLoadError(f"only LoRA adapters are served (peft_type is {config.get('peft_type')!r})")
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters are not served yet: train with adapter='lora' to serve it here")
    if config.get("modules_to_save"):
        raise AdapterLoadError(
            f"adapters with modules_to_save ({config['modules_to_save']}) cannot share a batched base model"
        )
    return config  # type: ignore[no-any-return]


def _pattern_value(patterns: dict, module_path: str, default: float) -> float:  # type: ignore[type-arg]
    """PEFT's rule: a pattern key matches the module path's suffix at a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return float(value)
    return default


def _scaling(config: dict, module_path: str, rank: int) -> float:  # type: ignore[type-arg]
    alpha = _pattern_value(
        config.get("alpha_pattern") or {}, module_path, float(config.get("lora_alpha") or 8)
    )
    if config.get("use_rslora"):
        return float(alpha / rank**0.5)
    return alpha / rank


@dataclass
class _Stacked:
    a_cat: torch.Tensor  # [R, in]
    b_cat_t: torch.Tensor  # [R, out], transposed once so the step does a plain addmm
    layout: tuple[tuple[int, int], ...]  # (position in the active list, rank) per block of columns


class LoraBatch:
    """The low-rank deltas of one step: adapters stacked per module, and a column mask per token."""

    def __init__(
        self, stacks: dict[tuple[int, str], _Stacked], token_adapter: torch.Tensor, dtype: torch.dtype
    ):
        # token_adapter: [T] long, index into the step's active adapter list, -1 = base model only.
        self.stacks = stacks
        self._masks: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}
        for stacked in stacks.values():
            if stacked.layout not in self._masks:
                owners = torch.cat([torch.full((rank,), pos) for pos, rank in stacked.layout])
                self._masks[stacked.layout] = (token_adapter[:, None] == owners[None, :]).to(dtype)

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y + delta(x)` for (layer, module); `y` unchanged if no active adapter targets it."""
        stacked = self.stacks.get((layer, module))
        if stacked is None:
            return y
        shrink = (x @ stacked.a_cat.T).mul_(self._masks[stacked.layout])  # [T, R]
        return torch.addmm(y, shrink, stacked.b_cat_t)


class LoraStacker:
    """Concatenates the active adapters' weights, rebuilding only when the active list changes.

    Continuous batching changes the list only when a request joins or leaves with a new adapter, so
    most steps reuse the previous stack.
    """

    def __init__(self) -> None:
        self._active: list[AdapterWeights] = []
        self._stacks: dict[tuple[int, str], _Stacked] = {}

    def stacks(self, active: list[AdapterWeights]) -> dict[tuple[int, str], _Stacked]:
        if len(active) == len(self._active) and all(
            a is b for a, b in zip(active, self._active, strict=True)
        ):
            return self._stacks
        stacks: dict[tuple[int, str], _Stacked] = {}
        for target in sorted({m for adapter in active for m in adapter.modules}):
            parts = [
                (pos, adapter.modules[target])
                for pos, adapter in enumerate(active)
                if target in adapter.modules
            ]
            stacks[target] = _Stacked(
                a_cat=torch.cat([a for _, (a, _b) in parts]),
                b_cat_t=torch.cat([b for _, (_a, b) in parts], dim=1).T.contiguous(),
                layout=tuple((pos, a.shape[0]) for pos, (a, _b) in parts),
            )
        self._active, self._stacks = list(active), stacks
        return stacks

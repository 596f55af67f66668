"""LoRA adapters for batched serving: loading PEFT files, and one low-rank delta for a mixed batch.

Every token in a step may belong to a different adapter (or none). For each layer and group of
projections sharing an input (q/k/v, o, gate/up, down) the adapters active in the step are
concatenated once (`A_cat [R, in]` over adapters and modules, R = sum of their ranks; `B·scaling`
stacked per module) and the delta for all tokens is

    shrink = (x @ A_cat^T) * mask          # [T, R]; mask keeps only each token's own adapter's columns
    y[:, module] += shrink[:, module cols] @ B_module^T     # one GEMM per module of the group

a few small GEMMs for the whole batch whatever mix of adapters, ranks and targets it holds (the
BGMV "gather per row" done as a column mask, which CPUs prefer to per-row gathers). The baseline it
replaces is one sub-batch per adapter.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from worker.serving.cpu_kernels import SmallGemm
from worker.serving.eagle import EagleDraft, ModelShape, is_eagle
from worker.serving.errors import AdapterLoadError
from worker.serving.speculator import Speculator, has_speculator

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class AdapterWeights:
    """One loaded adapter: `(layer, module) → (A [r, in], B·scaling [out, r])`."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_model: str | None
    nbytes: int
    speculator: Speculator | EagleDraft | None = None  # a Turbo adapter's Medusa heads or draft layer

    @classmethod
    def load(
        cls,
        key: str,
        directory: Path,
        *,
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        hidden_size: int | None = None,
        model_shape: ModelShape | None = None,
        kernel: SmallGemm | None = None,
    ) -> AdapterWeights:
        speculator = None
        if has_speculator(directory) and (hidden_size is not None or model_shape is not None):
            speculator = _load_speculator(
                directory,
                hidden_size,
                model_shape,
                device=device or torch.device("cpu"),
                dtype=dtype,
                kernel=kernel,
            )
            if not (directory / "adapter_config.json").is_file():  # `turbo` on the base model: heads only
                return cls(
                    key=key, modules={}, base_model=None, nbytes=speculator.nbytes, speculator=speculator
                )
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
                a.to(device=device, dtype=dtype).contiguous(),
                (b.float() * scaling).to(device=device, dtype=dtype).contiguous(),
            )
        nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
        if speculator is not None:
            nbytes += speculator.nbytes
        return cls(
            key=key,
            modules=modules,
            base_model=config.get("base_model_name_or_path"),
            nbytes=nbytes,
            speculator=speculator,
        )


def _load_speculator(
    directory: Path,
    hidden_size: int | None,
    shape: ModelShape | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    kernel: SmallGemm | None = None,
) -> Speculator | EagleDraft:
    """The draft heads or the draft layer, as speculator_config.json's architecture says."""
    if is_eagle(directory):
        if shape is None:
            raise AdapterLoadError("this engine cannot serve eagle speculators (no model shape to check)")
        return EagleDraft.load(directory, shape=shape, device=device, dtype=dtype, kernel=kernel)
    width = hidden_size if hidden_size is not None else shape.hidden_size if shape is not None else 0
    return Speculator.load(directory, hidden_size=width, device=device, dtype=dtype)


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


# The runner fuses projections that share an input into one GEMM; LoRA follows the same groups so a
# group's adapters need one shrink GEMM, then one expand per module into its slice of the output.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
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
    """The low-rank deltas of one step: adapters stacked per group, and a column mask per token."""

    def __init__(
        self, stacks: dict[tuple[int, str], _GroupStack], token_adapter: torch.Tensor, dtype: torch.dtype
    ) -> None:
        # token_adapter: [T] long, index into the step's active adapter list, -1 = base model only.
        self.stacks = stacks
        self._token_adapter = token_adapter[:, None]
        self._dtype = dtype
        self._masks: dict[int, torch.Tensor] = {}  # keyed by the owners tensor: layers usually share one

    def apply(
        self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, offsets: dict[str, slice]
    ) -> None:
        """Adds the group's deltas for x `[T, in]` into y `[T, out]` in place, per module `offsets`."""
        stacked = self.stacks.get((layer, group))
        if stacked is None:
            return
        mask = self._masks.get(id(stacked.owners))
        if mask is None:
            mask = self._masks[id(stacked.owners)] = (self._token_adapter == stacked.owners[None, :]).to(
                self._dtype
            )
        shrink = (x @ stacked.a_cat.T).mul_(mask)  # [T, R]
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

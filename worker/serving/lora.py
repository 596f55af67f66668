"""LoRA adapters for batched serving: loading PEFT files, and one low-rank delta for a mixed batch.

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
tenant's row). And every tensor is checked finite at load, after scaling and the cast to the serving
dtype, so the expand multiplies those zeros by finite numbers only. A token's delta is therefore the
same, value for value, whichever other adapters share its step.

Loading checks a file against the rules both planes share (`tuneforge.lora_rules`) and against the
base model it will run on: names, float dtypes, shapes of the runner's real projections, rank within
the deployment's limit, literal pattern keys, finite values. Messages name the rule and the tensor,
never a path on this server.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tuneforge import lora_rules
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from worker.serving.cpu_kernels import SmallGemm
from worker.serving.eagle import EagleDraft, ModelShape, is_eagle
from worker.serving.errors import AdapterLoadError
from worker.serving.speculator import Speculator, has_speculator

log = logging.getLogger(__name__)

TARGETS = lora_rules.LORA_PROJECTIONS
# adapter_config.json is a few hundred bytes; anything this big is not one.
MAX_CONFIG_BYTES = 1 << 20
_FLOAT_DTYPES = sorted(lora_rules.FLOAT_DTYPES)


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
        module_shapes: Mapping[str, tuple[int, int]] | None = None,
        max_rank: int = lora_rules.DEFAULT_MAX_LORA_RANK,
        vocab_size: int | None = None,
    ) -> AdapterWeights:
        """Reads and checks one adapter directory; AdapterLoadError says which rule it breaks.

        `module_shapes`: `module -> (in_features, out_features)` of the base model's projections.
        """
        device = device or torch.device("cpu")
        speculator = None
        if has_speculator(directory) and (hidden_size is not None or model_shape is not None):
            speculator = _load_speculator(
                directory,
                hidden_size,
                model_shape,
                device=device,
                dtype=dtype,
                kernel=kernel,
                vocab_size=vocab_size,
            )
            if not (directory / ADAPTER_CONFIG).is_file():  # `turbo` on the base model: heads only
                return cls(
                    key=key, modules={}, base_model=None, nbytes=speculator.nbytes, speculator=speculator
                )
        config = _read_config(directory, max_rank)
        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise AdapterLoadError(
                "it has no adapter_model.safetensors; only safetensors weights are served "
                "(convert a pickle adapter_model.bin with safetensors.torch.save_file)"
            )
        pairs = _read_pairs(weights, num_layers=num_layers, shapes=module_shapes, max_rank=max_rank)
        modules = {
            (layer, module): _served_pair(config, layer, module, pair, dtype=dtype, device=device)
            for (layer, module), pair in pairs.items()
        }
        nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
        if speculator is not None:
            nbytes += speculator.nbytes
        base_model = config.get("base_model_name_or_path")
        return cls(
            key=key,
            modules=modules,
            base_model=base_model if isinstance(base_model, str) else None,
            nbytes=nbytes,
            speculator=speculator,
        )


def _served_pair(
    config: Mapping[str, Any],
    layer: int,
    module: str,
    pair: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B·scaling)` as the engine multiplies by them, checked finite in that form."""
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(f"layer {layer} {module} lacks lora_A or lora_B")
    a, b = pair["A"], pair["B"]
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise AdapterLoadError(
            f"layer {layer} {module}: lora_A has rank {rank} but lora_B has rank {b.shape[1]}"
        )
    scaling = _scaling(config, lora_rules.module_path(layer, module), rank)
    served = (
        a.to(device=device, dtype=dtype).contiguous(),
        (b.float() * scaling).to(device=device, dtype=dtype).contiguous(),
    )
    for which, tensor in zip("AB", served, strict=True):
        _check_finite(tensor, f"layer {layer} {module} lora_{which}")
    return served


def _read_pairs(
    weights: Path, *, num_layers: int, shapes: Mapping[str, tuple[int, int]] | None, max_rank: int
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Every lora_A / lora_B tensor by (layer, module), each checked (name, dtype, shape) before its
    data is read."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                parsed = lora_rules.parse_weight_name(name)
                if parsed is None:
                    raise AdapterLoadError(f"weight {name[:200]} is not a LoRA projection we serve")
                layer, module, which = parsed
                tensor_slice = f.get_slice(name)
                stored = tensor_slice.get_dtype()
                if stored not in lora_rules.FLOAT_DTYPES:
                    raise AdapterLoadError(
                        f"{name}: dtype {stored} is not a float type ({', '.join(_FLOAT_DTYPES)})"
                    )
                lora_rules.check_tensor_shape(
                    name,
                    list(tensor_slice.get_shape()),
                    which=which,
                    module=module,
                    layer=layer,
                    num_layers=num_layers,
                    shapes=shapes,
                    max_rank=max_rank,
                )
                pair = pairs.setdefault((layer, module), {})
                if which in pair:
                    raise AdapterLoadError(f"{name}: layer {layer} {module} has two lora_{which} tensors")
                pair[which] = f.get_tensor(name)
    except lora_rules.AdapterRuleError as exc:
        raise AdapterLoadError(str(exc)) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # corrupt or truncated file
        log.warning("adapter_model.safetensors at %s cannot be read: %s", weights, exc)
        raise AdapterLoadError("adapter_model.safetensors is not a readable safetensors file") from None
    return pairs


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterLoadError(
            f"{what} holds NaN or infinite values (after scaling by lora_alpha / r and the cast to "
            f"{str(tensor.dtype).removeprefix('torch.')}); such an adapter would only produce NaN"
        )


def _load_speculator(
    directory: Path,
    hidden_size: int | None,
    shape: ModelShape | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    kernel: SmallGemm | None = None,
    vocab_size: int | None = None,
) -> Speculator | EagleDraft:
    """The draft heads or the draft layer, as speculator_config.json's architecture says."""
    if is_eagle(directory):
        if shape is None:
            raise AdapterLoadError("this engine cannot serve eagle speculators (no model shape to check)")
        return EagleDraft.load(
            directory, shape=shape, device=device, dtype=dtype, kernel=kernel, vocab_size=vocab_size
        )
    width = hidden_size if hidden_size is not None else shape.hidden_size if shape is not None else 0
    return Speculator.load(directory, hidden_size=width, device=device, dtype=dtype, vocab_size=vocab_size)


def _read_config(directory: Path, max_rank: int) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterLoadError(f"adapter_config.json is over {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        raise AdapterLoadError("adapter_config.json is missing or not JSON") from None
    if not isinstance(config, dict):
        raise AdapterLoadError("adapter_config.json is not a JSON object")
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters are not served yet: train with adapter='lora' to serve it here")
    if config.get("modules_to_save"):
        raise AdapterLoadError("adapters with modules_to_save cannot share a batched base model")
    try:
        lora_rules.check_config(config, max_rank=max_rank)
    except lora_rules.AdapterRuleError as exc:
        raise AdapterLoadError(f"adapter_config.json: {exc}") from None
    return config


def _scaling(config: Mapping[str, Any], module_path: str, rank: int) -> float:
    """lora_alpha (or its alpha_pattern entry, matched as a literal module-path suffix) over r."""
    alpha = lora_rules.pattern_value(
        config.get("alpha_pattern") or {}, module_path, float(config.get("lora_alpha") or 8)
    )
    if config.get("use_rslora"):
        return float(alpha / math.sqrt(rank))
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

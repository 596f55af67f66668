"""Loading one adapter directory: its LoRA (PEFT files) and, for a Turbo adapter, its speculator.

Loading checks a file against the rules both planes share (`tuneforge.lora_rules`) and against the
base model it will run on: names, float dtypes, shapes of the runner's real projections, rank within
the deployment's limit, literal pattern keys, finite values. Messages name the rule and the tensor,
never a path on this server. A speculator is loaded by the kind its speculator_config.json names
(`DRAFT_KINDS`): a new draft kind is a module with a loader registered there.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tuneforge import lora_rules
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS, ArtifactManifest
from tuneforge.rules.speculator import SpeculatorConfig

from worker.serving.classifier import load_head
from worker.serving.cpu_kernels import SmallGemm
from worker.serving.draft_model import DraftModel
from worker.serving.eagle import EAGLE_ARCHITECTURE, EagleDraft, ModelShape
from worker.serving.errors import AdapterLoadError
from worker.serving.lora import AdapterWeights
from worker.serving.speculator import (
    MAX_CONFIG_BYTES,
    SUPPORTED_ARCHITECTURE,
    Speculator,
    read_speculator_files,
)

log = logging.getLogger(__name__)

_FLOAT_DTYPES = sorted(lora_rules.FLOAT_DTYPES)


@dataclass(frozen=True)
class LoadShape:
    """What a loaded adapter must fit: the base model's shapes, the serving dtype and the rank limit."""

    num_layers: int
    dtype: torch.dtype
    device: torch.device
    hidden_size: int | None = None
    model_shape: ModelShape | None = None  # for eagle draft layers
    kernel: SmallGemm | None = None  # the runner's small-step kernel, for eagle draft layers
    module_shapes: Mapping[str, tuple[int, int]] | None = None  # module -> (in, out) of the runner
    max_rank: int = lora_rules.DEFAULT_MAX_LORA_RANK
    vocab_size: int | None = None
    # Why this base model takes no eagle draft layer (a Llama layer fed raw token embeddings), if not.
    eagle_refusal: str | None = None


def load_adapter(key: str, directory: Path, shape: LoadShape) -> AdapterWeights:
    """Reads and checks one adapter directory; AdapterLoadError says which rule it breaks."""
    speculator = None
    files = ArtifactManifest.of_directory(directory)
    if files.has_speculator and (shape.hidden_size is not None or shape.model_shape is not None):
        speculator = load_draft_model(directory, shape)
        if not files.has_lora_config:  # `turbo` on the base model: heads only
            return AdapterWeights(
                key=key, modules={}, base_model=None, nbytes=speculator.nbytes, speculator=speculator
            )
    config = _read_config(directory, shape.max_rank)
    modules = _read_lora(directory, config, shape)
    nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
    if speculator is not None:
        nbytes += speculator.nbytes
    classifier = None
    if lora_rules.is_classifier(config):
        classifier = load_head(directory, config, hidden_size=shape.hidden_size, device=shape.device)
        nbytes += classifier.nbytes
    base_model = config.get("base_model_name_or_path")
    return AdapterWeights(
        key=key,
        modules=modules,
        base_model=base_model if isinstance(base_model, str) else None,
        nbytes=nbytes,
        speculator=speculator,
        classifier=classifier,
    )


def adapter_from_state(
    key: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], shape: LoadShape
) -> AdapterWeights:
    """A LoRA held in memory (a PEFT adapter config and its state dict, as `get_peft_model_state_dict`
    names the tensors), checked by the same rules as one read from files: a trainer's current weights."""
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters are not served yet: train with adapter='lora' to serve it here")
    try:
        lora_rules.check_config(config, max_rank=shape.max_rank)
    except lora_rules.AdapterRuleError as exc:
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: {exc}") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        for name, tensor in state.items():
            parsed = lora_rules.parse_weight_name(name)
            if parsed is None:
                raise AdapterLoadError(f"weight {name[:200]} is not a LoRA projection we serve")
            layer, module, which = parsed
            lora_rules.check_tensor_shape(
                name,
                tuple(tensor.shape),
                which=which,
                module=module,
                layer=layer,
                num_layers=shape.num_layers,
                shapes=shape.module_shapes,
                max_rank=shape.max_rank,
            )
            pairs.setdefault((layer, module), {})[which] = tensor.detach()
    except lora_rules.AdapterRuleError as exc:
        raise AdapterLoadError(str(exc)) from None
    modules = {
        (layer, module): _served_pair(config, layer, module, pair, dtype=shape.dtype, device=shape.device)
        for (layer, module), pair in pairs.items()
    }
    nbytes = sum(a.nbytes + b.nbytes for a, b in modules.values())
    return AdapterWeights(key=key, modules=modules, base_model=None, nbytes=nbytes)


# --- speculators ------------------------------------------------------------------------------------

DraftLoader = Callable[[SpeculatorConfig, dict[str, torch.Tensor], LoadShape], DraftModel]


def _load_medusa(config: SpeculatorConfig, state: dict[str, torch.Tensor], shape: LoadShape) -> DraftModel:
    model = shape.model_shape
    width = (
        shape.hidden_size if shape.hidden_size is not None else model.hidden_size if model is not None else 0
    )
    return Speculator.from_files(
        config, state, hidden_size=width, device=shape.device, dtype=shape.dtype, vocab_size=shape.vocab_size
    )


def _load_eagle(config: SpeculatorConfig, state: dict[str, torch.Tensor], shape: LoadShape) -> DraftModel:
    if shape.model_shape is None:
        raise AdapterLoadError("this engine cannot serve eagle speculators (no model shape to check)")
    if shape.eagle_refusal is not None:
        raise AdapterLoadError(shape.eagle_refusal)
    return EagleDraft.from_files(
        config,
        state,
        shape=shape.model_shape,
        device=shape.device,
        dtype=shape.dtype,
        kernel=shape.kernel,
        vocab_size=shape.vocab_size,
    )


# Speculator kinds by the architecture speculator_config.json names.
DRAFT_KINDS: dict[str, DraftLoader] = {
    SUPPORTED_ARCHITECTURE: _load_medusa,
    EAGLE_ARCHITECTURE: _load_eagle,
}


def load_draft_model(directory: Path, shape: LoadShape) -> DraftModel:
    """The adapter's speculator, loaded by the kind its config names: the schema admits only the kinds
    this release knows, and a config that does not validate refuses the load, naming the field."""
    config, state = read_speculator_files(directory)
    return DRAFT_KINDS[config.architecture](config, state, shape)


# --- LoRA ------------------------------------------------------------------------------------------


def _read_lora(
    directory: Path, config: Mapping[str, Any], shape: LoadShape
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """`(layer, module) → (A, B·scaling)` from adapter_model.safetensors, as the engine multiplies."""
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterLoadError(
            f"it has no {ADAPTER_WEIGHTS}; only safetensors weights are served "
            f"(convert a pickle {PICKLED_WEIGHTS} with safetensors.torch.save_file)"
        )
    pairs = _read_pairs(
        weights,
        num_layers=shape.num_layers,
        shapes=shape.module_shapes,
        max_rank=shape.max_rank,
        skip_head=lora_rules.is_classifier(config),
    )
    return {
        (layer, module): _served_pair(config, layer, module, pair, dtype=shape.dtype, device=shape.device)
        for (layer, module), pair in pairs.items()
    }


def _read_config(directory: Path, max_rank: int) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterLoadError(f"{ADAPTER_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        raise AdapterLoadError(f"{ADAPTER_CONFIG} is missing or not JSON") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters are not served yet: train with adapter='lora' to serve it here")
    # A classification adapter's saved module is its own head (checked by lora_rules); any other whole
    # module would replace a part of the base that every adapter in a batch shares.
    if config.get("modules_to_save") and not lora_rules.is_classifier(config):
        raise AdapterLoadError("adapters with modules_to_save cannot share a batched base model")
    try:
        lora_rules.check_config(config, max_rank=max_rank)
    except lora_rules.AdapterRuleError as exc:
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: {exc}") from None
    return config


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
    weights: Path,
    *,
    num_layers: int,
    shapes: Mapping[str, tuple[int, int]] | None,
    max_rank: int,
    skip_head: bool = False,
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Every lora_A / lora_B tensor by (layer, module), each checked (name, dtype, shape) before its
    data is read; `skip_head`: a classification adapter's head weight is read by classifier.load_head."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if skip_head and lora_rules.is_head_weight(name):
                    continue
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
        log.warning(f"{ADAPTER_WEIGHTS} at %s cannot be read: %s", weights, exc)
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS} is not a readable safetensors file") from None
    return pairs


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterLoadError(
            f"{what} holds NaN or infinite values (after scaling by lora_alpha / r and the cast to "
            f"{str(tensor.dtype).removeprefix('torch.')}); such an adapter would only produce NaN"
        )


def _scaling(config: Mapping[str, Any], module_path: str, rank: int) -> float:
    """lora_alpha (or its alpha_pattern entry, matched as a literal module-path suffix) over r."""
    alpha = lora_rules.pattern_value(
        config.get("alpha_pattern") or {}, module_path, float(config.get("lora_alpha") or 8)
    )
    if config.get("use_rslora"):
        return float(alpha / math.sqrt(rank))
    return alpha / rank

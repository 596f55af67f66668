"""What differs between the model families the serving engine runs, read once from an HF config.

The runner's forward pass is one Llama-shaped loop; each family's departures from it are data here:
Qwen3 and Gemma3 normalise q and k per head before RoPE; Gemma2/3 scale the embeddings by
sqrt(hidden), store RMSNorm weights as an offset from 1, wrap attention and the MLP in a second pair
of norms, gate with GELU-tanh, soft-cap logits and scale queries by `query_pre_attn_scalar`; Gemma3's
local layers rotate with their own RoPE base; Mistral, Phi3 and the Gemmas (and Qwen with
`use_sliding_window`) restrict some or all layers to a sliding window; Phi3 stores q/k/v and gate/up
already fused. Anything the engine cannot run exactly is refused here, naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tuneforge.rules.base_models import EAGLE_MODEL_TYPES, SERVED_MODEL_TYPES

GEMMA_FAMILIES = frozenset({"gemma2", "gemma3_text"})
# Families whose checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.
FUSED_CHECKPOINT_FAMILIES = frozenset({"phi3"})
# Families an eagle draft layer serves on (why only these: see the rule).
EAGLE_FAMILIES = frozenset(EAGLE_MODEL_TYPES)

# HF activation names (ACT2FN) → the function the gated MLP applies to its gate.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
# RoPE variants whose frequencies HF recomputes from the running sequence length: one table built up
# front would rotate short prompts with the long-context frequencies.
DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope", "su"})
LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


class UnsupportedModelError(ValueError):
    """A model the serving engine cannot run exactly; the message names the field and what is served."""


@dataclass(frozen=True)
class Architecture:
    """One family's departures from the Llama forward pass, per model and per layer."""

    model_type: str
    query_scale: float  # multiplies q·k
    embed_scale: float | None  # Gemma: sqrt(hidden_size)
    norm_offset: float  # Gemma stores RMSNorm weights w and multiplies by 1 + w
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma3)
    sandwich_norms: bool  # Gemma: attention and MLP outputs are normed before the residual add
    activation: Callable[[torch.Tensor], torch.Tensor]
    attn_softcap: float | None  # Gemma2: scores ← cap·tanh(scores / cap)
    final_softcap: float | None  # Gemma2: logits ← cap·tanh(logits / cap)
    fused_checkpoint: bool  # Phi3: qkv_proj / gate_up_proj already fused
    windows: tuple[int | None, ...]  # per layer: keys within this many positions (itself included)
    rope_keys: tuple[str | None, ...]  # per layer: which RoPE table (Gemma3 layer types), None = one

    @property
    def eagle_refusal(self) -> str | None:
        """Why an eagle draft layer is refused on this model, or None where it is served."""
        if self.model_type in EAGLE_FAMILIES:
            return None
        return (
            f"eagle speculators are served on {', '.join(sorted(EAGLE_FAMILIES))} models, not "
            f"{self.model_type}: train a Medusa speculator (speculator_architecture='medusa') instead"
        )


def read_architecture(config: Any) -> Architecture:
    """The family's forward-pass details from an HF config; UnsupportedModelError for what is not run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SERVED_MODEL_TYPES:
        hint = " (serve its text model, model_type 'gemma3_text')" if model_type == "gemma3" else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not served{hint}; the serving engine runs "
            f"{', '.join(SERVED_MODEL_TYPES)} models"
        )
    gemma = model_type in GEMMA_FAMILIES
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("use_bidirectional_attention: only causal (decoder) models are served")
    num_layers = int(config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    _check_rope(config)
    return Architecture(
        model_type=model_type,
        query_scale=float(config.query_pre_attn_scalar) ** -0.5 if gemma else head_dim**-0.5,
        embed_scale=float(config.hidden_size) ** 0.5 if gemma else None,
        norm_offset=1.0 if gemma else 0.0,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        sandwich_norms=gemma,
        activation=_activation(config, gemma),
        attn_softcap=_softcap(config, "attn_logit_softcapping"),
        final_softcap=_softcap(config, "final_logit_softcapping"),
        fused_checkpoint=model_type in FUSED_CHECKPOINT_FAMILIES,
        windows=_windows(config, num_layers),
        rope_keys=_rope_keys(config, model_type, num_layers),
    )


def _activation(config: Any, gemma: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    # Gemma's MLP reads `hidden_activation`; its `hidden_act` is a leftover HF keeps for old configs.
    field = "hidden_activation" if gemma else "hidden_act"
    name = getattr(config, field, None) or "silu"
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{field}={name!r}: the serving engine runs {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _softcap(config: Any, field: str) -> float | None:
    value = getattr(config, field, None)
    if value is None:
        return None
    if not isinstance(value, int | float) or value <= 0:
        raise UnsupportedModelError(f"{field}={value!r} is not a positive number")
    return float(value)


def _windows(config: Any, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window: `layer_types` where the config has them, else every layer's (Mistral,
    Phi3: `sliding_window` applies to all layers when set)."""
    window = getattr(config, "sliding_window", None)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UnsupportedModelError(f"sliding_window={window!r} is not a positive integer")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window,) * num_layers
    layer_types = list(layer_types)[:num_layers]
    unknown = sorted(set(layer_types) - LAYER_TYPES)
    if unknown or len(layer_types) != num_layers:
        raise UnsupportedModelError(
            f"layer_types {unknown or layer_types}: the serving engine runs {sorted(LAYER_TYPES)}, "
            "one per layer"
        )
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _rope_keys(config: Any, model_type: str, num_layers: int) -> tuple[str | None, ...]:
    # Gemma3 rotates local and global layers with different bases: one table per layer type.
    if model_type == "gemma3_text":
        return tuple(config.layer_types[:num_layers])
    return (None,) * num_layers


def _rope_parameters(config: Any) -> Iterable[dict[str, Any]]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [value for value in params.values() if isinstance(value, dict)]
    return nested or [params]


def _check_rope(config: Any) -> None:
    for params in _rope_parameters(config):
        kind = params.get("rope_type") or params.get("type")
        if kind in DYNAMIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_parameters.rope_type={kind!r} changes RoPE frequencies with the sequence length, "
                "which the serving engine does not do (its 128k Phi-3 variants use it); serve a "
                "checkpoint with static RoPE (default, linear, llama3, yarn)"
            )

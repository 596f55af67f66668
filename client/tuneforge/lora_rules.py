"""What a servable LoRA adapter is: tensor names, projection shapes, pattern keys and rank limits.

Both planes check adapters with these rules: the control plane when a tenant uploads one, the serving
engine again when it loads one (a stored file may predate a rule, or come from a training run). They
live here, beside `FinetuningConfig`, so the two checks cannot drift apart. Pure Python, no torch.

Pattern keys (`rank_pattern`, `alpha_pattern`) are matched as *literal* module-path suffixes, never
as regexes: peft compiles them into regexes, so a hostile key such as `(.+)+!` would make a loader
backtrack for hours. Two spellings are accepted: a suffix at a dot boundary (`q_proj`,
`layers.3.self_attn.q_proj`), and the anchored, escaped full path that peft and tuneforge's
automatic rank selection write (`^model\\.layers\\.3\\.self_attn\\.q_proj`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from tuneforge.rules.artifacts import ADAPTER_CONFIG, CLASSIFIER_LABELS
from tuneforge.rules.classifier import MAX_LABELS

# The projections of a decoder layer a served LoRA may target, and the block each sits in. Phi3 keeps
# q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`); the other served families keep them apart.
PROJECTION_PARENTS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "qkv_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "gate_up_proj": "mlp",
    "down_proj": "mlp",
}
# Model types (HF config.json `model_type`) whose checkpoints hold the fused projections.
FUSED_PROJECTION_MODEL_TYPES = frozenset({"phi3"})
LORA_PROJECTIONS = tuple(PROJECTION_PARENTS)

# A rank far above what anyone trains (Predibase caps at 128, LLaMA-Factory's examples use <= 64); an
# adapter over it is refused before its tensors are read. Deployments may lower it.
DEFAULT_MAX_LORA_RANK = 512
# Pattern keys longer than this are not module paths.
MAX_PATTERN_KEY_LENGTH = 512
MAX_PATTERN_ENTRIES = 4096
# Floating-point dtypes a LoRA tensor may be stored in (safetensors spellings).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# peft's tensor names: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (prefixes vary).
_WEIGHT_NAME = re.compile(
    r"(?:^|\.)layers\.(\d{1,6})\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|qkv_proj|o_proj|gate_proj|up_proj|gate_up_proj|down_proj)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)
# A classification adapter's head (peft task_type SEQ_CLS, modules_to_save `score`), as peft saves it:
# `base_model.model.score.weight`, [labels, hidden].
_HEAD_NAME = re.compile(r"(?:^|\.)score\.weight$")
CLASSIFICATION_TASK_TYPE = "SEQ_CLS"
CLASSIFICATION_HEAD_MODULES = frozenset({"score", "classifier"})  # peft lists both for SEQ_CLS
# Characters that have a meaning in a regex; in a literal key they must be escaped with a backslash.
_REGEX_SYNTAX = frozenset("()[]{}?*+|$^\\")


class AdapterRuleError(ValueError):
    """An adapter breaks a rule; `field` names the config key or tensor it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_weight_name(name: str) -> tuple[int, str, str] | None:
    """`...layers.3.self_attn.q_proj.lora_A.weight` → `(3, "q_proj", "A")`; None for anything else."""
    match = _WEIGHT_NAME.search(name)
    if match is None:
        return None
    layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
    if PROJECTION_PARENTS[module] != parent:
        return None
    return layer, module, which


def module_path(layer: int, module: str) -> str:
    """The module's name on the model peft wraps: `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{PROJECTION_PARENTS[module]}.{module}"


def literal_pattern_key(key: str) -> tuple[bool, str]:
    """`(anchored, path)` of a pattern key; AdapterRuleError if it is anything but a literal path.

    `^` at the start anchors the key to the whole path; inside, a backslash escapes the next character
    (peft writes `re.escape`d paths); any unescaped regex syntax is refused.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_PATTERN_KEY_LENGTH:
        raise AdapterRuleError("pattern key", f"{str(key)[:80]!r} is not a module path")
    anchored = key.startswith("^")
    body = key[1:] if anchored else key
    path: list[str] = []
    escaped = False
    for char in body:
        if escaped:
            path.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in _REGEX_SYNTAX:
            raise AdapterRuleError(
                "pattern key",
                f"{key[:80]!r} is a regular expression; keys are matched as literal module-name "
                "suffixes (e.g. 'q_proj' or 'model.layers.3.self_attn.q_proj')",
            )
        else:
            path.append(char)
    if escaped or not path:
        raise AdapterRuleError("pattern key", f"{key[:80]!r} is not a module path")
    return anchored, "".join(path)


def pattern_matches(key: str, path: str) -> bool:
    """Whether a (literal) pattern key names this module path: the whole path when anchored, else a
    suffix of it at a dot boundary."""
    anchored, literal = literal_pattern_key(key)
    if anchored:
        return path == literal
    return path == literal or path.endswith("." + literal)


def pattern_value(patterns: Mapping[str, Any], path: str, default: float) -> float:
    """The value of the first key naming `path` (peft's order: dict order), else `default`."""
    for key, value in patterns.items():
        if pattern_matches(key, path):
            return float(value)
    return default


def check_patterns(config: Mapping[str, Any], *, max_rank: int) -> None:
    """`rank_pattern` / `alpha_pattern` are literal keys with finite values (ranks within `max_rank`)."""
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, Mapping):
            raise AdapterRuleError(field, "must be an object of module path -> number")
        if len(patterns) > MAX_PATTERN_ENTRIES:
            raise AdapterRuleError(field, f"has {len(patterns)} keys; at most {MAX_PATTERN_ENTRIES}")
        for key, value in patterns.items():
            try:
                literal_pattern_key(key)
            except AdapterRuleError as exc:
                raise AdapterRuleError(field, exc.message) from None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise AdapterRuleError(field, f"{key[:80]!r} maps to {value!r}, not a finite number")
            if field == "rank_pattern" and not 1 <= value <= max_rank:
                raise AdapterRuleError(field, f"{key[:80]!r} asks for rank {value}; ranks are 1..{max_rank}")


def check_config(config: Mapping[str, Any], *, max_rank: int = DEFAULT_MAX_LORA_RANK) -> None:
    """The adapter_config.json rules that need no tensors: a LoRA, servable options, sane numbers."""
    if config.get("peft_type") != "LORA":
        got = config.get("peft_type")
        raise AdapterRuleError("peft_type", f"only LoRA adapters are served (got {got!r})")
    rank = config.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise AdapterRuleError("r", f"{rank!r} is not a rank in 1..{max_rank}")
    alpha = config.get("lora_alpha", 8)
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha)
    ):
        raise AdapterRuleError("lora_alpha", f"{alpha!r} is not a finite number")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterRuleError(
            "target_modules", "a regex string is not accepted; list the projection names instead"
        )
    if targets is not None:
        if not isinstance(targets, list | tuple):
            raise AdapterRuleError("target_modules", "must be a list of projection names")
        unknown = sorted({str(t) for t in targets} - set(LORA_PROJECTIONS))
        if unknown:
            known = ", ".join(LORA_PROJECTIONS)
            raise AdapterRuleError("target_modules", f"{unknown[:5]} are not projections we serve ({known})")
    check_patterns(config, max_rank=max_rank)
    _check_task_type(config)


def is_classifier(config: Mapping[str, Any]) -> bool:
    """Whether an adapter config is a classification adapter (a LoRA plus a `score` head)."""
    return config.get("task_type") == CLASSIFICATION_TASK_TYPE


def is_head_weight(name: str) -> bool:
    """Whether a tensor name is a classification adapter's head weight (`...score.weight`)."""
    return _HEAD_NAME.search(name) is not None


def _check_task_type(config: Mapping[str, Any]) -> None:
    saved = config.get("modules_to_save")
    if not is_classifier(config):
        return
    if not isinstance(saved, list | tuple) or not set(map(str, saved)) <= CLASSIFICATION_HEAD_MODULES:
        raise AdapterRuleError(
            "modules_to_save",
            f"a {CLASSIFICATION_TASK_TYPE} adapter saves only its head "
            f"({sorted(CLASSIFICATION_HEAD_MODULES)})",
        )


def check_head_shape(
    name: str, shape: list[int] | tuple[int, ...], model_config: Mapping[str, Any] | None
) -> int:
    """A classification head's weight is [labels, hidden]; returns its label count."""
    if len(shape) != 2 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise AdapterRuleError(name, f"shape {list(shape)} is not a 2-d matrix")
    labels, hidden = shape
    if not 2 <= labels <= MAX_LABELS:
        raise AdapterRuleError(name, f"has {labels} labels; a classification head has 2..{MAX_LABELS}")
    if model_config is not None and hidden != int(model_config["hidden_size"]):
        raise AdapterRuleError(
            name,
            f"shape {list(shape)} does not fit the base model's hidden size {model_config['hidden_size']}",
        )
    return int(labels)


def projection_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """`module -> (in_features, out_features)` of the projections an HF config.json's decoder layers
    have: Llama-style separate ones, or Phi3's fused `qkv_proj` / `gate_up_proj`."""
    hidden = int(model_config["hidden_size"])
    heads = int(model_config["num_attention_heads"])
    kv_heads = int(model_config.get("num_key_value_heads") or heads)
    head_dim = int(model_config.get("head_dim") or hidden // heads)
    intermediate = int(model_config["intermediate_size"])
    if model_config.get("model_type") in FUSED_PROJECTION_MODEL_TYPES:
        return {
            "qkv_proj": (hidden, (heads + 2 * kv_heads) * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_up_proj": (hidden, 2 * intermediate),
            "down_proj": (intermediate, hidden),
        }
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def check_tensor_shape(
    name: str,
    shape: list[int] | tuple[int, ...],
    *,
    which: str,
    module: str,
    layer: int,
    num_layers: int | None,
    shapes: Mapping[str, tuple[int, int]] | None,
    max_rank: int,
) -> int:
    """Checks one lora_A / lora_B tensor against the base model; returns its rank."""
    if num_layers is not None and layer >= num_layers:
        raise AdapterRuleError(name, f"layer {layer} does not exist (the base model has {num_layers} layers)")
    if len(shape) != 2 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise AdapterRuleError(name, f"shape {list(shape)} is not a 2-d matrix")
    rank = shape[0] if which == "A" else shape[1]
    if rank > max_rank:
        raise AdapterRuleError(name, f"rank {rank} is over the limit of {max_rank}")
    if shapes is not None:
        if module not in shapes:
            raise AdapterRuleError(
                name, f"the base model has no {module}; its layers' projections are {', '.join(shapes)}"
            )
        in_features, out_features = shapes[module]
        wide = shape[1] if which == "A" else shape[0]
        expected = in_features if which == "A" else out_features
        if wide != expected:
            side = "input" if which == "A" else "output"
            raise AdapterRuleError(
                name,
                f"shape {list(shape)} does not fit {module}: its {side} has {expected} features, not {wide}",
            )
    return int(rank)


def model_layers(model_config: Mapping[str, Any]) -> int:
    """How many decoder layers a Llama-style HF config.json describes."""
    return int(model_config["num_hidden_layers"])


def check_tensors(
    tensors: Mapping[str, tuple[str, list[int] | tuple[int, ...]]],
    config: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any] | None = None,
    max_rank: int = DEFAULT_MAX_LORA_RANK,
) -> dict[str, int]:
    """A whole weights file's tensor table (`name -> (safetensors dtype, shape)`) against its config.

    Every tensor is the lora_A or lora_B of a projection we serve (in `target_modules`, when the
    config lists them), floating point and 2-d; A and B come in pairs of one rank, the rank the
    config gives that module (`r`, or its `rank_pattern` entry), at most `max_rank`. With the base
    model's `model_config` also the layer index and the projection's features are checked; without
    it (the base model is not known here) those wait for load time. Returns `module path -> rank`.
    """
    shapes = projection_shapes(model_config) if model_config is not None else None
    num_layers = model_layers(model_config) if model_config is not None else None
    targets = config.get("target_modules")
    allowed = {str(t) for t in targets} if isinstance(targets, list | tuple) else None
    pairs: dict[tuple[int, str], dict[str, int]] = {}
    heads = 0
    for name, (dtype, shape) in tensors.items():
        if is_classifier(config) and is_head_weight(name):
            if dtype not in FLOAT_DTYPES:
                raise AdapterRuleError(name, f"dtype {dtype}; weights are {', '.join(sorted(FLOAT_DTYPES))}")
            check_head_shape(name, shape, model_config)
            heads += 1
            continue
        parsed = parse_weight_name(name)
        if parsed is None:
            raise AdapterRuleError(
                name,
                "is not the lora_A or lora_B weight of a projection we serve ("
                + ", ".join(LORA_PROJECTIONS)
                + ")",
            )
        layer, module, which = parsed
        if dtype not in FLOAT_DTYPES:
            raise AdapterRuleError(name, f"dtype {dtype}; LoRA weights are {', '.join(sorted(FLOAT_DTYPES))}")
        if allowed is not None and module not in allowed:
            raise AdapterRuleError(name, f"{module} is not among target_modules {sorted(allowed)}")
        rank = check_tensor_shape(
            name, shape, which=which, module=module, layer=layer, num_layers=num_layers, shapes=shapes,
            max_rank=max_rank,
        )  # fmt: skip
        side = pairs.setdefault((layer, module), {})
        if which in side:
            raise AdapterRuleError(name, f"a second lora_{which} weight for {module_path(layer, module)}")
        side[which] = rank
    if is_classifier(config) and heads != 1:
        raise AdapterRuleError(
            "score.weight", f"a classification adapter holds one head weight, beside {CLASSIFIER_LABELS}"
        )
    return {
        module_path(layer, module): _pair_rank(layer, module, side, config)
        for (layer, module), side in pairs.items()
    }


def _pair_rank(layer: int, module: str, side: Mapping[str, int], config: Mapping[str, Any]) -> int:
    path = module_path(layer, module)
    for which, other in (("A", "B"), ("B", "A")):
        if which not in side:
            raise AdapterRuleError(path, f"has lora_{other} but no lora_{which}; LoRA weights come in pairs")
    if side["A"] != side["B"]:
        raise AdapterRuleError(path, f"lora_A has rank {side['A']} but lora_B has rank {side['B']}")
    expected = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
    if side["A"] != expected:
        raise AdapterRuleError(
            path, f"its weights have rank {side['A']}, but {ADAPTER_CONFIG} gives it rank {expected:g} "
            "(r, or its rank_pattern entry)"
        )  # fmt: skip
    return side["A"]

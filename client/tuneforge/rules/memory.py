"""Peak training memory of one run on one device, from the base model's config.json and its FinetuningConfig.

The control plane places a job on a worker class with it before any worker loads the model, so it is
pure arithmetic over the HF config (stdlib + pydantic). It follows what `worker/training` does:

- lora / dora / turbo_lora / turbo: a frozen base in the compute dtype (or 4/8-bit, bitsandbytes),
  fp32 adapter weights (PEFT upcasts them) and fp32 speculator heads;
- full / last_layer: fp32 master weights computing under autocast in the half dtype, which keeps a
  half copy of every trainable linear weight a forward used until the backward has read it (DoRA
  keeps an fp32 copy of each adapted weight);
- AdamW keeps two fp32 moments per trainable parameter (adamw_8bit: one byte each), every trainable
  parameter has an fp32 gradient;
- only positions that take a loss reach the LM head, whose logits are cast to fp32 for the loss.

Activations assume the worst packed micro-batch: micro_batch_size rows of max_seq_length tokens.
Attention is SDPA/flash-style (no [S, S] score matrix is kept). Every number is bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tuneforge.config import (
    DEFAULT_TARGET_MODULES,
    FROZEN_BASE_ADAPTERS,
    LOW_RANK_ADAPTERS,
    TURBO_ADAPTERS,
    FinetuningConfig,
)

Device = Literal["cuda", "cpu"]
GIB = 1024**3
# The worker's default context when max_seq_length is unset: min(the model's context, this).
DEFAULT_MAX_SEQ_LENGTH = 2048
# A rank 'auto' run picks each module's rank in 4..64 (worker/training/autoconfig.py); plan for the top.
AUTO_RANK_CEILING = 64
# An eagle draft chooses among at most this many tokens (worker/training/speculator.py's DRAFT_VOCAB_SIZE).
DRAFT_VOCAB_SIZE = 8192
# CUDA context, cuBLAS/cuDNN workspaces and allocator slack a process holds beyond its tensors.
CUDA_RUNTIME_BYTES = 1.5 * GIB
# On a CPU worker the interpreter and libraries are loaded before a run starts; tensors are all that grows.
CPU_RUNTIME_BYTES = 0.0
# nf4 (QLoRA): 4 bits a weight, plus double-quantised absmax: 1 byte per block of 64 weights and an
# fp32 scale per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# A config.json's torch_dtype, for a frozen base in 'auto' on a device without a half dtype.
_CONFIG_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelShapeError(ValueError):
    """A config.json that does not describe a Llama-style decoder this estimate can size."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM...) that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q, k, v; Llama's attention_bias puts one on o too
    o_bias: bool
    mlp_bias: bool
    context: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """ModelShapeError naming the key when config.json lacks one or holds a non-positive size."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                vocab=int(config["vocab_size"]),
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
                o_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                context=int(config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LENGTH),
            )
        except KeyError as exc:
            raise ModelShapeError(f"config.json has no {exc.args[0]!r}: not a Llama-style decoder") from None
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ModelShapeError(f"config.json has a size that is not a positive integer: {exc}") from None
        sizes = (shape.vocab, shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim)
        if min(*sizes, shape.intermediate) < 1:
            raise ModelShapeError("config.json has a size that is not a positive integer")
        return shape

    def projections(self) -> dict[str, tuple[int, int]]:
        """`module -> (in_features, out_features)` of one decoder layer's linear maps."""
        q, kv, h, i = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.hidden,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        """Weights of one layer's linear maps (what bitsandbytes quantises)."""
        return sum(n_in * n_out for n_in, n_out in self.projections().values())

    def layer_params(self) -> int:
        """Every parameter of one decoder layer: linear weights, biases and its two RMSNorm gains."""
        shapes = self.projections()
        biases = 0
        if self.qkv_bias:
            biases += sum(shapes[name][1] for name in ("q_proj", "k_proj", "v_proj"))
        if self.o_bias:
            biases += shapes["o_proj"][1]
        if self.mlp_bias:
            biases += sum(shapes[name][1] for name in ("gate_proj", "up_proj", "down_proj"))
        return self.layer_linear_params() + biases + 2 * self.hidden

    def parameter_counts(self) -> dict[str, int]:
        """What `sum(p.numel() for p in model.parameters())` adds up, by part (a tied head counts once)."""
        embeddings = self.vocab * self.hidden
        return {
            "embeddings": embeddings,
            "layers": self.layers * self.layer_params(),
            "final_norm": self.hidden,
            "lm_head": 0 if self.tied_embeddings else embeddings,
        }

    def total_params(self) -> int:
        return sum(self.parameter_counts().values())


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on one device, by part; `total` is their sum."""

    parts: dict[str, int]
    gradient_checkpointing: bool
    compute_dtype: str

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "total_gib": round(self.total / GIB, 2),
            "parts": dict(self.parts),
            "gradient_checkpointing": self.gradient_checkpointing,
            "compute_dtype": self.compute_dtype,
        }


@dataclass(frozen=True)
class Fit:
    """Whether a run fits `available` bytes per device as configured, and with gradient checkpointing."""

    fits: bool
    fits_with_checkpointing: bool
    estimate: MemoryEstimate  # as configured
    checkpointed: MemoryEstimate  # with gradient checkpointing on (the same one when it already is)

    @property
    def needs_checkpointing(self) -> bool:
        return not self.fits and self.fits_with_checkpointing


def compute_dtype(config: FinetuningConfig, device: Device) -> str:
    """The dtype a worker of this device computes in: 'auto' is bf16 on a GPU; a CPU's half support is
    unknown before it runs, so plan for fp32 there (the larger)."""
    if config.dtype != "auto":
        return config.dtype
    return "bf16" if device == "cuda" else "fp32"


def seq_length(shape: ModelShape, config: FinetuningConfig) -> int:
    """Tokens per row, as the worker resolves it (worker/training/preparation.py)."""
    return config.max_seq_length or min(shape.context, DEFAULT_MAX_SEQ_LENGTH)


def estimate(
    model_config: Mapping[str, Any],
    config: FinetuningConfig,
    *,
    device: Device = "cuda",
    gradient_checkpointing: bool | None = None,
) -> MemoryEstimate:
    """Peak training memory per device; `gradient_checkpointing` overrides the config's when given."""
    shape = ModelShape.from_config(model_config)
    checkpointing = (
        config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    )
    dtype = compute_dtype(config, device)
    half = DTYPE_BYTES[dtype]
    tokens = config.micro_batch_size * seq_length(shape, config)
    trainable = _trainable_params(shape, config)
    parts = {
        "base_weights": _base_weight_bytes(shape, config, half),
        "trainable_weights": 4 * trainable if config.adapter in FROZEN_BASE_ADAPTERS else 0,
        "gradients": 4 * trainable,
        "optimizer_state": _optimizer_bytes_per_param(config) * trainable,
        "weight_copies": _weight_copies(shape, config, half),
        "activations": _activation_bytes(shape, config, half, tokens, checkpointing, device),
        "logits": _logit_bytes(shape, config, half, tokens),
        "speculator": _speculator_bytes(shape, config, tokens, device),
        "runtime_overhead": int(CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES),
    }
    return MemoryEstimate({name: int(value) for name, value in parts.items()}, checkpointing, dtype)


def fit(
    model_config: Mapping[str, Any],
    config: FinetuningConfig,
    available_bytes: float,
    *,
    device: Device = "cuda",
) -> Fit:
    """Whether the run fits `available_bytes` per device, and whether gradient checkpointing makes it fit."""
    as_configured = estimate(model_config, config, device=device)
    checkpointed = estimate(model_config, config, device=device, gradient_checkpointing=True)
    return Fit(as_configured.total <= available_bytes, checkpointed.total <= available_bytes, as_configured,
               checkpointed)  # fmt: skip


# --- the parts --------------------------------------------------------------------------------------


def _targets(config: FinetuningConfig) -> tuple[str, ...]:
    return config.target_modules or DEFAULT_TARGET_MODULES


def _rank(config: FinetuningConfig) -> int:
    return AUTO_RANK_CEILING if config.rank == "auto" else int(config.rank)


def _adapted_layers(shape: ModelShape, config: FinetuningConfig) -> int:
    share = config.layer_selection_percentage or 1.0
    return max(1, round(shape.layers * share))


def _lora_params(shape: ModelShape, config: FinetuningConfig) -> int:
    """A [r, in] + B [out, r] per targeted projection (DoRA adds a magnitude per output feature)."""
    shapes, rank = shape.projections(), _rank(config)
    per_layer = 0
    for name in _targets(config):
        if name in shapes:  # a module this shape does not know (a custom name) is not sized
            n_in, n_out = shapes[name]
            per_layer += rank * (n_in + n_out) + (n_out if config.adapter == "dora" else 0)
    return per_layer * _adapted_layers(shape, config)


def _speculator_params(shape: ModelShape, config: FinetuningConfig) -> int:
    if config.adapter not in TURBO_ADAPTERS:
        return 0
    if config.speculator_architecture == "eagle":
        # fc [H, 2H] and one decoder layer shaped like the base's (no biases).
        return 2 * shape.hidden * shape.hidden + shape.layer_linear_params() + 2 * shape.hidden
    # Medusa: one residual block (Linear H->H with bias) per head.
    return config.speculator_heads * (shape.hidden * shape.hidden + shape.hidden)


def _trainable_params(shape: ModelShape, config: FinetuningConfig) -> int:
    """Parameters the optimiser updates (speculator heads included)."""
    if config.adapter == "full":
        model = shape.total_params()
    elif config.adapter == "last_layer":
        # The last block, the final norm and the LM head (with tied embeddings: the embedding matrix).
        model = shape.layer_params() + shape.hidden + shape.vocab * shape.hidden
    elif config.adapter in LOW_RANK_ADAPTERS:
        model = _lora_params(shape, config)
    else:
        model = 0
    return model + _speculator_params(shape, config)


def _base_weight_bytes(shape: ModelShape, config: FinetuningConfig, half: int) -> float:
    """The model's own weights: fp32 masters when they train, else the compute dtype or 4/8-bit."""
    if config.adapter not in FROZEN_BASE_ADAPTERS:
        return 4 * shape.total_params()
    quantised = shape.layers * shape.layer_linear_params() if config.quantization_bits else 0
    # bitsandbytes quantises the decoder's linear layers; embeddings, norms and the head keep `half`.
    rest = shape.total_params() - quantised
    # LLM.int8: one byte a weight and an fp32 scale per output row (~nothing beside it).
    per_param = NF4_BYTES_PER_PARAM if config.quantization_bits == 4 else 1.0
    return quantised * per_param + rest * half


def _optimizer_bytes_per_param(config: FinetuningConfig) -> int:
    kind = config.optimizer.type
    if kind == "sgd":
        return 4 if config.optimizer.momentum else 0
    if kind == "adamw_8bit":
        return 2  # two 8-bit moments (block scales are ~1% more)
    return 8  # adamw_torch, paged_adamw_32bit: two fp32 moments


def _weight_copies(shape: ModelShape, config: FinetuningConfig, half: int) -> int:
    """Copies of weights a forward makes and keeps for the backward.

    full / last_layer compute under autocast: each trainable linear weight cast to the half dtype is
    cached and kept for the input gradient (a frozen weight's cast is not cached, and no gradient flows
    back through last_layer's frozen blocks). DoRA (PEFT) with dropout recomputes the base output from
    the dropped-out fp32 input against an fp32 copy of the base weight, which that matmul keeps.
    """
    if config.adapter == "dora" and config.lora_dropout > 0:
        shapes = shape.projections()
        adapted = sum(shapes[name][0] * shapes[name][1] for name in _targets(config) if name in shapes)
        return 4 * adapted * _adapted_layers(shape, config)
    if config.adapter in FROZEN_BASE_ADAPTERS or half == 4:
        return 0
    layers = shape.layers if config.adapter == "full" else 1
    return half * (layers * shape.layer_linear_params() + shape.vocab * shape.hidden)


def _layer_activation_bytes(shape: ModelShape, config: FinetuningConfig, half: int, device: Device) -> int:
    """Bytes one decoder layer keeps for the backward, per token (the formula the estimate rests on).

    h = hidden, q = heads * head_dim, k = kv_heads * head_dim, i = intermediate, b = compute bytes:
      2 RMSNorms: each keeps its input upcast to fp32 ......................... 2 * 4h
        (+ the fp32 normalised value when the gain trains ..................... 2 * 4h)
      attention (SDPA / flash): q, k, v (GQA k/v not repeated) and the output .. (2q + 2k) * b
      MLP: gate (for SiLU), SiLU(gate) and up (for their product) .............. 3i * b
      trainable base weights keep their inputs: the normed x for q/k/v and gate/up, and down's input
        (o_proj's input is the attention output, already kept) .............. (2h + i) * b
      LoRA, per adapted projection with input n and rank r: the input upcast to fp32 and dropped out,
        dropout's mask (a byte on CUDA; the CPU kernel keeps an fp32 one), and A's fp32 output
        ............................................................ (4 + mask) * n + 4r
        DoRA also keeps the base output for the magnitude's gradient ............ + 4 * out
    Checked against what torch's autograd keeps (saved-tensor hooks) and against measured CPU runs
    (tests/unit/training/test_memory_estimate.py).
    """
    h, q, i = shape.hidden, shape.heads * shape.head_dim, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    trains_base = config.adapter in ("full", "last_layer")
    total = 2 * 4 * h + (2 * q + 2 * kv) * half + 3 * i * half
    if trains_base:
        total += 2 * 4 * h + (2 * h + i) * half
    if config.adapter in LOW_RANK_ADAPTERS:
        shapes, rank = shape.projections(), _rank(config)
        mask = 0 if config.lora_dropout == 0 else (1 if device == "cuda" else 4)
        for name in _targets(config):
            if name in shapes:
                n_in, n_out = shapes[name]
                total += (4 + mask) * n_in + 4 * rank + (4 * n_out if config.adapter == "dora" else 0)
    return total


def _activation_bytes(
    shape: ModelShape, config: FinetuningConfig, half: int, tokens: int, checkpointing: bool, device: Device
) -> int:
    """All layers' kept activations; with checkpointing, each layer's input plus one layer recomputed.

    turbo trains only the heads: the base runs without autograd and keeps nothing but its last
    hidden state (counted under the speculator). last_layer keeps activations only past the first
    block that trains, i.e. for its one block.
    """
    if config.adapter == "turbo":
        return 0
    per_layer = _layer_activation_bytes(shape, config, half, device)
    layers = 1 if config.adapter == "last_layer" else shape.layers
    if checkpointing:
        return tokens * (layers * shape.hidden * half + per_layer)
    return tokens * layers * per_layer


def _logit_bytes(shape: ModelShape, config: FinetuningConfig, half: int, tokens: int) -> int:
    """The LM loss over [tokens, vocab]: logits in the compute dtype, their fp32 copy (when half),
    log-softmax's fp32 output kept for the backward, and the fp32 gradient the backward makes."""
    if config.adapter == "turbo" and not config.speculator_distill:
        return 0
    per_entry = half + 4 + 4 + (4 if half != 4 else 0)
    return tokens * shape.vocab * per_entry


def _speculator_bytes(shape: ModelShape, config: FinetuningConfig, tokens: int, device: Device) -> int:
    """Activations of the heads, all kept until the one backward: per draft step an fp32 pass over every
    token (eagle: a decoder layer and fc over [2H]; Medusa: a residual block) and its log-softmax over the
    draft vocabulary (eagle: the run's DRAFT_VOCAB_SIZE most frequent target tokens, whose LM-head rows
    it copies to fp32; Medusa: the whole vocabulary); plus one step's logits and their gradient while
    the backward passes it. The heads' weights and optimiser state count as trainable parameters."""
    if config.adapter not in TURBO_ADAPTERS:
        return 0
    h = shape.hidden
    if config.speculator_architecture == "eagle":
        vocab = min(shape.vocab, DRAFT_VOCAB_SIZE)
        draft = config.model_copy(update={"adapter": "full"})  # its weights train in fp32, like a block's
        step = _layer_activation_bytes(shape, draft, 4, device) + 4 * 3 * h
        rows = 4 * vocab * h
    else:
        vocab, step, rows = shape.vocab, 4 * 2 * h, 0
    features = tokens * 4 * 2 * h  # the frozen last hidden state, upcast, and the next tokens' embeddings
    kept = config.speculator_heads * tokens * (step + 4 * vocab)
    return features + rows + kept + tokens * 12 * vocab

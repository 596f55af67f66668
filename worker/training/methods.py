"""Owns the training methods: which weights of the base train, in what precision, how they are saved.

- lora / dora: a frozen base (in the compute dtype, or 4/8-bit via bitsandbytes = QLoRA) plus
  fp32 low-rank adapters (PEFT). Saved as a standard PEFT adapter directory.
- turbo_lora: lora plus speculator heads (worker/training/speculator.py), trained jointly. turbo:
  heads only, on a frozen base or a frozen parent LoRA, whose files the artifact carries unchanged.
- full: every weight trains. last_layer: only the final block, the final norm and the LM head.
  Both keep fp32 master weights and compute under autocast in the run's half dtype; saved as a
  whole model directory that `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D
from tuneforge.config import (
    DEFAULT_TARGET_MODULES,
    FROZEN_BASE_ADAPTERS,
    LOW_RANK_ADAPTERS,
    TURBO_ADAPTERS,
    FinetuningConfig,
)
from tuneforge.rules.artifacts import ADAPTER_WEIGHTS, CLASSIFIER_LABELS, SPECULATOR_WEIGHTS
from tuneforge.rules.classifier import encode_labels
from tuneforge.rules.speculator import SpeculatorArchitecture, SpeculatorConfig

from worker.training import eagle
from worker.training.attention import choose_implementation
from worker.training.runtime import Runtime, TrainingConfigError
from worker.training.speculator import MedusaHeads, SpeculatorFiles


class NonFiniteWeightsError(ValueError):
    """Training left NaN or infinite values in the weights: nothing is saved, checkpointed or published."""


# Phi-3 stores q/k/v and gate/up as one projection each; LoRA on them is LoRA on all of attention / MLP.
FUSED_TARGET_MODULES = ("qkv_proj", "gate_up_proj")

# How many final transformer blocks `last_layer` trains (with the final norm and the LM head).
LAST_LAYER_BLOCKS = 1


@dataclass
class TrainableModel:
    """The model being trained, and what is needed to snapshot, restore and publish its weights."""

    model: torch.nn.Module  # a PeftModel for lora/dora, the causal LM itself otherwise
    config: FinetuningConfig
    runtime: Runtime
    tokenizer: PreTrainedTokenizerBase
    details: dict[str, Any] = field(default_factory=dict)  # recorded in the training summary
    speculator: SpeculatorFiles | None = None  # turbo types: trained heads beside (or instead of) the model's
    frozen_adapter: dict[str, bytes] = field(default_factory=dict)  # turbo on a parent LoRA: its files
    model_frozen: bool = False  # the speculator phase: the model's weights are final (freeze_model)
    classifier_labels: list[str] | None = None  # task classification: class index -> label, saved with it

    @property
    def is_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def trains_model(self) -> bool:
        """Whether any weight of the model itself (not the speculator) trains."""
        return self.config.adapter != "turbo" and not self.model_frozen

    def freeze_model(self) -> None:
        """From now on only the speculator trains; the model's weights stay as they are (and are saved)."""
        self.model.requires_grad_(False)
        self.model_frozen = True

    def causal_lm(self) -> PreTrainedModel:
        """The causal LM (with LoRA layers injected, for a PEFT model)."""
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        assert isinstance(model, PreTrainedModel)
        return model

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if self.speculator is not None:
            params += [(f"speculator.{name}", p) for name, p in self.speculator.named_parameters()]
        return params

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """fp32 master weights compute in the half dtype (full / last_layer); adapters need nothing."""
        if self.is_peft or not self.runtime.half or self.config.adapter == "turbo":
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.dtype)

    @contextlib.contextmanager
    def as_base_model(self) -> Iterator[bool]:
        """The base model's behaviour, if it can be had from this model: yields whether it could."""
        if self.is_peft:
            assert isinstance(self.model, PeftModel)
            with self.model.disable_adapter():
                yield True
        else:
            yield self.config.adapter == "turbo"  # a frozen base: the model is the base

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A host copy of every trainable tensor (for the best-so-far snapshot)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.named_trainable()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_trainable())
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))

    def save(self, directory: Path) -> None:
        """The publishable artifact: a PEFT adapter, or a whole model for full / last-layer tuning;
        plus the speculator files for turbo types (turbo: those and a parent LoRA's files, unchanged).
        NonFiniteWeightsError, and nothing written, if a trained weight holds NaN or an infinity.
        """
        self.check_finite()
        self._save_model(directory)
        if self.speculator is not None:
            self.speculator.save(directory)

    @torch.no_grad()
    def check_finite(self) -> None:
        """Weights that went NaN or infinite would only ever produce NaN: refuse to keep them."""
        for name, param in self.named_trainable():
            if not bool(torch.isfinite(param).all()):
                raise NonFiniteWeightsError(
                    f"training produced NaN or infinite weights ({name}), so nothing was published; "
                    "lower the learning_rate, or continue from a version whose weights are finite"
                )

    def _save_model(self, directory: Path) -> None:
        if self.config.adapter == "turbo":
            for name, data in self.frozen_adapter.items():
                (directory / name).write_bytes(data)
            return
        if isinstance(self.model, PeftModel):
            # Stamp the name the user gave, not the local cache path, so the adapter is portable.
            self.model.peft_config["default"].base_model_name_or_path = self.config.base_model
            self.model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
            # PEFT adds a model-card template of placeholders; the training summary says what is true.
            (directory / "README.md").unlink(missing_ok=True)
            if self.classifier_labels is not None:
                (directory / CLASSIFIER_LABELS).write_text(encode_labels(self.classifier_labels))
            return
        assert isinstance(self.model, PreTrainedModel)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))

    @torch.no_grad()
    def load_saved(self, directory: Path) -> None:
        """Restore the trained weights from a directory `save` wrote (a checkpoint being resumed)."""
        if self.speculator is not None:
            self.speculator.load(directory)
        if not self.trains_model:
            return
        if isinstance(self.model, PeftModel):
            device = str(self.runtime.device)
            set_peft_model_state_dict(self.model, load_file(directory / ADAPTER_WEIGHTS, device=device))
            return
        params = dict(self.named_trainable())
        for shard in sorted(directory.glob("*.safetensors")):
            for name, value in load_file(shard).items():
                if name in params:
                    params[name].copy_(value.to(params[name].device))


def load_base(
    weights_dir: Path,
    config: FinetuningConfig,
    runtime: Runtime,
    *,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
) -> PreTrainedModel:
    """The base causal LM on the run's device, frozen, with packed-row attention available; with
    `num_labels`, the same weights as a sequence classifier with a new (seeded) `score` head."""
    # flash-attention computes in fp16/bf16 only: an fp32 run keeps the SDPA path.
    attention = choose_implementation(runtime.device.type, runtime.half)
    kwargs: dict[str, Any] = {"attn_implementation": attention}
    if trust_remote_code:  # only ever passed for a model the operator allowed (worker.model_store)
        kwargs["trust_remote_code"] = True
    if config.quantization_bits is not None:
        kwargs["quantization_config"] = _quantization(config.quantization_bits, runtime)
        kwargs["device_map"] = {"": runtime.device}
    low_rank = config.adapter in FROZEN_BASE_ADAPTERS
    # A frozen base may live in the half dtype; weights that train keep fp32 masters (see autocast).
    kwargs["dtype"] = runtime.dtype if low_rank else torch.float32
    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):  # the head's random init is the run's seed's
            torch.manual_seed(config.seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                weights_dir, num_labels=num_labels, **kwargs
            )
    if config.quantization_bits is None:
        torch.nn.Module.to(model, runtime.device)
    else:
        _keep_4bit_weights_differentiable(model)
    model.requires_grad_(False)
    model.config.use_cache = False  # training never decodes; generation turns the cache back on
    return model


def _quantization(bits: int, runtime: Runtime) -> BitsAndBytesConfig:
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _keep_4bit_weights_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference at the first eval-mode forward.

    bitsandbytes 0.50 converts a Linear4bit's weight to an AVX512-BF16 inference layout the first
    time it runs in eval mode without grad, and keeps that layout afterwards; its kernel has no
    backward, so every later training step would silently get no gradient through the layer.
    A run evaluates before its first step, so the conversion must be switched off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - typed as a Module


def default_targets(model: torch.nn.Module) -> list[str]:
    """Every attention and MLP projection the model has: by the names Llama-family models use (with
    Phi-3's fused `qkv_proj` / `gate_up_proj`), else the modules PEFT targets for the model's family."""
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
    targets = [name for name in (*DEFAULT_TARGET_MODULES, *FUSED_TARGET_MODULES) if name in present]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not targets:
        targets = [t for t in PEFT_TARGETS.get(str(model_type), ()) if t in present]
    if not targets:
        raise TrainingConfigError(
            f"target_modules: this {model_type or 'model'} has none of {', '.join(DEFAULT_TARGET_MODULES)}; "
            f"name its linear layers explicitly (it has {', '.join(sorted(present))})"
        )
    return targets


def _is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear too; GPT-2-style models use Conv1D.
    return isinstance(module, torch.nn.Linear | Conv1D)


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise TrainingConfigError(
            f"target_modules: this model has no linear layer named {', '.join(missing)}; "
            f"it has {', '.join(sorted(present))}"
        )


def build(
    config: FinetuningConfig,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    runtime: Runtime,
    *,
    targets: list[str],
    lora_kwargs: dict[str, Any] | None = None,
    init_adapter: Path | None = None,
    init_speculator: Path | None = None,
    classifier_labels: list[str] | None = None,
) -> TrainableModel:
    """Wrap or unfreeze `base` for the config's method. `init_adapter`: a parent PEFT adapter to continue;
    `init_speculator`: a directory holding a parent's speculator files to start the heads from;
    `classifier_labels`: task classification's label set (the head's classes), saved with the adapter.
    """
    # Heads first: _low_rank seeds the RNG stream that LoRA's init and dropout then draw from.
    speculator = _speculator(config, base, runtime, init_speculator)
    frozen: dict[str, bytes] = {}
    if config.adapter in LOW_RANK_ADAPTERS:
        model: torch.nn.Module = _low_rank(config, base, targets, lora_kwargs, init_adapter)
        details: dict[str, Any] = {"method": config.adapter, "quantization_bits": config.quantization_bits}
    elif config.adapter == "turbo":
        model, frozen = _frozen_parent(base, init_adapter)
        details = {"method": "turbo", "quantization_bits": config.quantization_bits}
        details["frozen_parent_adapter"] = init_adapter is not None
    elif config.adapter == "full":
        base.requires_grad_(True)
        model, details = base, {"method": "full"}
    else:
        model, details = base, _unfreeze_last_layers(base)
    if config.gradient_checkpointing:
        _checkpoint_activations(base)
    trainable = TrainableModel(
        model, config, runtime, tokenizer, details, speculator, frozen, classifier_labels=classifier_labels
    )
    if speculator is not None:
        details["speculator_heads"] = speculator.config.num_heads
    details["trainable_parameters"] = sum(p.numel() for _, p in trainable.named_trainable())
    details["total_parameters"] = sum(p.numel() for p in model.parameters())
    return trainable


def _speculator(
    config: FinetuningConfig, base: PreTrainedModel, runtime: Runtime, init_from: Path | None
) -> SpeculatorFiles | None:
    if config.adapter not in TURBO_ADAPTERS:
        return None
    spec = SpeculatorConfig(
        hidden_size=int(base.config.hidden_size),
        num_heads=config.speculator_heads,
        loss_weight_decay=config.speculator_loss_weight_decay,
        distill=config.speculator_distill,
        base_model=config.base_model,
    )
    heads: SpeculatorFiles
    if SpeculatorArchitecture.of_choice(config.speculator_architecture) == SpeculatorArchitecture.EAGLE:
        shape = base.config
        heads_count = int(shape.num_attention_heads)
        spec = spec.model_copy(
            update={
                "architecture": SpeculatorArchitecture.EAGLE,
                "num_attention_heads": heads_count,
                "num_key_value_heads": int(getattr(shape, "num_key_value_heads", None) or heads_count),
                "head_dim": int(getattr(shape, "head_dim", None) or shape.hidden_size // heads_count),
                "intermediate_size": int(shape.intermediate_size),
                "rms_norm_eps": float(getattr(shape, "rms_norm_eps", 1e-5)),
            }
        )
        with torch.random.fork_rng(devices=[]):  # its random init is the run's seed's, not the RNG's state
            torch.manual_seed(config.seed)
            heads = eagle.EagleDraft(spec)
    else:
        heads = MedusaHeads(spec)
    heads = heads.to(runtime.device)  # fp32 masters whatever the base's dtype
    if init_from is not None and (init_from / SPECULATOR_WEIGHTS).is_file():
        try:
            heads.load(init_from)
        except ValueError as exc:
            raise TrainingConfigError(str(exc)) from None
    return heads


def _frozen_parent(
    base: PreTrainedModel, init_adapter: Path | None
) -> tuple[torch.nn.Module, dict[str, bytes]]:
    """turbo: the base, or the base with a parent LoRA loaded frozen; the parent's files to republish."""
    if init_adapter is None:
        return base, {}
    model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=False)
    model.requires_grad_(False)
    files = {
        path.name: path.read_bytes() for path in sorted(init_adapter.glob("adapter_*")) if path.is_file()
    }
    return model, files


def _checkpoint_activations(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing works with a frozen base and inputs that need no grad.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _low_rank(
    config: FinetuningConfig,
    base: PreTrainedModel,
    targets: list[str],
    lora_kwargs: dict[str, Any] | None,
    init_adapter: Path | None,
) -> PeftModel:
    if init_adapter is not None:
        # The parent's adapter_config.json fixes rank, targets and DoRA-ness: the weights must fit it.
        return PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    shape = lora_kwargs or {"r": config.rank, "lora_alpha": config.lora_alpha}
    lora = LoraConfig(
        target_modules=list(targets),
        lora_dropout=config.lora_dropout,
        use_dora=config.adapter == "dora",
        bias="none",
        # SEQ_CLS: peft trains and saves the classification head (`score`) whole, beside the LoRA.
        task_type="SEQ_CLS" if config.task == "classification" else "CAUSAL_LM",
        **shape,
    )
    torch.manual_seed(config.seed)  # LoRA A's random init, then dropout: the run's whole RNG stream
    peft_model = get_peft_model(base, lora)
    assert isinstance(peft_model, PeftModel)
    if config.task == "classification":
        # The head trains in fp32 (like the LoRA weights peft keeps in fp32) over a half-precision base.
        head = getattr(peft_model.get_base_model(), "score", None)
        if isinstance(head, torch.nn.Module):
            head.float()
    return peft_model


def _unfreeze_last_layers(model: PreTrainedModel) -> dict[str, Any]:
    blocks = _decoder_blocks(model)
    chosen = list(range(len(blocks)))[-LAST_LAYER_BLOCKS:]
    for index in chosen:
        blocks[index].requires_grad_(True)
    trained = [f"layers.{i}" for i in chosen]
    norm = getattr(model.get_decoder(), "norm", None)
    if isinstance(norm, torch.nn.Module):
        norm.requires_grad_(True)
        trained.append("norm")
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Module):
        head.requires_grad_(True)
        trained.append("lm_head")
    # With tied embeddings the head IS the input embedding matrix: training one trains the other.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {"method": "last_layer", "trained_modules": trained, "head_tied_to_embeddings": tied}


def _decoder_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TrainingConfigError(
            f"adapter last_layer: cannot find the transformer blocks of {type(model).__name__}; "
            "use adapter 'lora' or 'full' for this model"
        )
    return layers

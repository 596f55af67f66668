"""Owns automatic LoRA configuration: which decoder layers to adapt, and the rank of each module.

Both decisions read one quantity per adapted projection: the gradient its weight W [out, in] would
get from the mean loss on a sample of training rows, G = Σ_tokens δ_outᵀ · x_in. It is accumulated
(in fp32) from the module's input activations and output gradients by hooks, so no weight ever has
to take a gradient: a bitsandbytes 4/8-bit base, whose weights cannot, is scored like any other.
Backward only needs the input embeddings' output to require grad; the model is left as it was.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch

from worker.training.batches import make_batch, token_loss_sum
from worker.training.data import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel

METHOD = "lora-gradient-energy"
DEFAULT_ENERGY = 0.9
# A sample of a few dozen rows sees one step's gradient, not the whole run's update, so its spectrum
# understates the dimensionality training will use: below rank 4 an adapter is starved by a small
# sample. Above 64, LoRA rarely learns more, while parameters and the serving engine's batched
# multi-LoRA cost (padded to the largest rank in a batch) keep growing.
MIN_RANK = 4
MAX_RANK = 64
FORMAT_VERSION = 1
# `model.layers.3.self_attn.q_proj` → stack `model.layers`, layer 3 (Llama, Mistral, Qwen naming).
_LAYER_NAME = re.compile(r"^(?P<stack>(?:.*\.)?layers)\.(?P<index>\d+)\.")


@dataclass(frozen=True)
class AutoconfigDecision:
    """What was decided and why; stored on the adapter version and reused on resume."""

    layer_scores: dict[int, float]  # layer → Σ‖G‖²_F of its target projections
    selected_layers: list[int] | None  # ascending; None = every layer
    module_ranks: dict[str, int]  # full module name → rank; empty when the rank is fixed
    module_alphas: dict[str, int]  # full module name → alpha; empty unless lora_alpha is "auto"
    rank: int  # LoraConfig r: modules without an entry in module_ranks
    lora_alpha: int
    layers_pattern: str  # the ModuleList the layer indices count in, e.g. "layers"
    trainable_parameters: int  # A [r, in] + B [out, r] of every adapted module
    method: str
    energy: float  # share of Σσ² an automatic rank keeps
    rows_scored: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_scores"] = {str(layer): score for layer, score in self.layer_scores.items()}
        return {"version": FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AutoconfigDecision:
        """Inverse of to_json; keys a later version adds are ignored."""
        known = {f.name: data[f.name] for f in fields(cls)}
        known["layer_scores"] = {int(layer): float(s) for layer, s in data["layer_scores"].items()}
        return cls(**known)

    def lora_kwargs(self) -> dict[str, Any]:
        """r, lora_alpha, rank_pattern, alpha_pattern and layer restriction for peft's LoraConfig."""
        kwargs: dict[str, Any] = {
            "r": self.rank,
            "lora_alpha": self.lora_alpha,
            "rank_pattern": {pattern_key(name): r for name, r in self.module_ranks.items()},
            "alpha_pattern": {pattern_key(name): a for name, a in self.module_alphas.items()},
        }
        if self.selected_layers is not None:
            kwargs["layers_to_transform"] = list(self.selected_layers)
            kwargs["layers_pattern"] = self.layers_pattern
        return kwargs


def pattern_key(module_name: str) -> str:
    """A rank_pattern key matching exactly this module of the model given to get_peft_model.

    peft treats keys as regexes matched by `re.match(rf"(.*\\.)?({key})$", name)`: a bare name's dots
    match any character and any module whose name ends in `.<name>` matches too. Anchored and escaped,
    the key matches its own module and no other.
    """
    return "^" + re.escape(module_name)


def decide(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    target_modules: Sequence[str],
    rank: int | Literal["auto"],
    lora_alpha: int | Literal["auto"],
    layer_selection_percentage: float | None,
    n_test_samples: int,
    micro_batch_size: int,
    pad_token_id: int,
    packed: bool,
    seed: int,
    energy: float = DEFAULT_ENERGY,
    min_rank: int = MIN_RANK,
    max_rank: int = MAX_RANK,
) -> AutoconfigDecision:
    """Score the layers and size the modules of a frozen base model (before PEFT wraps it).

    A packed sample needs a model loaded with `register_varlen_attention()`'s implementation.
    """
    _check_arguments(rank, lora_alpha, layer_selection_percentage, n_test_samples, micro_batch_size)
    started = time.perf_counter()
    targets = target_linears(model, target_modules)
    layer_of, stack = decoder_layers(targets)
    rows = sample_rows(examples, n_test_samples, seed)
    layered = {name: targets[name] for name in layer_of}
    gradients = accumulate_gradients(model, layered, rows, micro_batch_size, pad_token_id, packed)
    scores = layer_scores(gradients, layer_of)
    p = layer_selection_percentage
    selected = None if p is None else select_layers(scores, p)
    adapted = {n: m for n, m in targets.items() if selected is None or layer_of.get(n, -1) in selected}
    ranks = {
        name: energy_rank(gradients[name], energy=energy, min_rank=min_rank, max_rank=max_rank)
        for name in adapted
        if rank == "auto" and name in gradients
    }
    # Modules outside the pattern (targets outside decoder layers) get the typical automatic rank.
    default_rank = statistics.median_low(ranks.values()) if isinstance(rank, str) else rank
    return AutoconfigDecision(
        layer_scores=scores,
        selected_layers=selected,
        module_ranks=ranks,
        module_alphas={name: 2 * r for name, r in ranks.items()} if lora_alpha == "auto" else {},
        rank=default_rank,
        lora_alpha=2 * default_rank if isinstance(lora_alpha, str) else lora_alpha,
        layers_pattern=stack.rsplit(".", 1)[-1],
        trainable_parameters=sum(
            ranks.get(name, default_rank) * (m.in_features + m.out_features) for name, m in adapted.items()
        ),
        method=METHOD,
        energy=energy,
        rows_scored=len(rows),
        seconds=round(time.perf_counter() - started, 3),
    )


def _check_arguments(rank: object, alpha: object, percentage: float | None, rows: int, micro: int) -> None:
    if rank != "auto" and percentage is None:
        raise ValueError("nothing to decide: rank is fixed and layer_selection_percentage is unset")
    if alpha == "auto" and rank != "auto":
        raise ValueError("lora_alpha 'auto' follows rank 'auto'; give an integer alpha for a fixed rank")
    if percentage is not None and not 0 < percentage <= 1:
        raise ValueError(f"layer_selection_percentage must be in (0, 1], got {percentage}")
    if rows < 1 or micro < 1:
        raise ValueError("n_test_samples and micro_batch_size must be at least 1")


def target_linears(model: torch.nn.Module, target_modules: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The linear modules peft's list matching adapts: name equal to, or ending in `.<target>`."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)  # bitsandbytes' Linear4bit / Linear8bitLt included
        and any(name == t or name.endswith(f".{t}") for t in target_modules)
    }
    if not found:
        raise ValueError(f"target_modules: this model has no linear module named {', '.join(target_modules)}")
    return found


def decoder_layers(targets: Mapping[str, torch.nn.Module]) -> tuple[dict[str, int], str]:
    """(module name → layer index) for targets inside decoder layers, and the layer stack's name."""
    layer_of: dict[str, int] = {}
    stacks = set()
    for name in targets:
        match = _LAYER_NAME.match(name)
        if match:
            layer_of[name] = int(match["index"])
            stacks.add(match["stack"])
    if not stacks:
        raise ValueError(
            "layer selection and automatic rank need decoder layers (modules named '*.layers.<i>.*'), "
            f"but no target module is inside one: {', '.join(sorted(targets)[:5])}"
        )
    if len(stacks) > 1:
        raise ValueError(f"target modules lie in several layer stacks: {', '.join(sorted(stacks))}")
    return layer_of, stacks.pop()


def sample_rows(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """A seeded sample of up to n rows that have a target token, in dataset order."""
    candidates = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not candidates:
        raise ValueError("no training row has a target token to score layers and ranks on")
    # A private Random: the sample must neither depend on nor disturb anyone else's RNG.
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), min(n, len(candidates))))
    return [candidates[i] for i in chosen]


def accumulate_gradients(
    model: PreTrainedModel,
    modules: Mapping[str, torch.nn.Linear],
    rows: Sequence[Example],
    micro_batch_size: int,
    pad_token_id: int,
    packed: bool,
) -> dict[str, torch.Tensor]:
    """G [out, in] (fp32) of each module's weight for the mean token loss over `rows`."""
    batches = [
        make_batch(rows[i : i + micro_batch_size], pad_token_id, packed=packed)
        for i in range(0, len(rows), micro_batch_size)
    ]
    total_targets = sum(batch.target_count for batch in batches)
    device = next(model.get_input_embeddings().parameters()).device
    with _probed(model, modules) as (gradients, embedded), torch.enable_grad():
        for batch in batches:
            loss = token_loss_sum(model, batch.to(device)) / total_targets
            # Gradients flow to the embedded inputs only: no parameter's .grad is ever written.
            torch.autograd.grad(loss, embedded.pop())
    if not all(torch.isfinite(g).all() for g in gradients.values()):
        raise ValueError("the loss gradient on the scored rows is not finite; check the base model and data")
    return gradients


@contextmanager
def _probed(
    model: PreTrainedModel, modules: Mapping[str, torch.nn.Linear]
) -> Iterator[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
    """Hooks that accumulate each module's G, and make the embedded inputs require grad; undone on exit."""
    gradients = {
        name: torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=m.weight.device)
        for name, m in modules.items()
    }
    embedded: list[torch.Tensor] = []

    def embed_hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
        embedded.append(output.requires_grad_(True))  # [B, S, H]; a leaf when the embedding is frozen

    def watch(name: str) -> Any:
        def forward_hook(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if output.requires_grad:
                x = args[0].detach()  # [B, S, in]
                output.register_hook(lambda grad: _accumulate(gradients[name], grad, x))

        return forward_hook

    modes = {module: module.training for module in model.modules()}
    handles = [model.get_input_embeddings().register_forward_hook(embed_hook)]
    handles += [module.register_forward_hook(watch(name)) for name, module in modules.items()]
    model.eval()  # scores must not depend on dropout draws
    try:
        yield gradients, embedded
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def _accumulate(gradient: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """gradient [out, in] += δᵀ · x over every token, in fp32 whatever the compute dtype."""
    delta = grad_out.reshape(-1, grad_out.shape[-1]).float()  # [N, out]
    gradient.addmm_(delta.T, x.reshape(-1, x.shape[-1]).float())  # [out, N] @ [N, in]


def layer_scores(gradients: Mapping[str, torch.Tensor], layer_of: Mapping[str, int]) -> dict[int, float]:
    """Per layer, Σ_modules ‖G_m‖²_F: how fast this layer's projections can lower the task's loss.

    A gradient step of size η on the layer's weights lowers the loss by η·Σ‖G_m‖²_F to first order.
    It is also what LoRA sees: with B = 0 and A random at init, B's gradient is G·Aᵀ, whose expected
    squared norm is proportional to ‖G‖²_F, so the score ranks layers by the first-step loss decrease
    an adapter there would give. A layer whose projections cannot move the loss scores 0.
    """
    scores = {layer: 0.0 for layer in sorted(set(layer_of.values()))}
    for name, gradient in gradients.items():
        scores[layer_of[name]] += float(gradient.square().sum())
    return scores


def select_layers(scores: Mapping[int, float], percentage: float) -> list[int]:
    """The top `percentage` of layers by score (rounded up, at least one), ties to the lower index."""
    # round() first: 0.3 * 10 is 3.0000000000000004 in floating point, which must not become 4.
    count = max(1, math.ceil(round(percentage * len(scores), 6)))
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:count])


def energy_rank(gradient: torch.Tensor, *, energy: float, min_rank: int, max_rank: int) -> int:
    """Smallest k whose top-k singular values hold `energy` of Σσ², within [min_rank, max_rank].

    Never above min(out, in): a LoRA of that rank can already express any update of the module.
    """
    cap = min(max_rank, *gradient.shape)
    floor = min(min_rank, cap)
    squared = torch.linalg.svdvals(gradient.float()).square()  # [min(out, in)], descending
    total = float(squared.sum())
    if total <= 0:
        return floor
    kept = squared.cumsum(0) / total  # [min(out, in)]: energy of the top-k
    k = int((kept < energy).sum()) + 1
    return max(floor, min(k, cap))

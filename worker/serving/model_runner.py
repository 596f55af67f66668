"""The forward pass of one engine step: a decoder-only model (the families in `SERVED_MODEL_TYPES`,
their differences in architecture.py) over a flat batch of tokens from many sequences, with the
paged KV cache and per-token LoRA deltas.

HF's `generate` pays for a dense `[batch, max_len]` layout, a cache object and mask building on every
token; here the weights of the HF model are reused as plain tensors and one step is: embed all tokens
`[T, D]` → per layer (norm, q/k/v with LoRA, RoPE, write K/V to their slots, attention, o/MLP with
LoRA) → logits only at each sequence's last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.serving.architecture import Architecture, read_architecture
from worker.serving.attention import (
    AttentionSpec,
    attend,
    cached_prefill_attention,
    prefill_attention,
    window_mask,
)
from worker.serving.cpu_kernels import KernelConfig, SmallGemm, small_gemm
from worker.serving.kv_cache import BLOCK_SIZE, BlockManager, CacheShape, KVCache
from worker.serving.linear import KERNEL_TOKENS, SMALL_STEP_TOKENS, Linear
from worker.serving.lora import LoraBatch, LoraStacker
from worker.serving.rope import apply_rope
from worker.serving.step_input import StepInput

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LayerWeights:
    """One decoder layer with the projections that share an input fused into one weight."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor  # the MLP's input norm (Gemma's pre_feedforward_layernorm)
    qkv: Linear  # [q_out + 2 * kv_out, D]; Qwen2 has q/k/v biases
    o: Linear
    gate_up: Linear  # [2 * intermediate, D]
    down: Linear
    q_norm: torch.Tensor | None = None  # [hd] per-head norms before RoPE (Qwen3, Gemma3)
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma: norms of the attention and MLP outputs
    mlp_out_norm: torch.Tensor | None = None

    @classmethod
    def fuse(
        cls, layer: Any, arch: Architecture, *, kernel: SmallGemm | None, transposed_copy: bool
    ) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        both: dict[str, Any] = {"kernel": kernel, "transposed_copy": transposed_copy}
        if arch.fused_checkpoint:  # Phi3 stores the engine's layout already
            qkv, qkv_bias = attn.qkv_proj.weight, attn.qkv_proj.bias
            gate_up = mlp.gate_up_proj.weight
        else:
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            qkv_bias = torch.cat(biases) if all(b is not None for b in biases) else None
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])

        def norm(module: Any) -> torch.Tensor:
            return _norm_weight(module.weight, arch.norm_offset)

        sandwich = arch.sandwich_norms
        return cls(
            input_norm=norm(layer.input_layernorm),
            post_norm=norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm),
            qkv=Linear(qkv, qkv_bias, **both),
            o=Linear(attn.o_proj.weight, None, **both),
            gate_up=Linear(gate_up, None, **both),
            down=Linear(mlp.down_proj.weight, None, **both),
            q_norm=norm(attn.q_norm) if arch.qk_norm else None,
            k_norm=norm(attn.k_norm) if arch.qk_norm else None,
            attn_out_norm=norm(layer.post_attention_layernorm) if sandwich else None,
            mlp_out_norm=norm(layer.post_feedforward_layernorm) if sandwich else None,
        )


@dataclass(frozen=True)
class StepHidden:
    """Final-norm hidden states of one forward pass: what the drafter reads for the next step's drafts."""

    rows: torch.Tensor  # [B or T, D] at the rows whose logits came back: what Medusa heads read
    tokens: torch.Tensor  # [T, D] every fed token: an eagle draft layer commits a prefill's whole prompt


@dataclass(frozen=True)
class ForwardResult:
    """One forward pass's logits at the step's `logits_indices`, and its hidden states."""

    logits: torch.Tensor  # [B or T, V] float32
    hidden: StepHidden


class ModelRunner:
    """The base model's weights as plain fused tensors, the paged KV cache, and one step's forward pass."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str,
        kv_cache_bytes: int,
        max_model_len: int | None,
        small_step_weights: bool = True,
        device: str = "auto",
        kernels: KernelConfig | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.device = resolve_device(device)
        # The small-step paths only pay off on the CPU; cuBLAS reads either layout as fast.
        small_step_weights = small_step_weights and self.device.type == "cpu"
        self.kernel = small_gemm(kernels) if small_step_weights and self.dtype == torch.float32 else None
        self._small_step_tokens = KERNEL_TOKENS if self.kernel is not None else SMALL_STEP_TOKENS
        self._cpu_threads = torch.get_num_threads()
        self._small_step_one_thread = small_step_weights
        model = self._load_model(model_dir)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        self._read_config(model.config, max_model_len)
        self.eos_token_ids = _eos_ids(model.config, self.tokenizer)
        self._take_weights(model, small_step_weights)
        del model  # the unfused q/k/v and gate/up weights are freed; only the fused copies remain
        self.cache = self._allocate_cache(kv_cache_bytes)
        self.stacker = LoraStacker()
        self.module_shapes = _module_shapes(self.layers[0], self.qkv_slices, self.gate_up_slices)

    def _load_model(self, model_dir: Path) -> Any:
        """The HF model on this runner's device and dtype, refused (before its weights are read) unless
        the engine runs its family and every feature of its config."""
        self.arch = read_architecture(AutoConfig.from_pretrained(model_dir))
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        model.to(self.device)
        model.eval().requires_grad_(False)
        return model

    def _read_config(self, config: Any, max_model_len: int | None) -> None:
        """The model's shapes, and where each projection sits in the fused weights' output columns."""
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.attention = [
            AttentionSpec(self.arch.query_scale, self.arch.attn_softcap, window)
            for window in self.arch.windows
        ]
        self.eps = config.rms_norm_eps
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        intermediate = config.intermediate_size
        # Where each LoRA target writes in the fused outputs; Phi3's targets are the fused weights.
        if self.arch.fused_checkpoint:
            self.qkv_slices = {"qkv_proj": slice(0, q_out + 2 * kv_out)}
            self.gate_up_slices = {"gate_up_proj": slice(0, 2 * intermediate)}
        else:
            self.qkv_slices = {
                "q_proj": slice(0, q_out),
                "k_proj": slice(q_out, q_out + kv_out),
                "v_proj": slice(q_out + kv_out, q_out + 2 * kv_out),
            }
            self.gate_up_slices = {
                "gate_proj": slice(0, intermediate),
                "up_proj": slice(intermediate, 2 * intermediate),
            }
        self.o_slices = {"o_proj": slice(None)}
        self.down_slices = {"down_proj": slice(None)}
        self.max_model_len = min(
            max_model_len or config.max_position_embeddings, config.max_position_embeddings
        )
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size

    def _take_weights(self, model: Any, small_step_weights: bool) -> None:
        """The model's weights as plain tensors, each layer's projections fused by shared input."""
        self.embed = model.model.embed_tokens.weight
        self.final_norm = _norm_weight(model.model.norm.weight, self.arch.norm_offset)
        small: dict[str, Any] = {"kernel": self.kernel, "transposed_copy": small_step_weights}
        self.lm_head = Linear(model.lm_head.weight, None, **small)
        self.rope = {
            key: _rope_table(model, self.max_model_len, self.dtype, key) for key in set(self.arch.rope_keys)
        }
        # The table eagle draft layers rotate with (they are refused on families with several).
        self.cos, self.sin = self.rope[self.arch.rope_keys[0]]
        self.embed_scale = (
            torch.tensor(self.arch.embed_scale).to(self.dtype) if self.arch.embed_scale is not None else None
        )
        self.layers = [LayerWeights.fuse(layer, self.arch, **small) for layer in model.model.layers]

    def _allocate_cache(self, kv_cache_bytes: int) -> KVCache:
        """The paged KV cache within the byte budget; refused if it holds less than one longest sequence."""
        shape = CacheShape(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)
        num_blocks = KVCache.blocks_for_budget(shape, kv_cache_bytes)
        if BlockManager.blocks_needed(self.max_model_len) > num_blocks:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds {num_blocks * BLOCK_SIZE} tokens, less than one "
                f"{self.max_model_len}-token sequence: raise --kv-cache-bytes or lower the context"
            )
        return KVCache(shape, num_blocks, self.device)

    def release_cache(self) -> None:
        """Frees the KV cache's memory; the runner cannot run a step after this (its engine has stopped)."""
        self.cache.keys.clear()
        self.cache.values.clear()

    # --- the forward pass --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, step: StepInput) -> ForwardResult:
        """Next-token logits (float32) at the step's `logits_indices`, with the hidden states."""
        step_hidden = self.hidden_states(step)  # [T, D]
        hidden = step_hidden.index_select(0, step.logits_indices)  # [B or T, D]
        return ForwardResult(self.logits(hidden), StepHidden(hidden, step_hidden))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) `[N, V]` of final-norm hidden states `[N, D]`: a step's, or a scored prompt's."""
        logits = self.lm_head(hidden).float()
        if self.arch.final_softcap is not None:
            cap = self.arch.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def hidden_states(self, step: StepInput) -> torch.Tensor:
        """The final-norm hidden states `[T, D]` of every fed token (embeddings read these directly)."""
        if self._small_step_one_thread:
            self._pick_threads(step.input_ids.shape[0])
        lora = LoraBatch(self.stacker.stacks(step.adapters), step.token_adapter)
        rope = {
            key: (  # [T, 1, rd]
                cos.index_select(0, step.positions)[:, None, :],
                sin.index_select(0, step.positions)[:, None, :],
            )
            for key, (cos, sin) in self.rope.items()
        }
        masks = self._decode_masks(step)
        hidden = F.embedding(step.input_ids, self.embed)  # [T, D]
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        for index, weights in enumerate(self.layers):
            cos, sin = rope[self.arch.rope_keys[index]]
            context = _LayerStep(cos, sin, masks.get(self.attention[index].window, step.context_mask))
            hidden = self._layer(index, weights, hidden, context, step, lora)
        return F.rms_norm(hidden, (hidden.shape[-1],), self.final_norm, self.eps)

    def _decode_masks(self, step: StepInput) -> dict[int | None, torch.Tensor]:
        """A decode step's context mask narrowed to each sliding window its layers use, built once."""
        windows = {spec.window for spec in self.attention if spec.window is not None}
        if step.prefill_lengths is not None or step.context_mask is None or not windows:
            return {}
        if step.query_index is None:
            query_positions = step.positions[:, None]  # [B, 1]
        else:
            query_positions = step.positions[step.query_index]  # [B, Q]
        return {w: window_mask(step.context_mask, query_positions, w) for w in windows}

    def _pick_threads(self, tokens: int) -> None:
        """One intra-op thread for tiny steps, all of them otherwise.

        A single stream's GEMVs are memory-bound: a second OpenMP thread adds little bandwidth, and any
        other runnable thread (the HTTP server's event loop, woken for every token) stalls the OpenMP
        barrier it waits on. (The small-step kernel splits its GEMMs with a thread of its own instead,
        see cpu_kernels/small_gemm.c.) On a 2-core CPU a single stream through AsyncEngine measured
        faster with one thread than with two; steps of many rows need all of them.
        """
        wanted = 1 if tokens <= self._small_step_tokens else self._cpu_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _layer(
        self,
        index: int,
        w: LayerWeights,
        hidden: torch.Tensor,
        context: _LayerStep,
        step: StepInput,
        lora: LoraBatch,
    ) -> torch.Tensor:
        tokens, width = hidden.shape
        x = F.rms_norm(hidden, (width,), w.input_norm, self.eps)
        qkv = w.qkv(x)  # [T, (H + 2 KV) * hd]
        lora.apply(index, "qkv", x, qkv, self.qkv_slices)
        heads = qkv.view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        rotated = heads[:, : self.num_heads + self.num_kv_heads]  # q and k heads, roped together
        if w.q_norm is not None and w.k_norm is not None:
            rotated = torch.cat(
                [
                    F.rms_norm(rotated[:, : self.num_heads], (self.head_dim,), w.q_norm, self.eps),
                    F.rms_norm(rotated[:, self.num_heads :], (self.head_dim,), w.k_norm, self.eps),
                ],
                dim=1,
            )
        rotated = apply_rope(rotated, context.cos, context.sin)
        q, k = rotated[:, : self.num_heads], rotated[:, self.num_heads :]
        v = heads[:, self.num_heads + self.num_kv_heads :]
        if step.slot_mapping is not None:  # None: a pass that caches nothing (embeddings)
            self.cache.keys[index].index_copy_(0, step.slot_mapping, k)
            self.cache.values[index].index_copy_(0, step.slot_mapping, v)
        if step.prefill_context is not None:
            out = self._cached_prefill_attention(index, q, step)
        elif step.prefill_lengths is not None:
            out = prefill_attention(q, k, v, step.prefill_lengths, self.attention[index])
        else:
            out = self._decode_attention(index, q, step, context.mask)
        o = w.o(out)
        lora.apply(index, "o", out, o, self.o_slices)
        if w.attn_out_norm is not None:
            o = F.rms_norm(o, (width,), w.attn_out_norm, self.eps)
        hidden = hidden + o
        x = F.rms_norm(hidden, (width,), w.post_norm, self.eps)
        gate_up = w.gate_up(x)  # [T, 2 * I]
        lora.apply(index, "gate_up", x, gate_up, self.gate_up_slices)
        gate, up = gate_up.chunk(2, dim=-1)
        act = self.arch.activation(gate).mul_(up)
        down = w.down(act)
        lora.apply(index, "down", act, down, self.down_slices)
        if w.mlp_out_norm is not None:
            down = F.rms_norm(down, (width,), w.mlp_out_norm, self.eps)
        return hidden + down

    def _cached_prefill_attention(self, index: int, q: torch.Tensor, step: StepInput) -> torch.Tensor:
        """A prefill whose sequences have a cached prefix: each attends to its context in the cache."""
        assert step.prefill_context is not None
        assert step.prefill_starts is not None and step.prefill_lengths is not None
        shape = (-1, self.num_kv_heads, self.head_dim)
        keys = [self.cache.keys[index].index_select(0, slots).view(shape) for slots in step.prefill_context]
        values = [
            self.cache.values[index].index_select(0, slots).view(shape) for slots in step.prefill_context
        ]
        return cached_prefill_attention(
            q, keys, values, step.prefill_lengths, step.prefill_starts, self.attention[index]
        )

    def _decode_attention(
        self, index: int, q: torch.Tensor, step: StepInput, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One query per sequence against its cached context, gathered from the paged cache."""
        assert step.context_slots is not None
        assert step.context_flat is not None
        batch, length = step.context_slots.shape
        # index_select on the flat slot list is much faster than advanced indexing on CPU.
        keys = self.cache.keys[index].index_select(0, step.context_flat)
        values = self.cache.values[index].index_select(0, step.context_flat)
        keys = keys.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, kvh, L, hd]
        values = values.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # One query per sequence [B, H, 1, hd], or its padded queries [B, Q, H, hd] → [B, H, Q, hd].
        queries = q[:, :, None, :] if step.query_index is None else q[step.query_index].transpose(1, 2)
        out = attend(queries, keys, values, mask, self.attention[index])
        if step.query_index is None:
            return out.reshape(q.shape[0], -1)
        assert step.query_valid is not None
        grid = out.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[2])  # [B * Q, H * hd]
        return grid.index_select(0, step.query_valid)


def _module_shapes(
    layer: LayerWeights, qkv: dict[str, slice], gate_up: dict[str, slice]
) -> dict[str, tuple[int, int]]:
    """`module -> (in_features, out_features)` of the fused weights the runner multiplies by: the shapes a
    LoRA's A `[r, in]` and B `[out, r]` must fit, read from the weights rather than the config."""

    def rows(weight: torch.Tensor, part: slice) -> int:
        return len(range(*part.indices(weight.shape[0])))

    shapes = {name: (layer.qkv.weight.shape[1], rows(layer.qkv.weight, part)) for name, part in qkv.items()}
    shapes |= {
        name: (layer.gate_up.weight.shape[1], rows(layer.gate_up.weight, part))
        for name, part in gate_up.items()
    }
    shapes["o_proj"] = (layer.o.weight.shape[1], layer.o.weight.shape[0])
    shapes["down_proj"] = (layer.down.weight.shape[1], layer.down.weight.shape[0])
    return {name: (int(inp), int(out)) for name, (inp, out) in shapes.items()}


def _norm_weight(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """The weight F.rms_norm multiplies by. Gemma multiplies by 1 + w: folded in once here (in float32,
    as Gemma's norm adds it, then one rounding to the serving dtype), so every norm is a plain one."""
    return (weight.float() + offset).to(weight.dtype) if offset else weight


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA GPU here")
    return resolved


@dataclass(frozen=True)
class _LayerStep:
    """What a layer of this step reads that depends on the layer's kind: its RoPE rows and decode mask."""

    cos: torch.Tensor  # [T, 1, rd]
    sin: torch.Tensor
    mask: torch.Tensor | None  # decode: [B, 1, Q, L], narrowed to the layer's window


def _rope_table(
    model: Any, max_len: int, dtype: torch.dtype, layer_type: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every position, from the model's own rotary module (so RoPE scaling variants match);
    Gemma3's takes the layer type whose base it rotates with."""
    device = model.lm_head.weight.device
    positions = torch.arange(max_len, device=device)[None, :]
    probe = torch.zeros(1, dtype=dtype, device=device)
    rotary = model.model.rotary_emb
    cos, sin = rotary(probe, positions) if layer_type is None else rotary(probe, positions, layer_type)
    return cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]


def _eos_ids(config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:  # type: ignore[no-untyped-def]
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(source)
    return frozenset(ids)

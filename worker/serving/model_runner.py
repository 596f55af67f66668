"""The forward pass of one engine step: a Llama-family model over a flat batch of tokens from many
sequences, with the paged KV cache and per-token LoRA deltas.

HF's `generate` pays for a dense `[batch, max_len]` layout, a cache object and mask building on every
token; here the weights of the HF model are reused as plain tensors and one step is: embed all tokens
`[T, D]` → per layer (norm, q/k/v with LoRA, RoPE, write K/V to their slots, attention, o/MLP with
LoRA) → logits only at each sequence's last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.serving.kv_cache import BLOCK_SIZE, BlockManager, CacheShape, KVCache
from worker.serving.lora import AdapterWeights, LoraBatch, LoraStacker
from worker.serving.sequence import Sequence

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepInput:
    """One step's tensors. Prefill steps hold whole sequences; decode steps one token per sequence."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each token's K/V goes in the cache
    token_adapter: torch.Tensor  # [T] index into `adapters`, -1 = base model
    adapters: list[AdapterWeights]
    logits_indices: torch.Tensor  # [B] the token whose next-token logits each sequence needs
    prefill_lengths: list[int] | None = None  # prefill: tokens of each sequence, in order
    context_slots: torch.Tensor | None = None  # decode: [B, L] cache slots of each sequence's context
    context_mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] True where a slot is real
    context_flat: torch.Tensor | None = None  # decode: context_slots flattened, [B * L]


class ModelRunner:
    def __init__(
        self, model_dir: Path, *, dtype: str, kv_cache_bytes: int, max_model_len: int | None
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.dtype = DTYPES[dtype]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        model.eval().requires_grad_(False)
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the serving engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models, not {config.model_type}"
            )
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        self.model = model
        self.layers = list(model.model.layers)
        self.num_layers = len(self.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.max_model_len = min(
            max_model_len or config.max_position_embeddings, config.max_position_embeddings
        )
        self.vocab_size = config.vocab_size
        self.eos_token_ids = _eos_ids(config, self.tokenizer)
        shape = CacheShape(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)
        num_blocks = KVCache.blocks_for_budget(shape, kv_cache_bytes)
        if BlockManager.blocks_needed(self.max_model_len) > num_blocks:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds {num_blocks * 16} tokens, less than one "
                f"{self.max_model_len}-token sequence: raise --kv-cache-bytes or lower the context"
            )
        self.cache = KVCache(shape, num_blocks)
        self.cos, self.sin = self._rope_table()
        self.stacker = LoraStacker()

    def _rope_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every position, from the model's own rotary module (so RoPE scaling variants match)."""
        positions = torch.arange(self.max_model_len)[None, :]
        probe = torch.zeros(1, dtype=self.dtype)
        cos, sin = self.model.model.rotary_emb(probe, positions)
        return cos[0], sin[0]  # [max_len, head_dim]

    # --- building step inputs ----------------------------------------------------------------------

    def prefill_input(
        self, seqs: list[Sequence], adapters: list[AdapterWeights], owner: list[int]
    ) -> StepInput:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_adapter: list[int] = []
        last: list[int] = []
        lengths: list[int] = []
        for seq, pos in zip(seqs, owner, strict=True):
            tokens = seq.all_token_ids
            ids.extend(tokens)
            positions.extend(range(len(tokens)))
            slots.extend(BlockManager.slot(seq, p) for p in range(len(tokens)))
            token_adapter.extend([pos] * len(tokens))
            last.append(len(ids) - 1)
            lengths.append(len(tokens))
        return StepInput(
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor(slots),
            token_adapter=torch.tensor(token_adapter),
            adapters=adapters,
            logits_indices=torch.tensor(last),
            prefill_lengths=lengths,
        )

    def decode_input(
        self, seqs: list[Sequence], adapters: list[AdapterWeights], owner: list[int]
    ) -> StepInput:
        longest = max(len(seq) for seq in seqs)
        lengths = torch.tensor([len(seq) for seq in seqs])
        tables = torch.zeros(len(seqs), max(len(seq.block_table) for seq in seqs), dtype=torch.long)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table)
        # [B, blocks] → [B, blocks*16] slots, cut to the longest context; padding is masked below.
        context = (tables[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(len(seqs), -1)[
            :, :longest
        ]
        mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
        return StepInput(
            input_ids=torch.tensor([seq.all_token_ids[-1] for seq in seqs]),
            positions=lengths - 1,
            slot_mapping=context[torch.arange(len(seqs)), lengths - 1],
            token_adapter=torch.tensor(owner),
            adapters=adapters,
            logits_indices=torch.arange(len(seqs)),
            context_slots=context,
            context_mask=mask,
            context_flat=context.reshape(-1),
        )

    # --- the forward pass --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Next-token logits `[B, V]` (float32) for each sequence of the step."""
        lora = LoraBatch(self.stacker.stacks(step.adapters), step.token_adapter, self.dtype)
        cos = self.cos[step.positions][:, None, :]  # [T, 1, hd]
        sin = self.sin[step.positions][:, None, :]
        hidden = self.model.model.embed_tokens(step.input_ids)  # [T, D]
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, step, lora)
        hidden = self.model.model.norm(hidden[step.logits_indices])
        return self.model.lm_head(hidden).float()

    def _layer(self, index, layer, hidden, cos, sin, step: StepInput, lora: LoraBatch) -> torch.Tensor:  # type: ignore[no-untyped-def]
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(hidden)
        tokens = x.shape[0]
        q = lora.apply(index, "q_proj", x, attn.q_proj(x)).view(tokens, self.num_heads, self.head_dim)
        k = lora.apply(index, "k_proj", x, attn.k_proj(x)).view(tokens, self.num_kv_heads, self.head_dim)
        v = lora.apply(index, "v_proj", x, attn.v_proj(x)).view(tokens, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.cache.keys[index].index_copy_(0, step.slot_mapping, k)
        self.cache.values[index].index_copy_(0, step.slot_mapping, v)
        if step.prefill_lengths is not None:
            out = self._prefill_attention(q, k, v, step.prefill_lengths)
        else:
            out = self._decode_attention(index, q, step)
        hidden = hidden + lora.apply(index, "o_proj", out, attn.o_proj(out))
        x = layer.post_attention_layernorm(hidden)
        gate = lora.apply(index, "gate_proj", x, mlp.gate_proj(x))
        up = lora.apply(index, "up_proj", x, mlp.up_proj(x))
        act = mlp.act_fn(gate) * up
        return hidden + lora.apply(index, "down_proj", act, mlp.down_proj(act))

    def _prefill_attention(self, q, k, v, lengths: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """Causal attention of each sequence over its own tokens (no prefix is cached before prefill)."""
        outs = []
        start = 0
        for length in lengths:
            sl = slice(start, start + length)
            out = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None],  # [1, H, L, hd]
                k[sl].transpose(0, 1)[None],
                v[sl].transpose(0, 1)[None],
                is_causal=True,
                scale=self.scale,
                enable_gqa=True,
            )
            outs.append(out[0].transpose(0, 1).reshape(length, -1))
            start += length
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _decode_attention(self, index: int, q: torch.Tensor, step: StepInput) -> torch.Tensor:
        """One query per sequence against its cached context, gathered from the paged cache."""
        assert step.context_slots is not None
        assert step.context_flat is not None
        batch, length = step.context_slots.shape
        # index_select on the flat slot list is ~5x faster than advanced indexing on CPU.
        keys = self.cache.keys[index].index_select(0, step.context_flat)
        values = self.cache.values[index].index_select(0, step.context_flat)
        keys = keys.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, kvh, L, hd]
        values = values.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [B, H, 1, hd]
            keys,
            values,
            attn_mask=step.context_mask,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.reshape(q.shape[0], -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _eos_ids(config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:  # type: ignore[no-untyped-def]
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(source)
    return frozenset(ids)

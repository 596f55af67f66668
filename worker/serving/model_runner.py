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
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.serving.cpu_kernels import SmallGemm, small_gemm
from worker.serving.kv_cache import BLOCK_SIZE, BlockManager, CacheShape, KVCache
from worker.serving.linear import KERNEL_TOKENS, SMALL_STEP_TOKENS, Linear
from worker.serving.lora import AdapterWeights, LoraBatch, LoraStacker
from worker.serving.sequence import Sequence

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LayerWeights:
    """One decoder layer with the projections that share an input fused into one weight."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear  # [q_out + 2 * kv_out, D]; Qwen2 has q/k/v biases
    o: Linear
    gate_up: Linear  # [2 * intermediate, D]
    down: Linear

    @classmethod
    def fuse(cls, layer: Any, *, kernel: SmallGemm | None, transposed_copy: bool) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        qkv_bias = torch.cat(biases) if all(b is not None for b in biases) else None
        both: dict[str, Any] = {"kernel": kernel, "transposed_copy": transposed_copy}
        return cls(
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            qkv=Linear(
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv_bias, **both
            ),
            o=Linear(attn.o_proj.weight, None, **both),
            gate_up=Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None, **both),
            down=Linear(mlp.down_proj.weight, None, **both),
        )


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
    # Decode with drafts (speculation): some sequences feed several tokens. Their queries are padded
    # to [B, Q]: query_index picks each (b, i) from the flat tokens, query_valid maps back.
    query_index: torch.Tensor | None = None  # [B, Q] into the T flat tokens (padding → 0)
    query_valid: torch.Tensor | None = None  # [T] positions of the real queries in the [B * Q] grid


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str,
        kv_cache_bytes: int,
        max_model_len: int | None,
        small_step_weights: bool = True,
        device: str = "auto",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.device = resolve_device(device)
        # The small-step paths only pay off on the CPU; cuBLAS reads either layout as fast.
        small_step_weights = small_step_weights and self.device.type == "cpu"
        self.kernel = small_gemm() if small_step_weights and self.dtype == torch.float32 else None
        self._small_step_tokens = KERNEL_TOKENS if self.kernel is not None else SMALL_STEP_TOKENS
        self._cpu_threads = torch.get_num_threads()
        self._small_step_one_thread = small_step_weights
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        model.to(self.device)
        model.eval().requires_grad_(False)
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the serving engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models, not {config.model_type}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"the serving engine runs SiLU-gated MLPs, not {config.hidden_act}")
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_slices = {
            "q_proj": slice(0, q_out),
            "k_proj": slice(q_out, q_out + kv_out),
            "v_proj": slice(q_out + kv_out, q_out + 2 * kv_out),
        }
        intermediate = config.intermediate_size
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
        self.last_hidden: torch.Tensor | None = None
        self.step_hidden: torch.Tensor | None = None
        self.eos_token_ids = _eos_ids(config, self.tokenizer)
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        small: dict[str, Any] = {"kernel": self.kernel, "transposed_copy": small_step_weights}
        self.lm_head = Linear(model.lm_head.weight, None, **small)
        self.cos, self.sin = _rope_table(model, self.max_model_len, self.dtype)
        self.layers = [LayerWeights.fuse(layer, **small) for layer in model.model.layers]
        del model  # the unfused q/k/v and gate/up weights are freed; only the fused copies remain
        shape = CacheShape(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)
        num_blocks = KVCache.blocks_for_budget(shape, kv_cache_bytes)
        if BlockManager.blocks_needed(self.max_model_len) > num_blocks:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds {num_blocks * BLOCK_SIZE} tokens, less than one "
                f"{self.max_model_len}-token sequence: raise --kv-cache-bytes or lower the context"
            )
        self.cache = KVCache(shape, num_blocks, self.device)
        self.stacker = LoraStacker()
        self.module_shapes = _module_shapes(self.layers[0], self.qkv_slices, self.gate_up_slices)

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
            input_ids=self._on_device(ids),
            positions=self._on_device(positions),
            slot_mapping=self._on_device(slots),
            token_adapter=self._on_device(token_adapter),
            adapters=adapters,
            logits_indices=self._on_device(last),
            prefill_lengths=lengths,
        )

    def _on_device(self, values: list[int] | torch.Tensor) -> torch.Tensor:
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
        return tensor.to(self.device, non_blocking=True)

    def decode_input(
        self,
        seqs: list[Sequence],
        adapters: list[AdapterWeights],
        owner: list[int],
        drafts: list[list[int]] | None = None,
    ) -> StepInput:
        """One token per sequence, or with `drafts` its last token plus the drafts to verify.

        Logits come back for every fed token (in order); the caller slices them per sequence.
        """
        drafts = drafts or [[] for _ in seqs]
        fed = [1 + len(d) for d in drafts]
        totals = [len(seq) + len(d) for seq, d in zip(seqs, drafts, strict=True)]  # context incl. drafts
        longest = max(totals)
        lengths = torch.tensor(totals)
        tables = torch.zeros(len(seqs), max(len(seq.block_table) for seq in seqs), dtype=torch.long)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table)
        # [B, blocks] → [B, blocks*16] slots, cut to the longest context; padding is masked below.
        context = (tables[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(len(seqs), -1)[
            :, :longest
        ]
        ids = [t for seq, d in zip(seqs, drafts, strict=True) for t in [seq.all_token_ids[-1], *d]]
        positions = torch.tensor(
            [len(seq) - 1 + i for seq, n in zip(seqs, fed, strict=True) for i in range(n)]
        )
        rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(fed))
        step = StepInput(
            input_ids=self._on_device(ids),
            positions=self._on_device(positions),
            slot_mapping=self._on_device(context[rows, positions]),
            token_adapter=self._on_device([o for o, n in zip(owner, fed, strict=True) for _ in range(n)]),
            adapters=adapters,
            logits_indices=self._on_device(torch.arange(len(ids))),
            context_slots=self._on_device(context),
            context_flat=self._on_device(context.reshape(-1)),
        )
        keys = torch.arange(longest)[None, None, :]
        if max(fed) == 1:
            step.context_mask = self._on_device((keys < lengths[:, None, None])[:, None])  # [B, 1, 1, L]
            return step
        width = max(fed)
        query = torch.arange(width)[None, :]  # [1, Q]
        valid = query < torch.tensor(fed)[:, None]  # [B, Q]
        starts = torch.tensor([0, *torch.tensor(fed).cumsum(0)[:-1].tolist()])
        step.query_index = self._on_device(torch.where(valid, starts[:, None] + query, 0))
        step.query_valid = self._on_device(valid.reshape(-1).nonzero().squeeze(1))
        # Query i of sequence b sits at absolute position (total_b - fed_b + i): causal up to it.
        last_visible = (lengths - torch.tensor(fed))[:, None] + query  # [B, Q]
        mask = keys <= last_visible[:, :, None]  # [B, Q, L]
        mask[:, :, 0] = True  # padded queries see one key (no all-masked rows, no NaN); discarded anyway
        step.context_mask = self._on_device(mask[:, None])  # [B, 1, Q, L]
        return step

    # --- the forward pass --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Next-token logits `[B, V]` (float32) for each sequence of the step."""
        if self._small_step_one_thread:
            self._pick_threads(step.input_ids.shape[0])
        lora = LoraBatch(self.stacker.stacks(step.adapters), step.token_adapter)
        cos = self.cos.index_select(0, step.positions)[:, None, :]  # [T, 1, hd]
        sin = self.sin.index_select(0, step.positions)[:, None, :]
        hidden = F.embedding(step.input_ids, self.embed)  # [T, D]
        for index, weights in enumerate(self.layers):
            hidden = self._layer(index, weights, hidden, cos, sin, step, lora)
        # Every fed token's final-norm state: an eagle draft layer commits prefill's whole prompt.
        self.step_hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.final_norm, self.eps)  # [T, D]
        hidden = self.step_hidden.index_select(0, step.logits_indices)
        self.last_hidden = hidden  # [B or T, D] final-norm states: what speculator heads read
        return self.lm_head(hidden).float()

    def _pick_threads(self, tokens: int) -> None:
        """One intra-op thread for tiny steps, all of them otherwise.

        A single stream's GEMVs are memory-bound: a second OpenMP thread adds little bandwidth, and any
        other runnable thread (the HTTP server's event loop, woken for every token) stalls the OpenMP
        barrier it waits on. (The small-step kernel splits its GEMMs with a thread of its own instead,
        see cpu_kernels/small_gemm.c.) Measured on this 2-core CPU, smollm2-135m fp32 single stream through
        AsyncEngine: 25.5 tok/s with one thread vs 23-24 with two; 32-row steps need both.
        """
        wanted = 1 if tokens <= self._small_step_tokens else self._cpu_threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _layer(
        self,
        index: int,
        w: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        step: StepInput,
        lora: LoraBatch,
    ) -> torch.Tensor:
        tokens, width = hidden.shape
        x = F.rms_norm(hidden, (width,), w.input_norm, self.eps)
        qkv = w.qkv(x)  # [T, (H + 2 KV) * hd]
        lora.apply(index, "qkv", x, qkv, self.qkv_slices)
        heads = qkv.view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        rotated = heads[:, : self.num_heads + self.num_kv_heads]  # q and k heads, roped together
        rotated = rotated * cos + _rotate_half(rotated) * sin
        q, k = rotated[:, : self.num_heads], rotated[:, self.num_heads :]
        v = heads[:, self.num_heads + self.num_kv_heads :]
        self.cache.keys[index].index_copy_(0, step.slot_mapping, k)
        self.cache.values[index].index_copy_(0, step.slot_mapping, v)
        if step.prefill_lengths is not None:
            out = self._prefill_attention(q, k, v, step.prefill_lengths)
        else:
            out = self._decode_attention(index, q, step)
        o = w.o(out)
        lora.apply(index, "o", out, o, self.o_slices)
        hidden = hidden + o
        x = F.rms_norm(hidden, (width,), w.post_norm, self.eps)
        gate_up = w.gate_up(x)  # [T, 2 * I]
        lora.apply(index, "gate_up", x, gate_up, self.gate_up_slices)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate).mul_(up)
        down = w.down(act)
        lora.apply(index, "down", act, down, self.down_slices)
        return hidden + down

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
        # One query per sequence [B, H, 1, hd], or its padded queries [B, Q, H, hd] → [B, H, Q, hd].
        queries = q[:, :, None, :] if step.query_index is None else q[step.query_index].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=step.context_mask, scale=self.scale, enable_gqa=True
        )
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA GPU here")
    return resolved


def _rope_table(model: Any, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every position, from the model's own rotary module (so RoPE scaling variants match)."""
    device = model.lm_head.weight.device
    positions = torch.arange(max_len, device=device)[None, :]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
    return cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]


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

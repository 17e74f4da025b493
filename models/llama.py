"""A minimal Llama decoder, module-for-module the same tree as transformers' ``LlamaForCausalLM``.

Parameter names are Hugging Face's (``model.layers.N.self_attn.q_proj.weight``, ...), so an HF state dict loads
with no renaming and LoRA/PEFT module paths are identical.

    tokens (B, T)
      -> embed_tokens                                   (B, T, hidden)
      -> N x [ h = h + Attention(RMSNorm(h))            grouped-query attention with RoPE
               h = h + MLP(RMSNorm(h)) ]                SwiGLU: down(silu(gate(x)) * up(x))
      -> RMSNorm -> lm_head                             (B, T, vocab)

References: Touvron et al. 2023 ("LLaMA", section 2.2: pre-normalisation with RMSNorm, SwiGLU, RoPE);
Ainslie et al. 2023 (GQA); transformers ``models/llama/modeling_llama.py`` (the numerics we match).

Attention masks: a padding mask (B, T_k) of 1/0, and optionally ``document_ids`` (B, T) so that packed
sequences attend only within their own document. Both are folded into one boolean mask for PyTorch's
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig
from .fused import GATE_UP, QKV, FusedProjections
from .loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss, chunked_causal_lm_loss
from .norm import RMSNorm
from .recompute import recompute_saved
from .rope import RotaryEmbedding, apply_rotary


class MLP(FusedProjections):
    """SwiGLU feed-forward (Shazeer 2020): down_proj(silu(gate_proj(x)) * up_proj(x)); gate and up from one
    matmul over a frozen base when ``fused_projections`` is set (models/fused.py)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        gate, up = self.project(x, GATE_UP)
        product = swiglu(gate, up)
        if not (recompute and product.requires_grad):
            return self.down_proj(product)
        # Selective recomputation (models/recompute.py): the product is made again from gate and up, which
        # SwiGLU saves anyway, instead of down_proj's backward keeping it (N x I).
        gate, up = gate.detach(), up.detach()
        with recompute_saved(product, lambda: F.silu(gate) * up):
            return self.down_proj(product)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up for backward (autograd would also save silu(gate), N x I more):
    silu is recomputed in backward, and its gradient is aten's silu_backward, so the gradients are bitwise
    those of ``F.silu(gate) * up`` under autograd."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020); through ``SwiGLU`` when a backward will need it."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLU.apply(gate, up)
    return F.silu(gate) * up


# F.scaled_dot_product_attention(..., enable_gqa=True) exists from torch 2.5; older versions repeat k and v.
SDPA_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA without SDPA's enable_gqa: each key/value head serves n_rep consecutive query heads."""
    B, kv, T_k, d = x.shape
    # (B, kv, T_k, d) -> (B, kv, n_rep, T_k, d) -> (B, kv * n_rep, T_k, d)
    return x[:, :, None].expand(B, kv, n_rep, T_k, d).reshape(B, kv * n_rep, T_k, d)


class KVCache:
    """Keys and values of past tokens, one (k, v) pair per layer, each (B, num_key_value_heads, T_past, head_dim).

    Kept in the un-repeated GQA layout: the cache is num_attention_heads / num_key_value_heads times smaller.
    """

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(FusedProjections):
    """Multi-head attention with grouped-query key/value heads and rotary embeddings; q, k and v from one matmul
    over a frozen base when ``fused_projections`` is set (models/fused.py)."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, QKV)
        # (B, T, heads * head_dim) -> (B, T, heads, head_dim) -> (B, heads, T, head_dim)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        n_rep = self.num_heads // self.num_kv_heads
        gqa = n_rep > 1 and SDPA_ENABLE_GQA
        if n_rep > 1 and not gqa:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        # With enable_gqa SDPA reads each key/value head for its n_rep query heads itself: the repeated k and v
        # are neither made nor saved for backward (same output; dk, dv summed over the group in another order).
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, heads * head_dim)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None, recompute: bool = False):
        """``recompute``: selective recomputation of the RMSNorm outputs and the SwiGLU product."""
        recompute = recompute and torch.is_grad_enabled()
        with self._recomputed_norm(self.input_layernorm, h, recompute) as x:
            h = h + self.self_attn(x, cos, sin, mask, cache)
        with self._recomputed_norm(self.post_attention_layernorm, h, recompute) as x:
            return h + self.mlp(x, recompute)

    @contextlib.contextmanager
    def _recomputed_norm(self, norm: RMSNorm, h: torch.Tensor, recompute: bool):
        """Yield norm(h); with ``recompute``, the norm saves only h (models/norm.py), and its output, or a cast
        of it (an adapter of another dtype), is made again from h wherever autograd would save it
        (models/recompute.py)."""
        if not (recompute and h.requires_grad):
            yield norm(h, recompute)
            return
        if isinstance(norm, RMSNorm):
            x, remake = norm.forward_recomputable(h)  # the output again from what the norm keeps anyway
        else:  # wrapped (modules_to_save): the norm run again, whole
            x, h_kept = norm(h, recompute), h.detach()
            remake = lambda: norm(h_kept)  # noqa: E731
        with recompute_saved(x, remake):
            yield x


def build_attention_mask(T_q: int, T_k: int, attention_mask: torch.Tensor | None,
                         document_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T_q, T_k), True where a query may attend to a key; None for plain causal.

    Queries are the last T_q of T_k positions (the rest come from the KV cache). A query row that would see no
    key at all (a padding token under left padding) is allowed to see itself, so softmax never divides by zero;
    its output is junk but finite and its label is -100.
    """
    if attention_mask is None and document_ids is None:
        return None
    q_pos = torch.arange(T_k - T_q, T_k, device=device)
    k_pos = torch.arange(T_k, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T_q, T_k) causal
    if attention_mask is not None:
        if attention_mask.shape[-1] != T_k:
            raise ValueError(f"attention_mask has length {attention_mask.shape[-1]}, expected {T_k} "
                             "(past + current tokens)")
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T_k): hide padded keys
    if document_ids is not None:
        if T_q != T_k:
            raise ValueError("document_ids cannot be combined with a KV cache")
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        mask = mask & same_doc[:, None]
    diagonal = (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask | (diagonal & ~mask.any(dim=-1, keepdim=True))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # Recompute each block's activations in backward instead of storing them (Chen et al. 2016).
        self.gradient_checkpointing = False
        # Recompute only the cheap elementwise outputs (Korthikanti et al. 2022, section 5; models/recompute.py).
        self.selective_recompute = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, document_ids=None, cache=None):
        B, T = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        if attention_mask is None and past > 0 and T > 1:
            # SDPA's is_causal aligns the mask top-left, which is wrong once a cache shifts the queries.
            attention_mask = torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device)
        mask = build_attention_mask(T, past + T, attention_mask, document_ids, input_ids.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing works with frozen inputs (LoRA) and replays RNG (dropout masks).
                h = checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, self.selective_recompute)
        return self.norm(h, self.selective_recompute)


@dataclasses.dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    cache: KVCache | None = None


class LlamaForCausalLM(nn.Module):
    """Llama with a language-modelling head. ``lm_head.weight`` is ``embed_tokens.weight`` when tied."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # With labels, compute the loss from the hidden states in chunks (models/loss.py) and return no logits;
        # the training recipes turn it on, evaluation and parity checks that need logits keep it off.
        self.chunked_loss = False
        self.loss_chunk_tokens = DEFAULT_CHUNK_TOKENS
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as transformers does: normal(0, initializer_range) for linears and embeddings."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: int64 (B, T).
            attention_mask: (B, T_past + T) with 1 for real tokens, 0 for padding; None means no padding.
            position_ids: int64 (B, T); default: past_len .. past_len + T - 1 for every row. Left-padded batches
                should pass their own (e.g. ``attention_mask.cumsum(-1) - 1``).
            document_ids: int (B, T); tokens attend only to earlier tokens with the same id (packed sequences).
            labels: int64 (B, T), -100 where no loss is taken. Shifted inside: logits at t predict labels[t+1].
            num_items_in_batch: if given, the loss is sum / num_items_in_batch (so gradient accumulation over
                micro-batches can normalise by the tokens of the whole optimizer step); else the mean over the
                label tokens of this batch (0.0, not NaN, when there are none).
            cache: a ``KVCache`` to read and extend (generation).
            logits_to_keep: if > 0, only the last ``logits_to_keep`` positions get logits (generation).

        Returns:
            ``CausalLMOutput(loss, logits, cache)``; logits (B, T or logits_to_keep, vocab) in the model dtype,
            or None when ``chunked_loss`` computed the loss without them.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        h = self.model(input_ids, attention_mask, position_ids, document_ids, cache)
        if labels is not None and self._use_chunked_loss(cache, logits_to_keep):
            loss = chunked_causal_lm_loss(h, self.lm_head.weight, labels, num_items_in_batch, self.loss_chunk_tokens)
            return CausalLMOutput(loss=loss, logits=None, cache=cache)
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return CausalLMOutput(loss=loss, logits=logits, cache=cache)

    def _use_chunked_loss(self, cache: KVCache | None, logits_to_keep: int) -> bool:
        """The chunked loss needs the head as a plain bias-free linear with a local weight (not a LoRA- or
        NF4-wrapped head, not an FSDP-sharded DTensor) and all positions' hidden states."""
        head = self.lm_head
        return (self.chunked_loss and cache is None and logits_to_keep == 0 and type(head) is nn.Linear
                and head.bias is None and type(head.weight) in (torch.Tensor, nn.Parameter))

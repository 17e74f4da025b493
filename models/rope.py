"""Rotary position embeddings (RoPE), with the ``llama3`` frequency scaling of Llama 3.1.

RoPE (Su et al. 2021, "RoFormer", section 3.4) rotates each pair of query/key features by an angle
proportional to the token's position, so the dot product q.k depends only on the distance between tokens.
Hugging Face's Llama pairs feature ``j`` with feature ``j + head_dim/2`` (the "rotate half" layout), not
adjacent features; checkpoints in HF layout assume it (llama.cpp's GGUF files use adjacent pairs, which is why
the GGUF converter permutes q/k rows).

Llama 3.1's scaling (transformers ``modeling_rope_utils._compute_llama3_parameters``): wavelengths shorter than
``original_max_position_embeddings / high_freq_factor`` keep their frequency, those longer than
``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and the band in between is a
linear blend of the two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for i in [0, head_dim/2), after the config's scaling.

    Returns:
        fp32 tensor of shape (head_dim // 2,), in radians per position.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if config.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, blend linearly in 1/wavelength (the "smooth" factor of the Llama 3.1 release).
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given positions. Holds no trainable state.

    ``inv_freq`` is an fp32 buffer that no dtype cast reaches: ``model.to(torch.bfloat16)``, ``.half()`` and
    ``.bfloat16()`` leave it bitwise unchanged (a bf16 copy moves cos/sin at position 32767 by up to ~1.9), and a
    device move moves its fp32 bits. It is not saved (``persistent=False``), so loading a checkpoint never
    replaces it either. The guard sits in ``_apply``, where every ``nn.Module`` cast and move happens.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_inv_freq(self, device: torch.device | str = "cpu") -> None:
        """Recompute the buffer (after building the model on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def _apply(self, fn, recurse=True):
        # nn.Module.to/half/bfloat16/cuda all end here with a function applied to every tensor; take only the
        # device of its result, never its dtype.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        if inv_freq.is_meta:  # built on the meta device: there are no bits to keep, compute them where they go
            self.inv_freq = rope_inv_freq(self.config, device=device) if device.type != "meta" else self.inv_freq
        else:
            self.inv_freq = inv_freq.to(device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (B, T, head_dim), computed in fp32 then cast to ``dtype`` (as transformers does).

        Args:
            position_ids: int tensor (B, T).
        """
        # (B, T, 1) * (1, 1, head_dim/2) -> (B, T, head_dim/2); fp32 so large positions keep their precision.
        assert self.inv_freq.dtype == torch.float32, "RoPE inverse frequencies must stay fp32"
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): the same angle for j and j + head_dim/2
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys. x: (B, H, T, head_dim); cos, sin: (B, T, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim): broadcast over heads
    return x * cos + rotate_half(x) * sin

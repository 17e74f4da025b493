"""Text generation with a KV cache: greedy decoding, or temperature + nucleus (top-p) sampling.

The prompt is run once to fill the cache (prefill); then each step feeds only the newest token, so a step costs
one token's worth of matmuls instead of the whole sequence's. Top-p keeps the smallest set of most-likely tokens
whose probabilities sum to at least p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
section 3.1).
"""

from __future__ import annotations

import torch

from finetune_ref.models.llama import KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row. logits: (B, vocab) -> int64 (B,).

    temperature 0 is greedy (argmax). Raises ValueError for temperature < 0 or top_p outside (0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: set[int] | None = None, seed: int | None = None) -> list[int]:
    """Generate up to ``max_new_tokens`` after ``input_ids``; stops early at any id in ``stop_ids``.

    Returns the new token ids (the stop token, if reached, included). One sequence at a time, no padding:
    the reference that ``models.batching`` (several rows, left-padded, joining and leaving) is tested against.
    """
    if not input_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.config.num_hidden_layers)
    tokens = torch.tensor([input_ids], device=device)  # (1, T_prompt): prefill
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens, cache=cache, logits_to_keep=1).logits[:, -1]  # (1, vocab)
        next_id = sample_next(logits, temperature, top_p, generator)
        new.append(int(next_id))
        if stop_ids and new[-1] in stop_ids:
            break
        tokens = next_id[:, None]  # (1, 1): only the new token goes through the model
    return new

"""Batched generation with a KV cache: left padding, per-row positions, stops and sampling, rows that join and
leave between decode steps (continuous batching).

A batch holds one KV cache (B, kv_heads, L, head_dim) per layer and a key mask (B, L). Rows are *left*-padded, so
every row's newest token is in the last column and one decode step feeds one token per row:

    row 0:  [pad pad  p0  p1  p2 | g0 g1]        mask 0 0 1 1 1 1 1     next position 5
    row 1:  [ q0  q1  q2  q3  q4 | h0 h1]        mask 1 1 1 1 1 1 1     next position 7

Padding is invisible: padded keys are masked out of attention, and positions count only a row's own tokens
(``attention_mask.cumsum(-1) - 1``, as transformers' ``generate`` does), so RoPE sees each row as if it ran alone.
Each row keeps its own length (its next position); the cache is as long as the longest row.

Continuous batching (Yu et al. 2022, "Orca", section 3.2: iteration-level scheduling): ``add`` prefills new rows
(left-padded among themselves) and splices their caches into the running batch, padding the shorter side on the
left; ``retire`` drops finished rows and the leading cache columns no remaining row needs. So a long request never
holds back a short one, and the serving loop admits requests between any two decode steps.

Stops, per row: a stop token (EOS; kept in ``new_ids``, not in ``text``), ``max_new_tokens`` or the model's context
(finish reason "length"), or a stop string (``text`` cut before it, finish reason "stop", as OpenAI's API does).
Sampling, per row: greedy (temperature 0) or temperature + top-p with the row's own seeded generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from finetune_ref.models.generate import sample_next
from finetune_ref.models.llama import KVCache


@dataclasses.dataclass(eq=False)
class Row:
    """One sequence being generated: its request (the fields up to ``adapter``) and its state.

    ``adapter`` is not used here; it travels with the row for the ``on_rows`` hook (e.g. per-row LoRA adapters).
    """

    prompt: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    adapter: str | None = None
    new_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    emitted: int = 0  # characters of ``text`` handed out by ``take_text``
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        sample_next(torch.zeros(1, 1), self.temperature, self.top_p)  # ValueError for bad settings, here
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        """The text not handed out yet that can no longer change: while running, hold back a possible start of
        a stop string and an incomplete UTF-8 character (decoded as U+FFFD)."""
        end = len(self.text)
        if not self.finished:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            end -= max((len(s) for s in self.stop_strings), default=1) - 1
        delta = self.text[self.emitted:max(end, self.emitted)]
        self.emitted += len(delta)
        return delta


class DecodeBatch:
    """The running batch: rows, their KV cache (left-padded) and key mask.

    Args:
        model: a causal LM taking (input_ids, attention_mask, position_ids, cache, logits_to_keep).
        decode: ids -> text (skipping special tokens), for ``Row.text`` and stop strings; None: no text.
        on_rows: called with the rows of a forward, in batch order, before it whenever they changed (set per-row
            state there, e.g. ``lora.mixed.set_row_adapters``).
        max_length: the model's context; a row reaching it finishes with "length".
    """

    def __init__(self, model, decode: Callable[[list[int]], str] | None = None,
                 on_rows: Callable[[list[Row]], None] | None = None, max_length: int | None = None):
        self.model = model
        self.decode = decode
        self.on_rows = on_rows
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        self.rows: list[Row] = []
        self.cache = KVCache(self.num_layers)
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, L): True for a real token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,): each row's next position
        self._last_rows: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def refresh_rows(self) -> None:
        """Call ``on_rows`` again before the next forward (e.g. after adapters were loaded or unloaded)."""
        self._last_rows = None

    def _forward(self, rows: list[Row], ids, mask, positions, cache) -> torch.Tensor:
        key = tuple(id(r) for r in rows)
        if self.on_rows is not None and key != self._last_rows:
            self.on_rows(rows)
            self._last_rows = key
        return self.model(ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` together (left-padded), pick their first tokens, and join them to the batch."""
        rows = list(rows)
        if not rows:
            return
        for row in rows:
            if self.max_length is not None and len(row.prompt) >= self.max_length:
                raise ValueError(f"the prompt has {len(row.prompt)} tokens; the model's context is "
                                 f"{self.max_length}, leaving no room to generate")
            if row.seed is not None and row.generator is None:
                row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
        L = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long, device=self.device)  # (n, L), left-padded with 0
        mask = torch.zeros(len(rows), L, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            ids[i, L - len(r.prompt):] = torch.tensor(r.prompt, device=self.device)
            mask[i, L - len(r.prompt):] = True
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (n, L): 0.. over each row's own tokens
        cache = KVCache(self.num_layers)
        logits = self._forward(rows, ids, mask, positions, cache)  # (n, vocab)
        self._splice(rows, cache, mask, torch.tensor([len(r.prompt) for r in rows], device=self.device))
        self._accept(rows, logits)

    def _splice(self, rows: list[Row], cache: KVCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Append rows with their own cache (n, kv, L2, d) to the batch's (B, kv, L1, d), left-padding the shorter."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = list(rows), cache, mask, positions
            return
        L = max(self.mask.shape[1], mask.shape[1])

        def pad_left(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = L - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for layer in range(self.num_layers):
            (k1, v1), (k2, v2) = self.cache.layers[layer], cache.layers[layer]
            self.cache.layers[layer] = (torch.cat([pad_left(k1, 2), pad_left(k2, 2)]),  # (B + n, kv, L, d)
                                        torch.cat([pad_left(v1, 2), pad_left(v2, 2)]))
        self.mask = torch.cat([pad_left(self.mask, 1), pad_left(mask, 1)])  # (B + n, L)
        self.positions = torch.cat([self.positions, positions])
        self.rows = self.rows + list(rows)

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits (n, vocab) and apply the stops."""
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.finished:
                continue
            token = greedy[i] if row.temperature == 0 else int(
                sample_next(logits[i:i + 1], row.temperature, row.top_p, row.generator))
            row.new_ids.append(token)
            if token in row.stop_ids:
                row.finish_reason = "stop"
            elif len(row.new_ids) >= row.max_new_tokens or (
                    self.max_length is not None and len(row.prompt) + len(row.new_ids) >= self.max_length):
                row.finish_reason = "length"
            if self.decode is not None:
                ids = row.new_ids[:-1] if row.finish_reason == "stop" else row.new_ids
                row.text = self.decode(ids)
                cuts = [row.text.find(s) for s in row.stop_strings]
                cuts = [c for c in cuts if c >= 0]
                if cuts:
                    row.text = row.text[:min(cuts)]
                    row.finish_reason = "stop"

    @torch.no_grad()
    def step(self) -> None:
        """One decode step: every unfinished row gets one more token (finished rows are carried along; retire
        them to stop paying for them)."""
        if not self.rows:
            return
        last = torch.tensor([r.new_ids[-1] for r in self.rows], device=self.device)[:, None]  # (B, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, L + 1)
        logits = self._forward(self.rows, last, self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        self._accept(self.rows, logits)

    def retire(self, also: Callable[[Row], bool] | None = None) -> list[Row]:
        """Remove finished rows (and those for which ``also(row)`` is true) and return them."""
        gone = [r for r in self.rows if r.finished or (also is not None and also(r))]
        if not gone:
            return []
        keep = [i for i, r in enumerate(self.rows) if not (r.finished or (also is not None and also(r)))]
        if not keep:
            self.__init__(self.model, self.decode, self.on_rows, self.max_length)
            return gone
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]  # (B', L)
        first = int(mask.any(dim=0).nonzero()[0])  # leading columns no remaining row uses
        self.mask = mask[:, first:]
        for layer in range(self.num_layers):
            k, v = self.cache.layers[layer]
            self.cache.layers[layer] = (k[index, :, first:], v[index, :, first:])  # (B', kv, L', d)
        self.positions = self.positions[index]
        self.rows = [self.rows[i] for i in keep]
        return gone


def generate_batch(model, rows: Sequence[Row], decode: Callable[[list[int]], str] | None = None,
                   on_rows: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Generate every row to its stop in one batch (finished rows retire as they go); returns ``rows``."""
    model.eval()
    batch = DecodeBatch(model, decode=decode, on_rows=on_rows)
    batch.add(rows)
    batch.retire()
    while len(batch):
        batch.step()
        batch.retire()
    return list(rows)

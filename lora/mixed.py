"""Mixed-adapter batches: one base model, each row of a batch with its own LoRA adapter (or none).

Serving many fine-tunes of one base (Hu et al. 2021, section 1: "many small LoRA modules for different
tasks") means a batch whose rows want different adapters. The base matmul x W^T is shared by every row; only
the low-rank part differs, so it is computed per row from that row's A and B:

    h[b] = x[b] W^T + scaling[i_b] * B[i_b] (A[i_b] x[b])       i_b: the adapter index of row b, or -1: none

Two equal ways to compute the low-rank part, both plain PyTorch references:

* ``lora_bgmv``: gather each row's A/B from stacked (n_adapters, r_max, in) / (n_adapters, out, r_max) tensors
  and run one batched matmul: Punica's BGMV ("batched gather matrix-vector", Chen et al. 2023, section 4)
  and S-LoRA's MBGMV for adapters of different ranks (Sheng et al. 2023, section 5.2), where smaller ranks are
  padded with zero rows of A and zero columns of B, which adds exact zeros.
* ``lora_sgmv``: group the rows by adapter and run each group's plain LoRA forward (Punica's SGMV "segmented"
  form; it is what PEFT's ``adapter_names`` forward does, peft/tuners/lora/layer.py ``_mixed_batch_forward``).

``kernels/lora_bgmv.py`` holds the Triton kernel of the gathered form (shrink x A^T, then expand by B^T).

The per-row choice reaches every ``LoRALinear`` through ``set_row_adapters(model, names)``: one name per row
("__base__", PEFT's placeholder, or None for the base alone), kept until ``clear_row_adapters``. While it is set,
a layer's forward ignores its active adapters and uses the rows' own. As in PEFT, this is inference only
(ValueError in training mode) and an adapter merged into the base weights cannot be chosen per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from finetune_ref.lora.adapters import adapter_names
from finetune_ref.lora.inject import embedding_layers, lora_layers, token_layers

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names

# (x (B, T, in), A (n, r, in), B (n, out, r), scaling (n,), indices (B,)) -> (B, T, out)
BGMV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def stack_adapters(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack adapters of ranks r_i into (n, r_max, in) and (n, out, r_max), zero-padding the smaller ranks.

    The zero rows of A give zeros in A x, and the zero columns of B multiply them: the padded adapter computes
    the same sum as the unpadded one plus exact zeros (S-LoRA, section 5.2).
    """
    r_max = max(a.shape[0] for a in lora_As)
    in_features, out_features = lora_As[0].shape[1], lora_Bs[0].shape[0]
    A = lora_As[0].new_zeros(len(lora_As), r_max, in_features)
    B = lora_Bs[0].new_zeros(len(lora_Bs), out_features, r_max)
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        A[i, : a.shape[0]] = a
        B[i, :, : b.shape[1]] = b
    return A, B


def lora_bgmv(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
              indices: torch.Tensor) -> torch.Tensor:
    """Gathered low-rank update of every row: scaling[i_b] * B[i_b] (A[i_b] x[b]); 0 where i_b = -1.

    Args:
        x: (B, T, in).  lora_A: (n, r, in).  lora_B: (n, out, r).  scaling: (n,) fp32.
        indices: int64 (B,), the adapter of each row, -1 for none.

    Returns:
        (B, T, out) in x's dtype.
    """
    assert x.dim() == 3 and indices.shape == (x.shape[0],), (x.shape, indices.shape)
    use = indices.clamp(min=0)  # rows without an adapter gather adapter 0, then get scale 0
    A = lora_A[use]  # (B, r, in)
    B = lora_B[use]  # (B, out, r)
    scale = torch.where(indices >= 0, scaling.to(x.dtype)[use], torch.zeros((), dtype=x.dtype, device=x.device))
    shrunk = torch.bmm(x, A.transpose(1, 2))  # (B, T, in) @ (B, in, r) -> (B, T, r)
    return torch.bmm(shrunk, B.transpose(1, 2)) * scale[:, None, None]  # (B, T, r) @ (B, r, out) -> (B, T, out)


def lora_sgmv(x: torch.Tensor, lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
              scalings: Sequence[float], indices: torch.Tensor) -> torch.Tensor:
    """The same update, one group of rows per adapter (unpadded ranks); PEFT's ``_mixed_batch_forward`` order:
    B(A(x)) * scaling for the rows of each adapter.

    Args:
        x: (B, T, in).  lora_As[i]: (r_i, in).  lora_Bs[i]: (out, r_i).  indices: int64 (B,), -1 for none.
    """
    out = x.new_zeros(*x.shape[:-1], lora_Bs[0].shape[0])  # (B, T, out)
    for i in indices.unique().tolist():
        if i < 0:
            continue
        rows = (indices == i).nonzero().squeeze(1)  # (rows of adapter i,)
        part = x[rows]  # (n_i, T, in)
        out[rows] = (part @ lora_As[i].T @ lora_Bs[i].T) * scalings[i]
    return out


# ---------------------------------------------------------------------------------------------------------
# The per-row choice on a model's LoRALinear layers
# ---------------------------------------------------------------------------------------------------------

class RowAdapters:
    """One layer's view of a mixed batch: the adapters it carries, stacked, and each row's index into them.

    Built by ``set_row_adapters`` once per batch composition and shared by the forward passes until the next
    call (a decode step reuses it), so stacking costs nothing per token.
    """

    def __init__(self, layer: nn.Module, names: Sequence[str | None], bgmv: BGMV | None,
                 previous: "RowAdapters | None" = None):
        # Every adapter the layer carries is stacked (sorted by name), so that a new batch composition reuses
        # the stack of the previous one (``previous``) and only the row indices change.
        carried = sorted(layer.lora_A.keys())
        self.names = list(names)
        self.carried = carried
        self.bgmv = bgmv or lora_bgmv
        self.empty = not any(n in layer.lora_A for n in names if n is not None)
        if self.empty:
            return
        position = {n: i for i, n in enumerate(carried)}
        if previous is not None and not previous.empty and previous.carried == carried:
            A, B, self.scaling = previous.lora_A, previous.lora_B, previous.scaling
        else:
            A, B = stack_adapters([layer.lora_A[n].weight.detach() for n in carried],
                                  [layer.lora_B[n].weight.detach() for n in carried])
            self.scaling = torch.tensor([layer.scaling[n] for n in carried], dtype=torch.float32, device=A.device)
        self.lora_A, self.lora_B = A, B  # (n, r_max, in), (n, out, r_max)
        self.indices = torch.tensor([position.get(n, -1) for n in names], dtype=torch.long, device=A.device)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, in) or (B, in) -> the rows' low-rank updates, same leading shape, in the adapters' dtype."""
        if x.shape[0] != len(self.names):
            raise ValueError(f"the batch has {x.shape[0]} rows but {len(self.names)} row adapters were set")
        x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])  # (B, ..., in) -> (B, T, in)
        out = self.bgmv(x3.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling, self.indices)
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (B, T, out) -> (B, ..., out)


def check_row_adapters(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    """The names with "__base__" turned into None; ValueError for an unknown or merged adapter, or training."""
    if isinstance(names, str):
        raise TypeError(f"row adapters are one name per row (a list), got the string {names!r}")
    if model.training:
        raise ValueError("per-row adapters are for inference: call model.eval() first (as PEFT's adapter_names)")
    rows = [None if n in (None, BASE_ADAPTER) else n for n in names]
    known = adapter_names(model)
    unknown = sorted({n for n in rows if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known} (or '{BASE_ADAPTER}' for none)")
    dora = sorted({n for _, layer in lora_layers(model) for n in rows if n is not None and layer.use_dora.get(n)})
    if dora:  # the gathered B(A(x)) has no DoRA form (PEFT: "Cannot pass `adapter_names` when DoRA is enabled")
        raise ValueError(f"adapters {dora} are DoRA adapters, which cannot be chosen per row; serve them one at a "
                         "time or merged")
    merged = sorted({m for _, layer in lora_layers(model) for m in layer.merged_adapters})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base weights; unmerge them before choosing "
                         "adapters per row")
    return rows


def set_row_adapters(model: nn.Module, names: Sequence[str | None], bgmv: BGMV | None = None) -> None:
    """From now on row b of every batch uses adapter ``names[b]`` (None or "__base__": the base alone).

    Args:
        bgmv: the gathered matmul to use (default ``lora_bgmv``; ``kernels.lora_bgmv.lora_bgmv_triton`` on CUDA).

    Raises:
        ValueError: unknown or merged adapter, or the model is in training mode.
    """
    rows = check_row_adapters(model, names)
    on_embedding = sorted({n for _, layer in embedding_layers(model) + token_layers(model) for n in names
                           if n in layer.adapter_names})
    if on_embedding:
        raise ValueError(f"adapters {on_embedding} adapt an embedding (LoRA or trainable tokens); per-row adapters "
                         "are supported on linear layers only")
    for _, layer in lora_layers(model):
        layer.row_adapters = RowAdapters(layer, rows, bgmv, previous=layer.row_adapters)


def clear_row_adapters(model: nn.Module) -> None:
    """Back to the active adapters for every row. Call it after changing adapter weights in place: the stacks
    of ``set_row_adapters`` are reused while the layer carries the same adapter names."""
    for _, layer in lora_layers(model):
        layer.row_adapters = None


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None], bgmv: BGMV | None = None) -> Iterator[nn.Module]:
    """Context manager form of ``set_row_adapters`` / ``clear_row_adapters``."""
    set_row_adapters(model, names, bgmv)
    try:
        yield model
    finally:
        clear_row_adapters(model)

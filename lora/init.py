"""Initialisations that move part of the base weight into the adapter: PiSSA and OLoRA.

Both start with W = W_res + s B0 A0 exactly (s = scaling), so the model is unchanged at step 0, but the adapter
starts on the most important directions of W instead of at zero, and the base is replaced by the residual W_res:

  PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation", section 3):
      W = U S V^T;  A0 = sqrt(S_r / s) V_r^T  (r, in),  B0 = U_r sqrt(S_r / s)  (out, r),  W_res = W - s B0 A0
      "pissa": the full SVD (torch.linalg.svd); "pissa_niter_K": the randomized SVD torch.svd_lowrank(W, r,
      niter=K) (Halko et al. 2011), which is random: it uses torch's global generator.
  OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation", section 3):
      W = Q R (thin QR);  A0 = R[:r]  (r, in),  B0 = Q[:, :r]  (out, r),  W_res = W - s B0 A0

The arithmetic is PEFT's (peft/tuners/lora/layer.py ``pissa_init``, ``olora_init``): in fp32, W_res rounded once
to W's dtype.

On a 4-bit base (qlora.nf4_linear.NF4Linear) only OLoRA runs, as in PEFT: ``olora_init`` dequantizes the bnb 4-bit
weight, takes the QR of it in fp32 and stores W_res quantized again (bnb ``Params4bit`` of the fp32 residual, so
the layer's stored dtype becomes fp32; ours re-quantizes with the layer's own blocksize and double quantization,
PEFT with bnb's default blocksize 64). W_res is then W_res rounded to the NF4 grid, so the model is NOT unchanged
at step 0: it moves by about one NF4 step, the rounding of the residual. PEFT's ``pissa_init`` refuses a
quantized weight ("initialize PiSSA under float32, float16, or bfloat16; subsequently, re-quantize the residual
model"), and so does this file.

Because the base changed, a trained adapter is only right on W_res. ``lora.peft_format.save_adapter`` therefore
writes it as a plain LoRA adapter on the original W, PEFT's conversion (peft/tuners/lora/model.py
``subtract_mutated_init``, ``path_initial_model_for_weight_conversion``): W + dW = W_res + s B A gives
dW = s (B A - B0 A0) = s' [B | -B0] [A ; A0] with rank 2r, s' = s (alpha doubled, or times sqrt(2) with rsLoRA).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from finetune_ref.lora.base_weight import dense_weight, is_quantized, write_dense_weight

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
MUTATING_INITS = ("pissa", "olora")  # plus "pissa_niter_K": inits that change the base weight


def is_mutating_init(init: object) -> bool:
    """True for "pissa", "pissa_niter_K" (K >= 1) and "olora": inits that rewrite the base weight."""
    return isinstance(init, str) and (init in MUTATING_INITS or pissa_niter(init) is not None)


def pissa_niter(init: str) -> int | None:
    """K of "pissa_niter_K" (K >= 1), else None."""
    m = _PISSA_NITER.fullmatch(init)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


@torch.no_grad()
def pissa_init(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r), W_res (out, in) in W's dtype) of PiSSA; A0, B0 in fp32.

    Args:
        niter: None for the exact SVD ("pissa"); K for ``torch.svd_lowrank(W, r, niter=K)`` ("pissa_niter_K").
    """
    w = weight.detach().to(torch.float32)  # (out, in)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (out, k), s (k,), vh (k, in)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scaling, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)  # u (out, r), s (r,), v (in, r)
        s_r, vh_r = s_r / scaling, v_r.t()
    lora_A = torch.diag(torch.sqrt(s_r)) @ vh_r  # (r, in)
    lora_B = u_r @ torch.diag(torch.sqrt(s_r))  # (out, r)
    residual = w - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual.to(weight.dtype)


@torch.no_grad()
def olora_init(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r), W_res (out, in) in W's dtype) of OLoRA; A0, B0 in fp32."""
    w = weight.detach().to(torch.float32)  # (out, in)
    q, rr = torch.linalg.qr(w)  # q (out, k), rr (k, in)
    lora_A, lora_B = rr[:r].contiguous(), q[:, :r].contiguous()
    residual = w - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual.to(weight.dtype)


def mutated_init(init: str, weight: torch.Tensor, r: int, scaling: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch "pissa" / "pissa_niter_K" / "olora" to the functions above."""
    if init == "olora":
        return olora_init(weight, r, scaling)
    if init == "pissa":
        return pissa_init(weight, r, scaling)
    niter = pissa_niter(init)
    if niter is None:
        raise ValueError(f"unknown init {init!r}: expected 'pissa', 'pissa_niter_K' (K >= 1) or 'olora'")
    return pissa_init(weight, r, scaling, niter)


def converted_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, init_A: torch.Tensor, init_B: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r plain LoRA on the original W equal to a PiSSA/OLoRA adapter on W_res (module docstring):
    A' = [A ; A0] (2r, in), B' = [B | -B0] (out, 2r) (peft subtract_mutated_init)."""
    return torch.cat([lora_A, init_A.to(lora_A.dtype)], dim=0), torch.cat([lora_B, -init_B.to(lora_B.dtype)], dim=1)


def rewrite_base_for_init(base_layer: nn.Module, init: str, r: int, scaling: float, *, merged: bool, use_dora: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run PiSSA/OLoRA on ``base_layer``: store W_res in it (re-quantized on a 4-bit base) and return (A0, B0) in
    fp32 (module docstring).

    Raises:
        ValueError: merged adapters or DoRA on the layer; PiSSA on a quantized base (PEFT refuses it too).
    """
    if merged or use_dora:
        raise ValueError(f"init_lora_weights={init!r} rewrites the base weight: it needs a base without merged "
                         "adapters and without DoRA")
    quantized = is_quantized(base_layer)
    if quantized and init != "olora":
        raise ValueError(f"init_lora_weights={init!r} needs a 16/32-bit base, as PEFT's pissa_init (\"initialize "
                         "PiSSA under float32, float16, or bfloat16; subsequently, re-quantize the residual model\"); "
                         "on a 4-bit base use 'olora' or LoftQ")
    weight = dense_weight(base_layer)  # (out, in); dequantized in the stored dtype on a 4-bit base, as bnb
    # On a 4-bit base PEFT quantizes the fp32 residual (Params4bit of it): keep it in fp32 for requantize_.
    init_A, init_B, residual = mutated_init(init, weight.float() if quantized else weight, r, scaling)
    with torch.no_grad():
        write_dense_weight(base_layer, residual)
    return init_A, init_B

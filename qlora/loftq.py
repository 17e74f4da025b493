"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", section 3,
Algorithm 1): quantize the base and initialise the adapter together, so that the 4-bit base plus the adapter
start near the 16/32-bit weight W instead of at NF4(W).

    res = W
    repeat T times:   Q = NF4(res);  res = W - deq(Q);  L R = best rank-r approximation of res (SVD);
                      res = W - L R                                (not after the last iteration)
    base = Q,  s B A = L R

The loop is PEFT's (peft/utils/loftq_utils.py ``loftq_init``, ``_low_rank_decomposition``: L = U sqrt(S_r),
R = sqrt(S_r) V_r^T), with this project's NF4 (qlora/nf4.py, byte-identical to bitsandbytes) and the layer's
blocksize and double quantization (PEFT quantizes with blocksize 64 and no double quantization). One
difference: PEFT stores A = R, B = L, which is right only when scaling = lora_alpha / r = 1; here A = R /
sqrt(s) and B = L / sqrt(s), so that s B A = L R for any scaling (equal to PEFT's at s = 1).

PEFT's ``loftq_init`` computes on "cuda" (or "xpu") unconditionally; tests/test_loftq.py runs its steps on the
CPU with PEFT's own ``_low_rank_decomposition`` and bitsandbytes' CPU NF4.

A LoftQ adapter is only right on its LoftQ base (Q above, not NF4(W)), so the QLoRA recipe saves that base
next to the adapter (``save_quantized``), as PEFT's LoftQ recipe saves the base model with the adapter.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from finetune_ref.kernels.reference import dequantize_nf4
from finetune_ref.lora.functional import lora_scaling
from finetune_ref.lora.inject import find_target_modules, inject_lora, lora_layers, rank_and_alpha
from finetune_ref.models.config import read_config_json
from finetune_ref.models.loader import load_model
from finetune_ref.qlora.bnb_config import read_quantization_config
from finetune_ref.qlora.model import DEFAULT_BLOCKSIZE, quantize_model
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.qlora.quant_state import NF4QuantState


def low_rank_decomposition(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (out, r), R (r, in)) with L R the best rank-r approximation of ``weight`` (out, in), split as
    L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T (peft/utils/loftq_utils.py ``_low_rank_decomposition``)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # u (out, k), s (k,), vh (k, in)
    return u @ torch.sqrt(torch.diag(s)[:, :r]), torch.sqrt(torch.diag(s)[:r, :]) @ vh


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, scaling: float, num_iter: int = 1, blocksize: int = 64,
               double_quant: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, NF4QuantState]:
    """LoftQ for one weight (out, in): (A (r, in), B (out, r) in fp32, packed NF4 codes, their state).

    Raises:
        ValueError: num_iter < 1, or what ``quantize_nf4`` rejects.
    """
    if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got num_iter={num_iter!r}")
    w = weight.detach().to(torch.float32)  # (out, in)
    res = w
    for i in range(num_iter):
        packed, state = quantize_nf4(res, blocksize=blocksize, double_quant=double_quant)
        res = w - dequantize_nf4(packed, state, dtype=torch.float32)
        left, right = low_rank_decomposition(res, r)
        if i + 1 < num_iter:
            res = w - left @ right
    root = math.sqrt(scaling)
    return right / root, left / root, packed, state


@torch.no_grad()
def loftq_quantize_model(model: nn.Module, lora_config, num_iter: int = 1, blocksize: int = 64,
                         double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace, in place, each linear layer ``lora_config`` targets on the dense ``model`` by the NF4Linear of
    its LoftQ base; return {module name: (A, B)} to copy into the adapters injected afterwards.

    The other linear layers are left dense (``qlora.model.quantize_model`` quantizes them next).

    Raises:
        ValueError: a target is not a dense nn.Linear, or as ``loftq_init``.
    """
    result = {}
    for name in find_target_modules(model, lora_config, strict_patterns=False):
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise ValueError(f"LoftQ quantizes dense nn.Linear layers; {name} is a {type(linear).__name__}")
        r, alpha = rank_and_alpha(lora_config, name)
        lora_A, lora_B, packed, state = loftq_init(linear.weight, r, lora_scaling(r, alpha, lora_config.use_rslora),
                                                   num_iter, blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        model.set_submodule(name, NF4Linear(packed, state, bias, compute_dtype=compute_dtype))
        result[name] = (lora_A, lora_B)
    return result


def prepare_loftq_model(model_dir, *, lora_config, num_iter: int = 1, blocksize: int | None = None,
                        double_quant: bool | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                        adapter_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype | None = None,
                        adapter_name: str = "default") -> nn.Module:
    """QLoRA with LoftQ: the 16/32-bit checkpoint in fp32, LoftQ bases and adapters on the targets, the other
    linear layers NF4 as ``qlora.model.quantize_model`` makes them, the unquantized tensors in ``dtype``
    (default ``compute_dtype``), adapters in ``adapter_dtype``. The whole fp32 model is in memory once.

    Raises:
        ValueError: a 4-bit checkpoint (LoftQ needs the unquantized weights), or as ``loftq_init``.
    """
    if read_quantization_config(read_config_json(Path(model_dir) / "config.json")) is not None:
        raise ValueError(f"{model_dir} is a 4-bit checkpoint; LoftQ quantizes the base itself and needs the "
                         "16/32-bit weights: pass the original model")
    blocksize = DEFAULT_BLOCKSIZE if blocksize is None else blocksize
    double_quant = True if double_quant is None else double_quant
    model = load_model(model_dir, torch.float32)
    inits = loftq_quantize_model(model, lora_config, num_iter, blocksize, double_quant, compute_dtype)
    quantize_model(model, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    model.to(dtype or compute_dtype)  # NF4Linear keeps its codes and fp32 state (its _apply)
    model.model.rotary_emb.reset_inv_freq(model.model.embed_tokens.weight.device)  # RoPE stays fp32
    plain = dataclasses.replace(lora_config, init_lora_weights=True)
    inject_lora(model, plain, adapter_name=adapter_name, adapter_dtype=adapter_dtype)
    for name, layer in lora_layers(model):
        layer.lora_A[adapter_name].weight.data.copy_(inits[name][0])
        layer.lora_B[adapter_name].weight.data.copy_(inits[name][1])
    return model

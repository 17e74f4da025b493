"""The peers' versions of what we compute: the same weights, packed bytes and batch, built with the peer.

Used by the parity checks (``parity.checks_*``) and by the oracle tests (tests/test_*_parity.py, test_nf4.py).
Each function imports its peer inside, so that this module imports without any peer installed.

Two bitsandbytes-on-CPU facts shape these builders (bitsandbytes 0.50):
* its native CPU ``dequantize_4bit`` is wrong when the last dimension is even and not a multiple of the
  blocksize, so ``bnb_dequantize_pure`` runs its pure-PyTorch path (the one its CPU backend falls back to);
* ``Linear4bit`` on CPUs with AVX512-BF16 repacks its weight after a no-grad forward and then loses input
  gradients; ``no_bnb_repacking`` turns that off on every such layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."  # PEFT's prefix on module and state-dict names


# ------------------------------------------------------------------------------------------ transformers
def tiny_hf_llama(*, vocab: int = 128, hidden: int = 64, intermediate: int = 96, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, tie: bool = False, seed: int = 0, **config):
    """A random transformers ``LlamaForCausalLM`` (GQA when kv_heads < heads), eval mode, fp32."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, tie_word_embeddings=tie, **config)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_llama(model_dir, dtype: torch.dtype = torch.float32, num_hidden_layers: int | None = None):
    """transformers' Llama from a Hugging Face directory (optionally only its first layers), eval mode."""
    import transformers

    kwargs = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).eval()


# ------------------------------------------------------------------------------------------ PEFT
def peft_lora(base: nn.Module, copy_base: bool = True, **lora_kwargs):
    """PEFT LoRA on a copy of ``base`` (on ``base`` itself with ``copy_base=False``, e.g. a 4-bit model);
    ``init_lora_weights=False`` (default here) so that B != 0 and a comparison means something."""
    import peft

    lora_kwargs.setdefault("init_lora_weights", False)
    return peft.get_peft_model(copy.deepcopy(base) if copy_base else base, peft.LoraConfig(**lora_kwargs))


def peft_adapter_tensors(pm) -> dict[str, torch.Tensor]:
    """PEFT model ``pm``'s LoRA tensors under our in-memory names (PEFT's minus its prefix)."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in pm.state_dict().items() if ".lora_" in k}


def copy_peft_adapter_into(ours: nn.Module, pm) -> None:
    """Copy every LoRA tensor of PEFT model ``pm`` into ``ours`` (which must hold exactly the same ones)."""
    theirs = peft_adapter_tensors(pm)
    mine = {k for k in ours.state_dict() if ".lora_" in k}
    if set(theirs) != mine:
        raise ValueError(f"adapters differ: only PEFT {sorted(set(theirs) - mine)[:3]}, "
                         f"only ours {sorted(mine - set(theirs))[:3]}")
    with torch.no_grad():
        for k, v in theirs.items():
            ours.get_parameter(k).copy_(v)


# ------------------------------------------------------------------------------------------ bitsandbytes
def bnb_quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """bitsandbytes' NF4 quantization of ``w``: (packed uint8, QuantState)."""
    import bitsandbytes.functional as bnbF

    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_absmax(qs) -> torch.Tensor:
    """The fp32 absmax bitsandbytes dequantizes with (rebuilt from its 8-bit codes under double quantization)."""
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax


def bnb_dequantize_pure(packed: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' NF4 dequantization through its pure-PyTorch path (without its torch.compile wrapper)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    # (n_bytes, 1) -> (n_bytes,): the layout the op takes
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), bnb_absmax(qs), qs.code, qs.blocksize,
                                                qs.shape, qs.dtype)


def bnb_dequantize_native(packed: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' public ``dequantize_4bit`` (its native CPU kernel where it has one)."""
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(packed, qs)


def no_bnb_repacking(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' AVX512-BF16 weight repacking on every ``Linear4bit`` of ``model``."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True):
    """A bitsandbytes ``Linear4bit`` (NF4) holding ``linear``'s weight, quantized by bitsandbytes on the CPU."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=blocksize, compress_statistics=double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone())
    return no_bnb_repacking(layer.to("cpu"))  # .to() is where Params4bit quantizes


def hf_4bit(model_dir, compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32,
            double_quant: bool = True):
    """transformers' 4-bit load (NF4, double quantization by default) on the CPU, repacking off, eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu",
                                                 dtype=dtype)
    return no_bnb_repacking(model).eval()


# ------------------------------------------------------------------------------------------ torchao
def torchao_nf4(w: torch.Tensor, blocksize: int = 64, scaler_blocksize: int = 256):
    """torchao's ``NF4Tensor`` of ``w`` (needs ``w.numel()`` divisible by blocksize * scaler_blocksize)."""
    from torchao.quantization import NF4Tensor

    return NF4Tensor.from_tensor(w, blocksize, scaler_blocksize)


def torchao_absmax(t) -> torch.Tensor:
    """The per-block absmax torchao dequantizes with (int8 codes / factor + mean), in the weight dtype."""
    return t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)


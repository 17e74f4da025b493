"""LoRA (Hu et al. 2021): low-rank adapters on frozen linear layers, interchangeable with Hugging Face PEFT.

    lora.config       LoraConfig (PEFT's fields) and adapter_config.json translation
    lora.functional   the math on tensors (lora_scaling, lora_forward, lora_delta_weight, merged_weight, init)
    lora.base_weight  the base layer's dense weight for merging (dense or quantized: dequantize/requantize_)
    lora.layer        LoRALinear, the module holding named adapters on one base layer
    lora.inject       target selection (names, regex, "all-linear", exclude, rank/alpha patterns), inject_lora
    lora.adapters     several named adapters: set_adapter, disable_adapters, delete_adapter, merge/unmerge,
                      merge_and_unload, unload, print_trainable_parameters
    lora.peft_format  save_adapter / load_adapter / load_adapters in PEFT's file format
    lora.mixed        mixed-adapter batches: set_row_adapters (PEFT's adapter_names), lora_bgmv / lora_sgmv
    lora.dora         DoRA (Liu et al. 2024): magnitude vector, forward and merge math
    lora.embedding    LoRA on an nn.Embedding (lora_embedding_A/B) and the head tied to it (ensure_weight_tying)
    lora.trainable_tokens  trainable_token_indices: only some rows of an embedding train
    lora.init         PiSSA / OLoRA initialisations and their conversion to plain LoRA on saving
    lora.loraplus     LoRA+ (Hayou et al. 2024) optimizer parameter groups
    lora.combine      add_weighted_adapter (linear, cat, svd, ties, dare_*, magnitude_prune) and set_scale
"""

from finetune_ref.lora.adapters import (adapter_names, adopt_rewritten_base, delete_adapter, disable_adapters, format_trainable_parameters,
                           merge_adapters, merge_and_unload, print_trainable_parameters, set_adapter,
                           trainable_parameters, unload, unmerge_adapters)
from finetune_ref.lora.config import ALL_LINEAR, LoraConfig
from finetune_ref.lora.functional import lora_delta_weight, lora_forward, lora_scaling
from finetune_ref.lora.inject import find_target_modules, get_active_adapters, inject_lora, lora_layers
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.lora.peft_format import load_adapter, load_adapters, read_adapter_config, save_adapter

__all__ = [
    "ALL_LINEAR", "LoRALinear", "LoraConfig", "adapter_names", "adopt_rewritten_base", "delete_adapter", "disable_adapters",
    "find_target_modules", "format_trainable_parameters", "get_active_adapters", "inject_lora", "load_adapter",
    "load_adapters", "lora_delta_weight", "lora_forward", "lora_layers", "lora_scaling", "merge_adapters",
    "merge_and_unload", "print_trainable_parameters", "read_adapter_config", "save_adapter", "set_adapter",
    "trainable_parameters", "unload", "unmerge_adapters",
]

"""Optimizers: one AdamW with fp32 master weights for 16-bit parameters, paged states, 8-bit states.

    optim.functional  the AdamW update on tensors (adamw_update_; through an fp32 master; with 8-bit moments)
    optim.adamw       AdamW (options master_weights, state_home, optim_bits) and its presets MasterWeightAdamW,
                      PagedAdamW, AdamW8bit, PagedAdamW8bit
    optim.paging      StatePager: where states live ("device", "host", "unified") and the page-in/out copies
    optim.blockwise8  the dynamic 8-bit map and blockwise quantization (bitsandbytes' CPU kernel, bit for bit)
    optim.optimizers  OPTIMIZER_NAMES and build_optimizer

This room imports nothing else of the project. ``build_optimizer`` builds one by the name ``finetune train
--optimizer`` takes (``OPTIMIZER_NAMES``).
"""

from finetune_ref.optim.adamw import AdamW, AdamW8bit, MasterWeightAdamW, PagedAdamW, PagedAdamW8bit
from finetune_ref.optim.functional import adamw_update_
from finetune_ref.optim.optimizers import OPTIMIZER_NAMES, build_optimizer

__all__ = ["AdamW", "AdamW8bit", "MasterWeightAdamW", "OPTIMIZER_NAMES", "PagedAdamW", "PagedAdamW8bit",
           "adamw_update_", "build_optimizer"]

"""Full fine-tuning: every weight trainable, bf16 weights with an fp32 master copy and fp32 AdamW states.

    full.optimizer  adamw_update_ (the AdamW math on tensors) and MasterWeightAdamW (fp32 master + moments for
                    bf16/fp16 parameters; exactly torch.optim.AdamW for fp32 ones)
    full.prepare    prepare_full_finetuning (all parameters trainable, cast to fp32/bf16, ties kept),
                    memory_breakdown (bytes of weights/grads/moments/master, measured), export_full_model
                    (Hugging Face directory from a plain, DDP or FSDP2 model)
"""

from finetune_ref.optim.master_adamw import MasterWeightAdamW, adamw_update_
from finetune_ref.full.prepare import export_full_model, full_state_dict, memory_breakdown, prepare_full_finetuning

__all__ = ["MasterWeightAdamW", "adamw_update_", "export_full_model", "full_state_dict", "memory_breakdown",
           "prepare_full_finetuning"]

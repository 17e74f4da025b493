"""Full fine-tuning: every weight trainable, bf16 weights with an fp32 master copy and fp32 AdamW states.

    full.prepare    prepare_full_finetuning (all parameters trainable, cast to fp32/bf16, ties kept),
                    memory_breakdown (bytes of weights/grads/moments/master, measured), export_full_model
                    (Hugging Face directory from a plain, DDP or FSDP2 model)

The optimizer is the optimizer room's: ``optim.build_optimizer("adamw", ...)`` gives ``torch.optim.AdamW`` for
fp32 weights and ``optim.MasterWeightAdamW`` (fp32 master + moments, :mod:`optim.adamw`) for bf16 ones.
"""

from finetune_ref.full.prepare import export_full_model, full_state_dict, memory_breakdown, prepare_full_finetuning

__all__ = ["export_full_model", "full_state_dict", "memory_breakdown", "prepare_full_finetuning"]

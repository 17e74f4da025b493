"""finetune_ref: full fine-tuning, LoRA and QLoRA written from scratch, as a reference to teach from and check against.

The one installed name. Its sub-packages are the folders at the top of the repository (see ``setup.py``):

    models    the Llama (config, RoPE, attention, KV cache), checkpoints, GGUF, tokenizer, generation
    lora      LoRA adapters and PEFT's file format
    kernels   Triton NF4 kernels and the backend choice
    optim     AdamW (fp32 master weights, paged or 8-bit states) and 8-bit blockwise quantization
    qlora     NF4 with double quantization, the NF4 layer, 4-bit models, merging into them
    gptq      GPTQ and round-to-nearest 4-bit quantization, GPTQ checkpoints
    full      full fine-tuning: preparing and exporting the model
    train     the training loop, data, schedule, checkpoints, distributed, memory accounting
    recipes   one file per method (full, LoRA, QLoRA) with its defaults
    cli       the ``finetune`` command (``python -m finetune_ref`` runs it too)
"""

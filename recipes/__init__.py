"""One file per fine-tuning method, each a frozen dataclass of the method's settings with its defaults and a
``build`` that loads the base the way the method trains it:

    base.py       RunConfig (the loop's TrainConfig + model, data, output, checkpoints, parallelism), Trainable
    full.py       FullRecipe: every weight trains; a Hugging Face model directory
    lora.py       LoraRecipe: a frozen 16/32-bit base with LoRA adapters; a PEFT adapter
    qlora.py      QLoraRecipe(LoraRecipe): the base in NF4 and QLoRA's defaults; a PEFT adapter + qlora_config.json
    run.py        run_training: one run of a recipe (data, model, loop, checkpoints, result), as ``finetune train``
    inference.py  load_inference_model: a stored base (dense, NF4, GPTQ) plus adapters, for eval/generate/merge

What QLoRA adds to LoRA is ``qlora.py``: its recipe subclasses LoRA's and adds the NF4 base and QLoRA's defaults.
"""

from finetune_ref.recipes.base import RunConfig, Trainable
from finetune_ref.recipes.full import FullRecipe
from finetune_ref.recipes.lora import LoraRecipe
from finetune_ref.recipes.qlora import QLoraRecipe

RECIPES: dict[str, type[RunConfig]] = {r.method: r for r in (FullRecipe, LoraRecipe, QLoraRecipe)}

__all__ = ["RECIPES", "FullRecipe", "LoraRecipe", "QLoraRecipe", "RunConfig", "Trainable"]

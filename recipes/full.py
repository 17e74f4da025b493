"""Full fine-tuning: every weight of the base trains (embeddings and lm_head included); the result is a Hugging
Face model directory (config.json, model.safetensors and the base's tokenizer files)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from finetune_ref.full import export_full_model, prepare_full_finetuning
from finetune_ref.models.loader import load_model
from finetune_ref.train.distributed import DistInfo

from .base import RunConfig, Trainable
from .inference import copy_tokenizer_files


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullRecipe(RunConfig):
    """``finetune train --method full``: the run's settings with full fine-tuning's defaults."""

    method: ClassVar[str] = "full"

    # Every pretrained weight moves, so small steps: 2e-5, the usual rate of full fine-tuning and the one the
    # README's runs measured; larger rates wreck a pretrained model in a few updates.
    lr: float = 2e-5
    precision: str = "fp32"            # bf16 trains bf16 weights with an fp32 master copy (MasterWeightAdamW)
    optimizer: str = "adamw"

    def base_dtype(self, world_size: int = 1) -> str:
        """The weights train in the dtype the precision implies (``trained_dtype``); another ``dtype`` is an
        error, not a silent cast.

        Raises:
            ValueError: ``dtype`` differs from the trained dtype.
        """
        wanted = self.trained_dtype(world_size)
        if self.dtype is not None and self.dtype != wanted:
            raise ValueError(f"--method full --precision {self.precision} trains {wanted} weights; drop --dtype "
                             f"{self.dtype} (the precision decides the weight dtype)")
        return wanted

    def build(self, model_dir: Path, info: DistInfo) -> Trainable:
        """The dense base in ``base_dtype``, every parameter trainable; the result is a model directory."""
        model = load_model(model_dir, dtype=self.base_dtype(info.world_size))
        prepare_full_finetuning(model, next(model.parameters()).dtype)
        config = model.config

        def export(m, directory):
            export_full_model(m, directory, config, is_main=info.is_main)
            if info.is_main:
                copy_tokenizer_files(model_dir, Path(directory))

        return Trainable(model, {"method": "full"}, export, "model")

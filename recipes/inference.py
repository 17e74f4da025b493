"""Models for inference and model directories: the base as it was stored or trained, plus adapters
(``load_inference_model``, for ``finetune eval``, ``generate`` and ``merge``), and completing a written model
directory with its tokenizer (``copy_tokenizer_files``).

``load_inference_model`` reads the base the way it was trained or saved:

* a GPTQ directory (``finetune merge --requantize gptq4|rtn4``) -> ``gptq.checkpoint.load_gptq_model``;
* a bitsandbytes 4-bit directory (``finetune quantize``, or transformers + bitsandbytes) -> ``load_quantized``;
* a 16/32-bit directory with a QLoRA adapter (one whose folder holds ``qlora_config.json``, written by
  ``finetune train --method qlora``, ``qlora/adapter_record.py``) -> quantized to NF4 while loading, with the
  blocksize, double quantization and dtypes it was trained with, so the adapter runs on the weights it was
  trained against;
* otherwise a plain ``load_model``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from finetune_ref.gptq.checkpoint import is_gptq_dir, load_gptq_model
from finetune_ref.lora import load_adapters
from finetune_ref.lora.combine import set_scale
from finetune_ref.models.checkpoint import parse_dtype
from finetune_ref.models.loader import load_model
from finetune_ref.qlora.adapter_record import check_loftq_base, check_record_fits, read_qlora_record
from finetune_ref.qlora.bnb_config import is_quantized_dir
from finetune_ref.qlora.model import load_quantized, nf4_layers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


def load_inference_model(model_dir: Path, dtype: str | None, adapter_dirs: Sequence[str] | None = None,
                         adapter_names: Sequence[str] | None = None, quantize: str | None = None,
                         adapter_scales: Sequence[float] | None = None):
    """The model for eval/generate: dense, NF4 or GPTQ base as stored (see the module docstring), plus adapters,
    each scaled by its ``adapter_scales`` factor (``lora.combine.set_scale``; default 1).

    ``dtype`` None means fp32, or for a QLoRA adapter the dtypes it was trained with. ``adapter_names``: one
    per directory (default as ``lora.load_adapters``). ``quantize="nf4"``: quantize a 16/32-bit base to NF4 while
    loading (bitsandbytes' defaults: blocksize 64, double quantization; compute in ``dtype``).

    Raises:
        ValueError / FileNotFoundError: as the loaders; adapters on a GPTQ base.
    """
    if adapter_scales is not None and len(adapter_scales) != len(adapter_dirs or []):
        raise ValueError(f"--adapter-scale has {len(adapter_scales)} numbers for {len(adapter_dirs or [])} --adapter "
                         "directories; give one per adapter")
    record = read_qlora_record(adapter_dirs)
    check_loftq_base(record, model_dir)
    if is_gptq_dir(model_dir):
        if adapter_dirs:
            raise ValueError(f"{model_dir} is a GPTQ model (already merged for serving); adapters go on a 16/32-bit "
                             "or NF4 base")
        model = load_gptq_model(model_dir, dtype=dtype or "fp32")
    elif is_quantized_dir(model_dir):
        compute = dtype or (record or {}).get("compute_dtype", "fp32")
        model = load_quantized(model_dir, compute_dtype=compute, dtype=dtype or (record or {}).get("dtype", compute))
        if record is not None:
            check_record_fits(record, nf4_layers(model)[0][1], model_dir, adapter_dirs)
    elif record is not None:
        model = load_quantized(model_dir, blocksize=record["blocksize"], double_quant=record["double_quant"],
                               compute_dtype=dtype or record["compute_dtype"], dtype=dtype or record["dtype"])
    elif quantize == "nf4":
        model = load_quantized(model_dir, blocksize=64, double_quant=True, compute_dtype=dtype or "fp32",
                               dtype=dtype or "fp32")
    else:
        model = load_model(model_dir, dtype=dtype or "fp32")
    if adapter_dirs:
        adapter_dtype = model.model.embed_tokens.weight.dtype
        names = load_adapters(model, adapter_dirs, adapter_names=adapter_names,
                              adapter_dtype=adapter_dtype if adapter_dtype.is_floating_point else parse_dtype("fp32"))
        for name, scale in zip(names, adapter_scales or []):
            set_scale(model, name, scale)
    return model


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files of a model directory, so ``dst`` is a complete model."""
    for name in TOKENIZER_FILES:
        source, target = src / name, dst / name
        if source.is_file() and not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)

"""``quantization_config`` in ``config.json`` for a 4-bit NF4 model, spelled as transformers'
``BitsAndBytesConfig.to_dict()`` writes it (``transformers/utils/quantization_config.py``), so that
transformers + bitsandbytes read our 4-bit directories and we read theirs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from finetune_ref.models.checkpoint import DTYPE_NAMES, parse_dtype
from finetune_ref.models.config import read_config_json

QUANTIZATION_CONFIG_KEY = "quantization_config"


@dataclasses.dataclass(frozen=True)
class BnbQuantizationConfig:
    """The part of transformers' ``BitsAndBytesConfig`` a 4-bit NF4 checkpoint needs.

    Attributes:
        double_quant: ``bnb_4bit_use_double_quant``.
        compute_dtype: ``bnb_4bit_compute_dtype`` (informational on load: the caller picks the compute dtype).
        skip_modules: ``llm_int8_skip_modules``: linear layers left unquantized (None: transformers' default,
            the output head).
    """

    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: Optional[tuple[str, ...]] = None

    def to_dict(self) -> dict[str, Any]:
        """The object transformers 5.x writes under ``quantization_config`` for a 4-bit NF4 model."""
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": DTYPE_NAMES[self.compute_dtype],
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None if self.skip_modules is None else list(self.skip_modules),
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_dict(cls, d: Any) -> "BnbQuantizationConfig":
        """Read a ``quantization_config`` object; anything but bitsandbytes 4-bit NF4 in uint8 is refused.

        Raises:
            ValueError: another quantization method, 8-bit, fp4, a non-uint8 quant storage, or a malformed field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        if d.get("quant_method") != "bitsandbytes":
            raise ValueError(f"quantization_config.quant_method is {d.get('quant_method')!r}; only 'bitsandbytes' "
                             "4-bit NF4 checkpoints can be loaded")
        if not (d.get("load_in_4bit") or d.get("_load_in_4bit")) or d.get("load_in_8bit") or d.get("_load_in_8bit"):
            raise ValueError("quantization_config is not 4-bit (load_in_4bit must be true, load_in_8bit false); "
                             "8-bit bitsandbytes checkpoints are not supported")
        if d.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise ValueError(f"quantization_config.bnb_4bit_quant_type is {d.get('bnb_4bit_quant_type', 'fp4')!r}; "
                             "only 'nf4' is supported")
        if d.get("bnb_4bit_quant_storage", "uint8") != "uint8":
            raise ValueError(f"quantization_config.bnb_4bit_quant_storage is {d['bnb_4bit_quant_storage']!r}; "
                             "only 'uint8' is supported")
        double_quant = d.get("bnb_4bit_use_double_quant", False)
        if not isinstance(double_quant, bool):
            raise ValueError(f"quantization_config.bnb_4bit_use_double_quant must be true/false, got {double_quant!r}")
        compute = d.get("bnb_4bit_compute_dtype") or "float32"  # transformers' default when unset
        try:
            compute_dtype = parse_dtype(str(compute).removeprefix("torch."))
        except TypeError as e:
            raise ValueError(f"quantization_config.bnb_4bit_compute_dtype: {e}") from e
        skip = d.get("llm_int8_skip_modules")
        if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip)):
            raise ValueError(f"quantization_config.llm_int8_skip_modules must be null or a list of names, got {skip!r}")
        return cls(double_quant=double_quant, compute_dtype=compute_dtype,
                   skip_modules=None if skip is None else tuple(skip))


def read_quantization_config(config: dict[str, Any]) -> Optional[BnbQuantizationConfig]:
    """The 4-bit settings of a ``config.json`` object, or None for a 16/32-bit checkpoint. Raises as ``from_dict``."""
    q = config.get(QUANTIZATION_CONFIG_KEY)
    return None if q is None else BnbQuantizationConfig.from_dict(q)


def is_quantized_dir(model_dir: str | Path) -> bool:
    """True when ``model_dir/config.json`` declares a bitsandbytes 4-bit checkpoint."""
    return read_quantization_config(read_config_json(Path(model_dir) / "config.json")) is not None

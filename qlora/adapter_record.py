"""The QLoRA adapter record: ``qlora_config.json`` beside a QLoRA adapter's ``adapter_config.json``.

A PEFT adapter says nothing about how its base was quantized, yet a QLoRA adapter only fits the NF4 weights it
was trained against. ``finetune train --method qlora`` therefore writes this record next to the adapter::

    {"quant_type": "nf4", "blocksize": 64, "double_quant": true, "compute_dtype": "bf16", "dtype": "bf16"}

and eval, generate and merge read it to rebuild that base from a 16/32-bit model (``load_quantized`` with the
same blocksize, double quantization and dtypes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from finetune_ref.models.checkpoint import atomic_write_text

QLORA_CONFIG_FILE = "qlora_config.json"
RECORD_KEYS = ("blocksize", "double_quant", "compute_dtype", "dtype")


def write_qlora_record(adapter_dir: str | Path, settings: dict) -> None:
    """Record beside a QLoRA adapter how its base was quantized (``RECORD_KEYS``), atomically."""
    atomic_write_text(Path(adapter_dir) / QLORA_CONFIG_FILE, json.dumps({"quant_type": "nf4", **settings},
                                                                        indent=2) + "\n")


def read_qlora_record(adapter_dirs: Sequence[str | Path] | None) -> dict | None:
    """The QLoRA settings (``RECORD_KEYS``) of the first adapter that has them (None: plain LoRA adapters).

    Raises:
        ValueError: unreadable record, or adapters trained on differently quantized bases.
    """
    records = []
    for d in adapter_dirs or []:
        path = Path(d) / QLORA_CONFIG_FILE
        if path.is_file():
            try:
                record = json.loads(path.read_text())
                records.append({k: record[k] for k in RECORD_KEYS})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a valid QLoRA record ({e}); it is written by `finetune train "
                                 "--method qlora`") from None
    if any(r != records[0] for r in records):
        raise ValueError(f"the adapters were trained on differently quantized bases: {records}")
    return records[0] if records else None

"""The QLoRA adapter record: ``qlora_config.json`` beside a QLoRA adapter's ``adapter_config.json``.

A PEFT adapter says nothing about how its base was quantized, yet a QLoRA adapter only fits the NF4 weights it
was trained against. ``finetune train --method qlora`` therefore writes this record next to the adapter::

    {"quant_type": "nf4", "blocksize": 64, "double_quant": true, "compute_dtype": "bf16", "dtype": "bf16"}

and eval, generate and merge read it to rebuild that base from a 16/32-bit model (``load_quantized`` with the
same blocksize, double quantization and dtypes). The adapter's weights file says it needs the record
(``QLORA_MARKER`` in its safetensors header), so an adapter copied without it is refused rather than run on a
base it was not trained on; a 4-bit base must be stored with the record's settings (``check_record_fits``). A
LoftQ adapter (qlora/loftq.py), or an OLoRA one trained on NF4 (lora/init.py: the residual base re-quantized),
fits only the 4-bit base its initialisation made, which is saved beside it; its record says where
(``"loftq_base": "loftq_base"`` or ``"olora_base"``, relative to the adapter), and that base must be passed as
the model (``check_loftq_base``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from finetune_ref.models.checkpoint import atomic_write_text

QLORA_CONFIG_FILE = "qlora_config.json"
RECORD_KEYS = ("blocksize", "double_quant", "compute_dtype", "dtype")
QLORA_MARKER = {"base_quantization": "nf4"}  # in the adapter's safetensors header: "look for qlora_config.json"
LOFTQ_BASE = "loftq_base"
BASE_FINGERPRINT = "base_fingerprint"  # models.checkpoint.weights_fingerprint of that base


def write_qlora_record(adapter_dir: str | Path, settings: dict) -> None:
    """Record beside a QLoRA adapter how its base was quantized (``RECORD_KEYS``), atomically."""
    atomic_write_text(Path(adapter_dir) / QLORA_CONFIG_FILE, json.dumps({"quant_type": "nf4", **settings},
                                                                        indent=2) + "\n")


def read_qlora_record(adapter_dirs: Sequence[str | Path] | None) -> dict | None:
    """The QLoRA settings (``RECORD_KEYS``) of the first adapter that has them (None: plain LoRA adapters).

    Raises:
        ValueError: unreadable or missing record (of an adapter marked as QLoRA), or adapters trained on
            differently quantized bases.
    """
    records, quantized = [], []
    for d in adapter_dirs or []:
        path = Path(d) / QLORA_CONFIG_FILE
        if not path.is_file() and _marked(Path(d)):
            raise ValueError(f"{d} is a QLoRA adapter (trained on an NF4 base) but its {QLORA_CONFIG_FILE} is "
                             "missing; copy it from the training run's --out directory (it says how the base was "
                             "quantized)")
        if path.is_file():
            quantized.append(str(d))
            try:
                record = json.loads(path.read_text())
                records.append({k: record[k] for k in RECORD_KEYS})
                if LOFTQ_BASE in record:
                    records[-1][LOFTQ_BASE] = str(Path(d) / record[LOFTQ_BASE])
                    records[-1][BASE_FINGERPRINT] = record.get(BASE_FINGERPRINT)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a valid QLoRA record ({e}); it is written by `finetune train "
                                 "--method qlora`") from None
    if len(records) > 1 and any(LOFTQ_BASE in r for r in records):
        raise ValueError(f"{', '.join(map(str, adapter_dirs))}: an adapter initialised with its own 4-bit base (LoftQ, "
                         "or OLoRA on NF4) fits only that base, so it cannot be loaded or combined with other adapters")
    if any(r != records[0] for r in records):
        raise ValueError(f"the adapters were trained on differently quantized bases: {records}")
    dirs = [str(d) for d in adapter_dirs or []]
    if records and len(records) != len(dirs):
        raise ValueError(f"{quantized} are QLoRA adapters (trained on an NF4 base), {sorted(set(dirs) - set(quantized))} "
                         "LoRA adapters (trained on a 16/32-bit base); use adapters trained on the same base together")
    return records[0] if records else None


def _marked(adapter_dir: Path) -> bool:
    """Whether the adapter's weights file carries ``QLORA_MARKER`` (written by ``finetune train --method qlora``)."""
    from safetensors import SafetensorError, safe_open

    from finetune_ref.lora.peft_format import ADAPTER_WEIGHTS_NAME

    try:
        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError):
        return False  # reading the weights reports it
    return all(header.get(k) == v for k, v in QLORA_MARKER.items())


def check_record_fits(record: dict, base_layer, model_dir: str | Path, adapter_dirs: Sequence[str | Path]) -> None:
    """A 4-bit base must be stored with the NF4 settings the QLoRA adapter was trained on (``record``).

    ``base_layer`` is one NF4Linear of the loaded base (every layer shares the settings).

    Raises:
        ValueError: naming both settings.
    """
    stored = {"blocksize": base_layer.blocksize, "double_quant": base_layer.double_quant}
    wanted = {k: record[k] for k in stored}
    if stored != wanted:
        raise ValueError(f"the QLoRA adapter {', '.join(map(str, adapter_dirs))} was trained on NF4 with {wanted}, "
                         f"but the 4-bit --model {model_dir} is stored with {stored}; use the base it was trained "
                         "on (or its 16/32-bit model, quantized while loading as in training)")


def check_loftq_base(record: dict | None, model_dir: str | Path) -> None:
    """Refuse a LoftQ (or 4-bit OLoRA) adapter on any base but a 4-bit one (the base saved beside it).

    Raises:
        ValueError: naming the directory to pass instead.
    """
    from finetune_ref.qlora.bnb_config import is_quantized_dir

    if not record or LOFTQ_BASE not in record:
        return
    if not is_quantized_dir(Path(model_dir)):
        raise ValueError(f"the adapter was initialised with its own 4-bit base (LoftQ, or OLoRA on NF4) and fits only that: pass "
                         f"--model {record[LOFTQ_BASE]} (quantizing {model_dir} again would give another base)")
    from finetune_ref.models.checkpoint import weights_fingerprint

    wanted = record.get(BASE_FINGERPRINT)
    if wanted is not None and weights_fingerprint(model_dir) != wanted:
        raise ValueError(f"--model {model_dir} is not the 4-bit base this adapter was initialised with (LoftQ, or OLoRA "
                         f"on NF4; its weights differ): pass --model {record[LOFTQ_BASE]}")

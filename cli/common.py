"""What the ``finetune`` commands share: argument types, finding and loading the model, held-out batches.

Loading for inference (:func:`load_inference_model`) reads the base the way it was trained or saved:

* a GPTQ directory (``finetune merge --requantize gptq4|rtn4``) -> ``qlora.gptq_model.load_gptq_model``;
* a bitsandbytes 4-bit directory (``finetune quantize``, or transformers + bitsandbytes) -> ``load_quantized``;
* a 16/32-bit directory with a QLoRA adapter (one whose folder holds ``qlora_config.json``, written by
  ``finetune train --method qlora``) -> quantized to NF4 while loading, with the blocksize, double
  quantization and dtypes it was trained with, so the adapter runs on the weights it was trained against;
* otherwise a plain ``load_model``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

QLORA_CONFIG_FILE = "qlora_config.json"  # beside adapter_config.json: how the QLoRA base was quantized


# --------------------------------------------------------------------------------------------------------
# Argument types: reject bad values at parse time with argparse's one-line error.
# --------------------------------------------------------------------------------------------------------
def _number(text: str, parse, accept, expected: str):
    """``parse(text)`` if ``accept`` holds for it, else argparse's one-line error saying what was ``expected``."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number (finite)")


def finite_non_negative(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def probability(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def load_average() -> float:
    """1-minute load average: processes running or waiting for a core (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def pick_threads() -> int:
    """torch's default thread count less the cores other processes keep busy (1-minute load average): on a shared
    machine, OpenMP threads waiting for a busy core make small matmuls (LoRA's rank-r products) 5-10x slower."""
    import torch

    return max(1, torch.get_num_threads() - int(load_average() + 0.5))


def targets(text: str) -> list[str] | str:
    """'all-linear', a comma-separated list of module-name suffixes, or 're:<regex>'."""
    if text.startswith("re:"):
        return text[3:]
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected 'all-linear', names like q_proj,v_proj, or re:<regex>")
    return names


NF4_BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]  # bitsandbytes' supported blocksizes


def add_model_args(p: argparse.ArgumentParser, dtype_help: str = "dtype of the base weights (default fp32)") -> None:
    p.add_argument("--model", help="Hugging Face model directory or .gguf file (default: the embedded "
                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where converted models are kept (default: $FINETUNE_CACHE_DIR or "
                                       "~/.cache/finetune-ref)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help=dtype_help)


def add_data_args(p: argparse.ArgumentParser, batch_size: int = 4) -> None:
    p.add_argument("--data", help=".txt file, folder of .txt files, or .jsonl (instruction/output or chat "
                                  "messages); default: Python's reference docs (pydoc_data.topics)")
    p.add_argument("--eval-data", help="separate held-out file (then all of --data trains)")
    p.add_argument("--eval-fraction", type=probability, default=0.1,
                   help="share of --data held out for evaluation (default 0.1)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"sequences per micro-batch (default {batch_size})")


# --------------------------------------------------------------------------------------------------------
# Finding and loading models.
# --------------------------------------------------------------------------------------------------------
def resolve_model_dir(model: str | None, cache_dir: str | None) -> Path:
    """None -> the embedded default; a .gguf file -> converted once into the cache; else an HF directory."""
    from finetune_ref.models.default_model import default_cache_dir, default_model_dir

    if model is None:
        return default_model_dir(cache_dir)
    path = Path(model)
    if path.suffix == ".gguf":
        from finetune_ref.models.gguf_convert import convert_gguf

        out = Path(cache_dir or default_cache_dir()) / path.stem
        if not (out / "config.json").is_file():
            print(f"converting {path} -> {out}", file=sys.stderr)
            convert_gguf(path, out)
        return out
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: not a directory (expected config.json + *.safetensors) "
                                "or a .gguf file")
    return path


def write_qlora_record(adapter_dir: Path, settings: dict) -> None:
    """Record beside a QLoRA adapter how its base was quantized (blocksize, double_quant, dtypes)."""
    from finetune_ref.models.checkpoint import atomic_write_text

    atomic_write_text(Path(adapter_dir) / QLORA_CONFIG_FILE, json.dumps({"quant_type": "nf4", **settings},
                                                                        indent=2) + "\n")


def read_qlora_record(adapter_dirs: Sequence[str | Path] | None) -> dict | None:
    """The QLoRA settings of the first adapter that has them (None: plain LoRA adapters).

    Raises:
        ValueError: unreadable record, or adapters trained on differently quantized bases.
    """
    records = []
    for d in adapter_dirs or []:
        path = Path(d) / QLORA_CONFIG_FILE
        if path.is_file():
            try:
                record = json.loads(path.read_text())
                records.append({k: record[k] for k in ("blocksize", "double_quant", "compute_dtype", "dtype")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a valid QLoRA record ({e}); it is written by `finetune train "
                                 "--method qlora`") from None
    if any(r != records[0] for r in records):
        raise ValueError(f"the adapters were trained on differently quantized bases: {records}")
    return records[0] if records else None


def load_inference_model(model_dir: Path, dtype: str | None, adapter_dirs: Sequence[str] | None = None):
    """The model for eval/generate: dense, NF4 or GPTQ base as stored (see the module docstring), plus adapters.

    ``dtype`` None means fp32, or for a QLoRA adapter the dtypes it was trained with.

    Raises:
        ValueError / FileNotFoundError: as the loaders; adapters on a GPTQ base.
    """
    from finetune_ref.lora import load_adapters
    from finetune_ref.models.checkpoint import load_model, parse_dtype
    from finetune_ref.gptq.model import is_gptq_dir, load_gptq_model
    from finetune_ref.qlora.model import is_quantized_dir, load_quantized

    record = read_qlora_record(adapter_dirs)
    if is_gptq_dir(model_dir):
        if adapter_dirs:
            raise ValueError(f"{model_dir} is a GPTQ model (already merged for serving); adapters go on a 16/32-bit "
                             "or NF4 base")
        model = load_gptq_model(model_dir, dtype=dtype or "fp32")
    elif is_quantized_dir(model_dir):
        compute = dtype or (record or {}).get("compute_dtype", "fp32")
        model = load_quantized(model_dir, compute_dtype=compute, dtype=dtype or (record or {}).get("dtype", compute))
    elif record is not None:
        model = load_quantized(model_dir, blocksize=record["blocksize"], double_quant=record["double_quant"],
                               compute_dtype=dtype or record["compute_dtype"], dtype=dtype or record["dtype"])
    else:
        model = load_model(model_dir, dtype=dtype or "fp32")
    if adapter_dirs:
        adapter_dtype = model.model.embed_tokens.weight.dtype
        load_adapters(model, adapter_dirs, adapter_dtype=adapter_dtype if adapter_dtype.is_floating_point
                      else parse_dtype("fp32"))
    return model


def heldout_batches(args, tokenizer) -> list[dict]:
    """The held-out batches of ``--data``/``--eval-data`` (raises ValueError if there are none)."""
    from finetune_ref.train.data import build_datasets, iter_batches

    _, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                             eval_data=args.eval_data)
    if not held:
        raise ValueError("no held-out data: use --eval-fraction > 0 or --eval-data FILE")
    return list(iter_batches(held, args.batch_size, tokenizer.pad_token_id))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files of a model directory, so ``dst`` is a complete model."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json"):
        source, target = src / name, dst / name
        if source.is_file() and not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)


def check_out_dir(out: str | Path, *inputs: str | Path | None) -> Path:
    """``--out`` must not be a file nor one of the input directories (writing there would destroy them).

    Raises:
        ValueError: naming ``--out`` and what it collides with.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    for src in inputs:
        if src is not None and out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise ValueError(f"--out {out} is also an input ({src}); write the result to another directory")
    return out


def directory_bytes(path: Path) -> int:
    """Bytes of the weight files (*.safetensors) in a directory: what a model or adapter costs on disk."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))

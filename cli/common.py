"""What the ``finetune`` commands share: argument types, the model and data flags, finding the model directory,
held-out batches, the guard of ``--out`` (``writing_to``). (Loading a model for inference is ``recipes/inference.py``.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterator

from finetune_ref.models.output_dir import OVERWRITE_FLAG, OutputLock, check_output_dir
from finetune_ref.qlora.quant_state import SUPPORTED_BLOCKSIZES
from finetune_ref.recipes.base import RunConfig


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


def show_number(value) -> str:
    """A default as ``--help`` shows it: 1e-3, 2e-5, 0.1, 16."""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


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


def targets(text: str) -> tuple[str, ...] | str:
    """'all-linear', a comma-separated list of module-name suffixes, or 're:<regex>'."""
    if text.startswith("re:"):
        return text[3:]
    if text == "all-linear":
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected 'all-linear', names like q_proj,v_proj, or re:<regex>")
    return names


def targets_text(value: tuple[str, ...] | str) -> str:
    """What ``targets`` reads back as ``value``: the inverse of the --targets type."""
    if isinstance(value, str):
        return value if value == "all-linear" else f"re:{value}"
    return ",".join(value)


INFERENCE_DTYPE_HELP = "dtype of the weights and activations (default fp32; with a QLoRA adapter: its training dtypes)"
NF4_BLOCKSIZES = list(SUPPORTED_BLOCKSIZES)  # --blocksize choices: bitsandbytes' supported blocksizes


def _default(value, given_only: bool):
    """``value``, or for ``given_only`` argparse's SUPPRESS: a flag left out sets no attribute."""
    return argparse.SUPPRESS if given_only else value


def add_model_args(p: argparse.ArgumentParser, dtype_help: str = "dtype of the base weights (default fp32)",
                   given_only: bool = False) -> None:
    """``--model``, ``--cache-dir``, ``--dtype``; ``given_only`` as for ``add_data_args``."""
    p.add_argument("--model", default=_default(None, given_only),
                   help="Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=_default(None, given_only),
                   help="where converted models are kept (default: $FINETUNE_CACHE_DIR or ~/.cache/finetune-ref)")
    p.add_argument("--dtype", default=_default(None, given_only), choices=["fp32", "bf16", "fp16"], help=dtype_help)


def run_default(name: str):
    """The default of a field every method shares (``recipes.base.RunConfig``), e.g. "seq_len" -> 256."""
    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)


def add_data_args(p: argparse.ArgumentParser, batch_size: int | None = None, given_only: bool = False) -> None:
    """``--data``, ``--eval-data``, ``--eval-fraction``, ``--seq-len``, ``--batch-size``, with the defaults of
    ``finetune train`` (``RunConfig``), so that eval finds the held-out split train used. ``given_only``: a flag
    left out sets no attribute (``finetune train`` gives its recipe only the flags given)."""
    batch_size = run_default("batch_size") if batch_size is None else batch_size
    eval_fraction, seq_len = run_default("eval_fraction"), run_default("seq_len")
    p.add_argument("--data", default=_default(None, given_only),
                   help=".txt file, folder of .txt files, or .jsonl (instruction/output or chat "
                        "messages); default: Python's reference docs (pydoc_data.topics)")
    p.add_argument("--eval-data", default=_default(None, given_only),
                   help="separate held-out file (then all of --data trains)")
    p.add_argument("--eval-fraction", type=probability, default=_default(eval_fraction, given_only),
                   help=f"share of --data held out for evaluation (default {eval_fraction})")
    p.add_argument("--seq-len", type=positive_int, default=_default(seq_len, given_only),
                   help=f"tokens per sequence (default {seq_len})")
    p.add_argument("--batch-size", type=positive_int, default=_default(batch_size, given_only),
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


def heldout_batches(args, tokenizer) -> list[dict]:
    """The held-out batches of ``--data``/``--eval-data`` (raises ValueError if there are none)."""
    from finetune_ref.train.data import build_datasets, iter_batches

    _, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                             eval_data=args.eval_data)
    if not held:
        raise ValueError("no held-out data: use --eval-fraction > 0 or --eval-data FILE")
    return list(iter_batches(held, args.batch_size, tokenizer.pad_token_id))


def add_out_args(p: argparse.ArgumentParser, help: str, **kwargs) -> None:
    """``--out`` and ``--overwrite``, the same for every command that writes (``models/output_dir.py``)."""
    p.add_argument("--out", help=help, **kwargs)
    p.add_argument(OVERWRITE_FLAG, action="store_true", default=False,
                   help="replace a non-empty --out (default: refuse; nothing is replaced unasked)")


@contextlib.contextmanager
def writing_to(out: str | Path, *inputs: str | Path | None, overwrite: bool = False, own: bool = False,
               explain=None) -> Iterator[Path]:
    """``with writing_to(args.out, *inputs, overwrite=args.overwrite) as out:`` the one guard of ``--out``:
    this process alone writes it (``OutputLock``), and it passed ``check_output_dir`` (not an input, empty
    unless ``own`` or ``overwrite``, writable), all before anything is loaded.

    Raises:
        ValueError: one line naming ``--out`` and what is wrong.
    """
    out = Path(out)
    with OutputLock(out):
        yield check_output_dir(out, inputs, overwrite=overwrite, own=own, explain=explain)


def directory_bytes(path: Path) -> int:
    """Bytes of the weight files (*.safetensors) in a directory: what a model or adapter costs on disk."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))

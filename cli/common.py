"""What the ``finetune`` commands share: argument types, the model and data flags, finding the model directory,
held-out batches, the guard of ``--out`` (``writing_to``). (Loading a model for inference is ``recipes/inference.py``.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from finetune_ref.models.output_dir import OVERWRITE_FLAG, OutputLock, check_output_dir
from finetune_ref.qlora.quant_state import SUPPORTED_BLOCKSIZES
from finetune_ref.recipes.base import RunConfig


# --------------------------------------------------------------------------------------------------------
# Argument types: every numeric flag is checked at parse time against a finite range, so a bad value fails with
# argparse's one-line error naming the flag, before anything loads.
# --------------------------------------------------------------------------------------------------------
class Number:
    """An argparse ``type``: an int or a finite float in a range; ``range_text`` is what ``--help`` shows.

    ``Number(int, 1, 10**7)`` accepts 1 ... 10000000; ``Number(float, 0, 1, low_open=True)`` accepts (0, 1].
    """

    def __init__(self, kind: type, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                 also: tuple = ()):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.also = also  # single values accepted besides the range (GPTQ's group size -1)
        self.__name__ = "integer" if kind is int else "number"  # what argparse calls the type

    @property
    def range_text(self) -> str:
        if self.also:
            return " or ".join(map(str, self.also)) + f" or {self.low}..{self.high}"
        if self.kind is int:
            return f"{self.low}..{self.high}"
        return f"{'(' if self.low_open else '['}{show_number(self.low)}, {show_number(self.high)}" \
               f"{')' if self.high_open else ']'}"

    def __call__(self, text: str):
        expected = f"{'an integer' if self.kind is int else 'a number'} {'' if self.also else 'in '}{self.range_text}"
        try:
            value = self.kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        ok = value in self.also or (math.isfinite(value) and above and below)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value


# The ranges of the flags. Generous: wide enough for any real run, narrow enough that a typo (20 digits, nan,
# 1e300) is caught before it becomes an out-of-memory, a traceback or an all-NaN result.
MAX_COUNT = 10**7                      # updates, intervals, samples
positive_int = Number(int, 1, MAX_COUNT)
non_negative_int = Number(int, 0, MAX_COUNT)
positive_float = Number(float, 0, 1e6, low_open=True)
finite_non_negative = Number(float, 0, 1e6)
probability = Number(float, 0, 1, high_open=True)
fraction = Number(float, 0, 1)                               # --min-lr-ratio
learning_rate = Number(float, 0, 10, low_open=True)          # --lr: AdamW's rate; above ~1 nothing trains
weight_decay = Number(float, 0, 1)                           # AdamW multiplies the weights by 1 - lr * wd
tokens_per_sequence = Number(int, 2, 2**20)                  # one token predicts the next; at most 1M tokens
sequences_per_batch = Number(int, 1, 2**16)
grad_accum = Number(int, 1, 2**16)
rank = Number(int, 1, 2**16)
seed = Number(int, 0, 2**63 - 1)                             # torch.manual_seed's range
top_p = Number(float, 0, 1, low_open=True)
density = Number(float, 0, 1, low_open=True)                 # combine: the fraction of entries TIES/DARE keep
temperature = Number(float, 0, 100)
port = Number(int, 1, 65535)
group_size = Number(int, 1, 2**16, also=(-1,))              # GPTQ: input columns per scale; -1: one group per row


# --------------------------------------------------------------------------------------------------------
# The parser of every ``finetune`` command: help shows each flag's range and default; errors are one line.
# --------------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a numeric flag's range, and its default unless the help text already says it (``default ...``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or "%(default)" in text or not action.option_strings or action.required \
                or isinstance(action, argparse._HelpAction):
            pass
        elif action.const is not None and action.nargs == 0:  # store_true / store_false / store_const
            text += " (default: off)"
        elif action.default is not None and action.default is not argparse.SUPPRESS:
            text += " (default: %(default)s)"
        if isinstance(action.type, Number) and action.type.range_text not in text:
            text += f" (range {action.type.range_text})"
        return text


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``HelpFormatter`` and a one-line error (no usage block); a description
    taken from a docstring is shown without its ``code`` markup."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = kwargs["description"].replace("``", "")
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.endswith("expected one argument"):  # argparse reads a value like -5GB as a flag
            flag = message.split(":")[0].replace("argument ", "").split("/")[-1]
            message += f" (a value that starts with '-' is given as {flag}=VALUE)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Library parameters whose name differs from the flag's ``dest`` (errors raised below the CLI use the former).
PARAMETER_DESTS = {"untie_tied": "untie", "target_modules": "targets"}  # (LoraConfig.target_modules)


def flag_table(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each parsed name (``dest``) -> the flag that sets it, as typed (``min_lr_ratio`` -> ``--min-lr-ratio``), plus
    the library parameters of ``PARAMETER_DESTS`` (``untie_tied`` -> ``--untie``); not the flags that turn a
    setting off (``--no-double-quant``), whose name says the opposite of the field."""
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions
             if a.option_strings and a.dest not in ("help", argparse.SUPPRESS)
             and not (a.nargs == 0 and a.const is False)}  # --no-double-quant does not name double_quant=True
    return {**flags, **{p: flags[d] for p, d in PARAMETER_DESTS.items() if d in flags}}


def name_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with the field names of a config (``min_lr_ratio``, ``eval_every > 0``, ``lr must ...``) written
    as the user's flags; ``name=True`` of an on/off flag becomes the flag (``overwrite=True`` -> ``--overwrite``).
    Names with an underscore are replaced anywhere as whole words; one-word names only where they are a subject
    (``lr must``, ``seq_len=``), so that plain words (a "data" path) stay; quoted names (``'min_lr_ratio'``, what
    a user wrote, or a dict's key) stay as they are."""
    for dest, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w'-]){re.escape(dest)}=True\b", flag, message)
        pattern = rf"(?<![\w'-])({re.escape(dest)})(?![\w'-])" if "_" in dest \
            else rf"(?<![\w'-])({re.escape(dest)})(?=( must|=| >| <))"
        message = re.sub(pattern, flag, message)
    return message


def show_number(value) -> str:
    """A default as ``--help`` shows it: 1e-3, 2e-5, 0.1, 16."""
    if isinstance(value, float) and value and not 1e-2 <= abs(value) < 1e5:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_average() -> float:
    """1-minute load average: processes running or waiting for a core (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def busy_cores(window: float = 0.1) -> float | None:
    """Cores busy over the next ``window`` seconds, all processes (Linux ``/proc/stat``; None elsewhere). This
    process sleeps meanwhile, so it is the others' work."""
    import time

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]  # cpu user nice system idle iowait irq softirq steal
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = ticks()
        time.sleep(window)
        busy1, total1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def pick_threads() -> int:
    """torch's default thread count less the cores other processes keep busy: on a shared machine, OpenMP threads
    waiting for a busy core make small matmuls (LoRA's rank-r products) 5-10x slower.

    Busy means busy both now (``busy_cores``) and over the last minute (the 1-minute load average), the smaller of
    the two: the load average alone still counts a job that has just ended (the README's first command starts
    right after ``pip install``, which left it near 1 on 2 cores: the run took 1 thread, 142 instead of 225
    tokens/s), and a moment alone can catch a short-lived process."""
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    now, minute = busy_cores(), load_average()
    busy = minute if now is None else min(now, minute)
    return max(1, threads - int(busy + 0.5))


def targets(text: str) -> tuple[str, ...] | str:
    """'all-linear', a comma-separated list of module-name suffixes, or 're:<regex>'."""
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {e}") from None
        return text[3:]
    if text == "all-linear":
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected 'all-linear', names like q_proj,v_proj, or re:<regex>")
    return names


def token_ids(text: str) -> tuple[int, ...]:
    """A comma-separated list of distinct token ids >= 0, e.g. '0,5,17' (--trainable-tokens)."""
    try:
        ids = tuple(int(t) for t in text.split(","))  # an empty entry ('5,,6') is a typo: refused
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids like 0,5,17, got {text!r}") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct token ids >= 0 like 0,5,17, got {text!r}")
    return ids


def module_names(text: str) -> tuple[str, ...]:
    """--modules-to-save: comma-separated module names, each a whole trailing part of the full name (PEFT's
    modules_to_save rule, which has no regex and no 'all-linear': ``lora.modules_to_save.find_modules_to_save``)."""
    if text.startswith("re:") or text == "all-linear":
        raise argparse.ArgumentTypeError(f"takes module names (trailing parts of the full name, as PEFT's "
                                         f"modules_to_save), not {text!r}: list them, e.g. lm_head,norm or "
                                         "input_layernorm,post_attention_layernorm")
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected module names like lm_head,norm or input_layernorm")
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


def existing_path(text: str) -> str:
    """A --data / --eval-data path that exists (a file or a folder), checked as the flag is parsed."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def add_data_args(p: argparse.ArgumentParser, batch_size: int | None = None, given_only: bool = False) -> None:
    """``--data``, ``--eval-data``, ``--eval-fraction``, ``--eval-tokens``, ``--seq-len``, ``--batch-size``, with the
    defaults of ``finetune train`` (``RunConfig``), so that eval finds the held-out split train used.
    ``given_only``: a flag left out sets no attribute (``finetune train`` gives its recipe only the flags given),
    and the data paths are checked by the run, not as parsed (a config may be written for another machine)."""
    size = run_default("batch_size") if batch_size is None else batch_size
    fraction_default, seq_len_default = run_default("eval_fraction"), run_default("seq_len")
    tokens_default = run_default("eval_tokens")
    p.add_argument("--data", type=None if given_only else existing_path, default=_default(None, given_only),
                   help=".txt file, folder of .txt files, or .jsonl (instruction/output or chat "
                        "messages); default: Python's reference docs (pydoc_data.topics)")
    p.add_argument("--eval-data", type=None if given_only else existing_path, default=_default(None, given_only),
                   help=("separate held-out file, then all of --data trains" if given_only else
                         "separate held-out file to evaluate on, instead of the held-out part of --data")
                   + " (default: none, the held-out part of --data)")
    p.add_argument("--eval-fraction", type=probability, default=_default(fraction_default, given_only),
                   help=f"share of --data held out for evaluation (default {fraction_default})")
    p.add_argument("--eval-tokens", type=non_negative_int, default=_default(tokens_default, given_only),
                   help="held-out tokens evaluated at most: evenly spaced sequences, the same every time, so a big "
                        f"--data evaluates quickly; 0: all (default {tokens_default})")
    p.add_argument("--seq-len", type=tokens_per_sequence, default=_default(seq_len_default, given_only),
                   help=f"tokens per sequence, at most the model's context (default {seq_len_default})")
    p.add_argument("--batch-size", type=sequences_per_batch, default=_default(size, given_only),
                   help=f"sequences per micro-batch (default {size})")


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
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        base = adapter_base(path)
        raise ValueError(f"--model {model} is an adapter, not a model: pass it as --adapter {model}"
                         + (f" with --model {base} (its base)" if base else " with --model <its base>"))
    return path


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The ``base_model_name_or_path`` an adapter's adapter_config.json records (None if none or unreadable)."""
    from finetune_ref.lora import read_adapter_config

    try:
        return read_adapter_config(adapter_dir).base_model_name_or_path
    except (OSError, ValueError, TypeError):
        return None


def say_filled_defaults(model_dir: Path) -> None:
    """One line on stderr naming the config.json fields that took transformers' LlamaConfig defaults, if any."""
    from finetune_ref.models.config import describe_filled_defaults

    note = describe_filled_defaults(model_dir)
    if note:
        print(note, file=sys.stderr)


def heldout_batches(args, tokenizer) -> list[dict]:
    """The held-out batches of ``--data``/``--eval-data`` (raises ValueError if there are none)."""
    from finetune_ref.train.data import build_datasets, iter_batches

    _, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
                             eval_data=args.eval_data, eval_tokens=args.eval_tokens)
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

"""After a QLoRA fine-tune: held-out loss and bytes on disk of the ways to serve it.

Runs, with the ``finetune`` command as a user would (each step a subprocess, so peak memory is per step):

1. ``finetune train --method qlora`` on the embedded default (SmolLM2-135M-Instruct, pydoc data; the CLI defaults:
   r 8, alpha 16, all-linear, 30 updates of 4 x 256 tokens, bf16, paged AdamW), unless ``--adapter`` is given;
2. ``finetune quantize`` (the NF4 base the adapter runs on, to measure its bytes);
3. ``finetune merge`` into the NF4-dequantized base, saved as bf16 (none), NF4 (bf16 embedding, as the NF4
   base), RTN 4-bit and GPTQ 4-bit (group size 128, asymmetric, 128 calibration sequences of 256 tokens from the
   training data; fp32 merge, fp16 embedding as GPTQ checkpoints store it);
4. ``finetune eval --dtype fp32`` of every result on the whole held-out split (fp32 compute for all rows, so
   the rows differ only by their weights).

Prints a Markdown table (and writes it with ``--out-md``); bytes are those of the *.safetensors files (for the
unmerged model: the NF4 base plus the adapter).

Usage: ``python benchmarks/bench_requantize.py --work runs/requantize [--adapter runs/qlora]``
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_ref.cli.common import directory_bytes  # noqa: E402


def finetune(*args: str) -> str:
    """Run ``python -m finetune_ref ARGS``; returns stdout; raises with stderr's tail on failure."""
    proc = subprocess.run([sys.executable, "-m", "finetune_ref", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"finetune {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def evaluate(*args: str) -> dict:
    return json.loads(finetune("eval", "--dtype", "fp32", "--json", *args).strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/requantize"), help="directory for all outputs")
    parser.add_argument("--adapter", type=Path, help="an existing QLoRA adapter (default: train one)")
    parser.add_argument("--out-md", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adapter = args.adapter
    if adapter is None:
        adapter = work / "qlora"
        if not (adapter / "adapter_model.safetensors").is_file():
            print(finetune("train", "--method", "qlora", "--out", str(adapter), "--no-progress"), file=sys.stderr)
    record = json.loads((adapter / "qlora_config.json").read_text())
    nf4_base = work / "nf4-base"
    if not (nf4_base / "config.json").is_file():
        finetune("quantize", "--out", str(nf4_base), "--blocksize", str(record["blocksize"]),
                 "--compute-dtype", record["compute_dtype"], "--dtype", record["dtype"],
                 *([] if record["double_quant"] else ["--no-double-quant"]))

    from finetune_ref.models.default_model import default_model_dir

    rows = [("base model, no fine-tuning", evaluate(), directory_bytes(default_model_dir())),
            ("QLoRA, unmerged (NF4 base + bf16 adapter)", evaluate("--adapter", str(adapter)),
             directory_bytes(nf4_base) + directory_bytes(adapter))]
    merges = [("merged into NF4-dequant, saved bf16", "none", ["--dtype", "bf16"]),
              ("merged, re-quantized NF4 (PEFT's 4-bit merge)", "nf4", ["--dtype", "bf16"]),
              ("merged, RTN 4-bit g128", "rtn4", []),
              ("merged, GPTQ 4-bit g128", "gptq4", [])]
    for label, requantize, extra in merges:
        out = work / f"merged-{requantize}"
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            finetune("merge", "--adapter", str(adapter), "--out", str(out), "--requantize", requantize,
                     "--report-batches", "0", *extra)
            print(f"{label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows.append((label, evaluate("--model", str(out)), directory_bytes(out)))

    ref = rows[1][1]["loss"]
    lines = [f"Held-out split of the default data ({rows[0][1]['tokens']} tokens), fp32 evaluation; "
             f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             "| model | held-out loss | perplexity | vs unmerged QLoRA | weights on disk (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for label, result, nbytes in rows:
        lines.append(f"| {label} | {result['loss']:.4f} | {result['perplexity']:.2f} | "
                     f"{result['loss'] - ref:+.4f} | {nbytes / 2**20:.1f} |")
    table = "\n".join(lines)
    print(table)
    print(f"\n({time.perf_counter() - start:.0f} s in all)", file=sys.stderr)
    if args.out_md:
        args.out_md.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

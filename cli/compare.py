"""``finetune compare``: full fine-tuning, LoRA and QLoRA side by side on one base, one corpus, one budget.

Every method gets the same base model (default: the embedded SmolLM2-135M-Instruct), the same training
sequences in the same order (``BatchIterator``, same seed), the same token budget (updates x batch x seq_len)
and the same schedule (linear warmup, cosine to 10%, clipping at 1.0; ``train.trainer.train``); only the
learning rate is each method's own. Each method runs in a fresh interpreter (a subprocess), so its max RSS
is that method's alone. Reported per method (MB = 1e6 bytes, times in seconds, losses in nats per token):

* trainable parameters, as a count and a % of the model's logical parameters (NF4 counted unpacked);
* bytes on disk of the saved result: the adapter directory (``lora.save_adapter``) or the whole model
  (``full.export_full_model``, config + safetensors in the training dtype);
* the measured peak of live tensor bytes over one steady-state training step (run after training, the optimizer
  states already exist) with ``TensorMemoryTracker``, split into what is live *at the peak*: weights (incl.
  adapters and NF4 codes/constants), gradients, optimizer states (incl. fp32 master weights) and the rest
  (activations saved for backward, logits and loss chain, temporaries, the batch), so the four sum to the
  peak; beside it ``train.memory.estimate_memory``'s prediction, and the process's max RSS (which also holds
  the interpreter, libraries, allocator caches and evaluation buffers);
* tokens/s of the training updates (evaluation time excluded; tracking slows ops, so speed comes from the
  untracked updates) and wall time (train = updates only; total = the whole method, loading included);
* held-out loss / perplexity before and after on the task's held-out topics;
* a regression score on a second corpus from another domain: its loss before and after (a rise = forgetting).

The second corpus. By default the English part of ``chatterbot-corpus`` (PyPI, BSD-3, a 346 KB wheel of YAML
and nothing else; the ``compare`` extra installs it): human-written everyday dialogue and trivia (greetings,
emotion, food, history, literature, sports, ...), with the categories about computing left out (ai,
botprofile, coding, computers, tech_support) so it shares no domain with Python's reference docs. Each
category file is one document (turns on lines, conversations separated by blank lines), ~15k tokens in all.
Why this: no network at run time, a pinned real corpus of ordinary English, small enough to evaluate in
seconds. The Python standard library ships no general English prose (pydoc_data *is* the task; ``this`` is
20 lines) and nltk's corpora are downloaded from outside PyPI. ``--regression-data FILE.txt|DIR`` uses your
own text; without either the column says how to get it.

Precision. ``--precision bf16`` (default) loads the base in bf16: full fine-tuning trains bf16 weights with fp32
master weights and moments (``FullRecipe(precision="bf16")``); LoRA has a bf16 frozen base; QLoRA computes its
NF4 matmuls in bf16. Adapters are fp32 in both (PEFT's default; their optimizer then needs no master copy).
bf16 is the default because on CPUs with AVX512-BF16 (the development machine) the forward and backward run
2-2.9x faster than in fp32 (4 x 256 tokens: LoRA 1.9 s vs 4.1 s, full 1.8 s vs 5.2 s); on CPUs without native
bf16 use ``--precision fp32``.

Learning rates: the usual ones, 2e-5 for full fine-tuning and 2e-4 for LoRA and QLoRA
(``--lr-full/--lr-lora/--lr-qlora``). They do lower the held-out loss within the default 40 updates of 1,024
tokens (measured in bf16: full 2.78 -> 2.58, LoRA 2.78 -> 2.58, QLoRA 3.04 -> 2.72; docs/compare.md),
so no method gets a rate tuned to this short budget.

Threads. All methods run with the same number of torch threads, chosen once at the start: ``--threads``, or
else torch's default less the cores already busy (1-minute load average), at least 1. On 2 shared cores two
OpenMP threads competing with another job made a LoRA step 2.5-15x slower than one thread (9-57 s vs 3.9 s).

Each method is built by its recipe (``recipes/``) with these settings as overrides (``compare_method.py``);
the settings and the data are ``compare_settings.py``, the table and plot ``compare_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune_ref.cli.common import add_out_args, load_average, pick_threads, writing_to
from finetune_ref.cli.compare_method import run_method
from finetune_ref.cli.compare_report import environment, format_table, plot_curves
from finetune_ref.cli.compare_settings import DEFAULTS, METHODS, PRECISIONS, QUICK, CompareSettings
from finetune_ref.models.output_dir import written_whole


# ---------------------------------------------------------------------------------------------------------
# The comparison and its report.
# ---------------------------------------------------------------------------------------------------------
def compare(s: CompareSettings, overwrite: bool = False) -> dict:
    """Run every method of ``s`` (one after the other) and write compare.json / compare.md / compare.png and
    each method's result into ``s.out``: written into a temporary sibling and renamed into place at the end
    (``models/output_dir.py``), so an interrupted comparison leaves no half report."""
    s.validate()
    with writing_to(s.out, s.model_dir, s.regression_data, overwrite=overwrite) as out, written_whole(out) as tmp:
        s = dataclasses.replace(s, threads=s.threads or pick_threads())
        work = dataclasses.replace(s, out=str(tmp))  # the methods save their results into the staging dir
        print(f"compare: {', '.join(s.methods)}; {s.steps} updates x {s.batch_size} x {s.seq_len} tokens each, "
              f"precision {s.precision}, {s.threads} torch thread(s)", flush=True)
        load_start, results = load_average(), []
        for method in s.methods:
            if s.isolate:
                results.append(_run_isolated(method, work))
            else:  # this process: set the threads for the run only
                threads, _ = torch.get_num_threads(), torch.set_num_threads(s.threads)
                try:
                    results.append(run_method(method, work))
                finally:
                    torch.set_num_threads(threads)
        for r in results:  # where each result will be once the staging dir is renamed
            r["saved_dir"] = str(out / r["method"])
        report = {"settings": dataclasses.asdict(s), "results": results,
                  "environment": {**environment(), "load_average_start": load_start,
                                  "load_average_end": load_average()}}
        (tmp / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "compare.md").write_text(format_table(report) + "\n")
        plot = plot_curves(results, tmp / "compare.png")
    report["plot"] = str(out / "compare.png") if plot else None
    return report


def _run_isolated(method: str, s: CompareSettings) -> dict:
    """``run_method`` in a fresh interpreter (``python -m finetune_ref.cli.compare --child``), so its max RSS is this
    method's alone and nothing is left over from the previous method. A subprocess rather than
    multiprocessing's spawn, which would re-run the caller's ``__main__`` script."""
    with tempfile.TemporaryDirectory() as tmp:
        settings, result = Path(tmp) / "settings.json", Path(tmp) / "result.json"
        settings.write_text(json.dumps(dataclasses.asdict(s)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "finetune_ref.cli.compare", "--child", method, str(settings),
                               str(result)], env=env)
        answer = json.loads(result.read_text()) if result.is_file() else {}
    if "error" in answer:  # re-raise what the child raised, so bad input still reads as one clear line
        kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "TypeError": TypeError}
        raise kind.get(answer["error"], RuntimeError)(answer["message"])
    if proc.returncode != 0 or "method" not in answer:
        raise RuntimeError(f"the {method} run failed (exit status {proc.returncode}; see its output above)")
    return answer


def _child_main(argv: list[str]) -> int:
    method, settings_path, result_path = argv
    settings = CompareSettings(**json.loads(Path(settings_path).read_text()))
    torch.set_num_threads(settings.threads)
    try:
        result = run_method(method, settings)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it again
        Path(result_path).write_text(json.dumps({"error": type(err).__name__, "message": str(err)}))
        raise
    Path(result_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def _methods(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in METHODS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {','.join(METHODS)}, got {text!r}")
    return names


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on a ``parser.add_subparsers()`` object; ``func=cmd_compare``."""
    from finetune_ref.cli.common import (learning_rate, non_negative_int, positive_float, positive_int, rank, seed,
                                         sequences_per_batch, show_number, tokens_per_sequence)

    d = CompareSettings()  # the defaults shown and used are the settings'
    p = subparsers.add_parser("compare", help="full fine-tuning vs LoRA vs QLoRA on one base, data and budget",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", type=_methods, default=METHODS, help="subset of full,lora,qlora (default all)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="bf16 (2-3x faster on CPUs with AVX512-BF16) or fp32; QLoRA computes in it "
                        f"(default {d.precision})")
    p.add_argument("--quick", action="store_true", help=f"a ~3 minute version: {QUICK}")
    for name, kind, help_ in (("steps", positive_int, "optimizer updates"), ("batch-size", sequences_per_batch,
                              "sequences per update"), ("seq-len", tokens_per_sequence, "tokens per sequence"),
                              ("warmup", non_negative_int, "warmup updates"),
                              ("eval-every", non_negative_int, "updates between held-out evaluations"),
                              ("eval-tokens", positive_int, "at most this many tokens per evaluation set")):
        p.add_argument(f"--{name}", type=kind, help=f"{help_} (default {DEFAULTS[name.replace('-', '_')]}; "
                                                    f"--quick {QUICK[name.replace('-', '_')]})")
    for m in METHODS:
        p.add_argument(f"--lr-{m}", type=learning_rate, default=d.lr[m],
                       help=f"peak LR of {m} (default {show_number(d.lr[m])})")
    p.add_argument("--rank", type=rank, default=d.rank, help=f"LoRA/QLoRA rank r (default {d.rank})")
    p.add_argument("--alpha", type=positive_float, default=d.alpha,
                   help=f"LoRA/QLoRA alpha (default {show_number(d.alpha)})")
    p.add_argument("--seed", type=seed, default=d.seed, help=f"data order and LoRA initialisation (default {d.seed})")
    p.add_argument("--regression-data", help=".txt file or folder for the forgetting score (default: "
                                             "chatterbot-corpus English, from the 'compare' extra)")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads for every method (default: torch's less the cores busy by the load average)")
    p.add_argument("--same-process", action="store_true",
                   help="run all methods in this process (faster start; max RSS is then cumulative)")
    add_out_args(p, f"where compare.md/.json/.png and results go (default {d.out})", default=d.out)
    p.set_defaults(func=cmd_compare)
    return p


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    budget = QUICK if args.quick else DEFAULTS
    given = {k: getattr(args, k) for k in budget if getattr(args, k) is not None}
    if "warmup" not in given:  # a shorter --steps keeps a valid warmup
        given["warmup"] = min(budget["warmup"], given.get("steps", budget["steps"]))
    return CompareSettings(model_dir=args.model, methods=tuple(args.methods), precision=args.precision,
                           **{**budget, **given}, lr={m: getattr(args, f"lr_{m}") for m in METHODS},
                           rank=args.rank, alpha=args.alpha, seed=args.seed, out=args.out,
                           regression_data=args.regression_data, threads=args.threads,
                           isolate=not args.same_process)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``finetune compare``; raises ValueError for bad settings (the CLI prints them)."""
    s = settings_from_args(args)
    start = time.perf_counter()
    report = compare(s, overwrite=args.overwrite)
    print(format_table(report))
    print(f"\nwrote {Path(s.out) / 'compare.md'}, compare.json" + (", compare.png" if report["plot"] else "")
          + f" in {time.perf_counter() - start:.0f} s")
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    """``python -m finetune_ref.cli.compare [options]`` until ``finetune compare`` is registered: exit status 2 and one
    line for bad input, as the ``finetune`` command does."""
    parser = argparse.ArgumentParser(prog="finetune")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"finetune compare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one method, run by _run_isolated
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit(compare_main())


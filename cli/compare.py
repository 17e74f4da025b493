"""``finetune compare``: full fine-tuning, LoRA and QLoRA side by side on one base, one corpus, one budget.

Every method gets the same base model (default: the embedded SmolLM2-135M-Instruct), the same training
sequences in the same order (``BatchIterator``, same seed), the same token budget (updates x batch x seq_len)
and the same schedule (linear warmup, cosine to 10%, clipping at 1.0; ``finetune.trainer.train``); only the
learning rate is each method's own. Each method runs in a fresh interpreter (a subprocess), so its max RSS
is that method's alone. Reported per method (MB = 1e6 bytes, times in seconds, losses in nats per token):

* trainable parameters, as a count and a % of the model's logical parameters (NF4 counted unpacked);
* bytes on disk of the saved result: the adapter directory (``lora.save_adapter``) or the whole model
  (``full.export_full_model``, config + safetensors in the training dtype);
* the measured peak of live tensor bytes over one steady-state training step (run after training, the optimizer
  states already exist) with ``TensorMemoryTracker``, split into what is live *at the peak*: weights (incl.
  adapters and NF4 codes/constants), gradients, optimizer states (incl. fp32 master weights) and the rest
  (activations saved for backward, logits and loss chain, temporaries, the batch), so the four sum to the
  peak; beside it ``finetune.memory.estimate_memory``'s prediction, and the process's max RSS (which also holds
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
master weights and moments (``TrainConfig(precision="bf16")``); LoRA has a bf16 frozen base; QLoRA computes its
NF4 matmuls in bf16. Adapters are fp32 in both (PEFT's default; their optimizer then needs no master copy).
bf16 is the default because on CPUs with AVX512-BF16 (the development machine) the forward and backward run
2-2.9x faster than in fp32 (4 x 256 tokens: LoRA 1.9 s vs 4.1 s, full 1.8 s vs 5.2 s); on CPUs without native
bf16 use ``--precision fp32``.

Learning rates: the usual ones, 2e-5 for full fine-tuning and 2e-4 for LoRA and QLoRA
(``--lr-full/--lr-lora/--lr-qlora``). They do lower the held-out loss within the default 40 updates of 1,024
tokens (measured in bf16: full 2.78 -> 2.58, LoRA 2.78 -> 2.58, QLoRA 3.04 -> 2.72; finetune/README_COMPARE.md),
so no method gets a rate tuned to this short budget.

Threads. All methods run with the same number of torch threads, chosen once at the start: ``--threads``, or
else torch's default less the cores already busy (1-minute load average), at least 1. On 2 shared cores two
OpenMP threads competing with another job made a LoRA step 2.5-15x slower than one thread (9-57 s vs 3.9 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune_ref.cli.common import load_average, pick_threads
from finetune_ref.cli.compare_report import environment, format_table, plot_curves
from finetune_ref.train.memory_tracker import TensorMemoryTracker, tensor_bytes

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16")
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
OPTIMIZER = {"full": "adamw", "lora": "adamw", "qlora": "paged_adamw"}  # QLoRA's recipe: paged AdamW
# Budgets for the three methods on 2 CPU cores (measured, shared machine): default ~12 minutes, --quick ~2.5.
DEFAULTS = dict(steps=40, batch_size=4, seq_len=256, warmup=4, eval_every=10, eval_tokens=5120)
QUICK = dict(steps=12, batch_size=4, seq_len=128, warmup=2, eval_every=4, eval_tokens=1536)
CHATTERBOT_EXCLUDED = ("ai", "botprofile", "coding", "computers", "tech_support")  # computing topics


@dataclasses.dataclass
class CompareSettings:
    """One comparison. Token budget per method = steps * batch_size * seq_len; eval_tokens caps each eval set."""

    model_dir: str | None = None          # None: the embedded SmolLM2-135M-Instruct
    methods: tuple[str, ...] = METHODS
    precision: str = "bf16"
    steps: int = DEFAULTS["steps"]
    batch_size: int = DEFAULTS["batch_size"]
    seq_len: int = DEFAULTS["seq_len"]
    warmup: int = DEFAULTS["warmup"]
    eval_every: int = DEFAULTS["eval_every"]
    eval_tokens: int = DEFAULTS["eval_tokens"]
    lr: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_LR))
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    out: str = "runs/compare"
    regression_data: str | None = None    # None: chatterbot-corpus (English) if installed
    threads: int | None = None            # torch threads in each method's process (None: see pick_threads)
    isolate: bool = True                  # each method in a fresh interpreter (per-method max RSS)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names from {METHODS}, got {list(self.methods)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_tokens", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if not 0 <= self.warmup <= self.steps or self.eval_every < 0:
            raise ValueError(f"need 0 <= warmup <= steps and eval_every >= 0, got warmup={self.warmup}, "
                             f"steps={self.steps}, eval_every={self.eval_every}")
        for m in self.methods:
            if not (isinstance(self.lr.get(m), (int, float)) and 0 < self.lr[m] < float("inf")):
                raise ValueError(f"learning rate of {m} must be a positive number, got {self.lr.get(m)!r}")
        if not self.alpha > 0 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"alpha must be > 0 and threads >= 1, got {self.alpha}, {self.threads}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"--model {self.model_dir}: not a Hugging Face model directory (no config.json)")
        if self.regression_data is not None and not Path(self.regression_data).exists():
            raise ValueError(f"--regression-data {self.regression_data}: no such file or directory")


def check_writable(out: str | Path) -> Path:
    """Create ``out`` and check a file can be written there (before any training). Raises ValueError."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out}: not a writable directory ({err.strerror or err})") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------
def regression_documents(path: str | Path | None = None) -> tuple[str | None, list[str]]:
    """(corpus name, documents) of the second corpus; (None, []) when none is available (see module doc)."""
    from finetune_ref.train.data import read_text_documents

    if path is not None:
        return str(path), read_text_documents(path)
    try:
        from importlib.resources import files

        import yaml
        root = files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError:
        return None, []
    documents = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yml") or entry.name[:-4] in CHATTERBOT_EXCLUDED:
            continue
        conversations = yaml.safe_load(entry.read_text(encoding="utf-8")).get("conversations") or []
        documents.append("\n\n".join("\n".join(str(turn) for turn in conv) for conv in conversations))
    return "chatterbot-corpus (English, non-computing categories)", [d for d in documents if d.strip()]


def spread(examples: list, max_tokens: int) -> list:
    """At most ``max_tokens`` worth of examples, evenly spaced over the list (so every part is sampled)."""
    n = min(len(examples), max(1, max_tokens // len(examples[0]["input_ids"])))
    return [examples[k * len(examples) // n] for k in range(n)]


# ---------------------------------------------------------------------------------------------------------
# One method, in its own process.
# ---------------------------------------------------------------------------------------------------------
def build_method(method: str, s: CompareSettings, model_dir: Path):
    """(model, TrainConfig precision) for ``method``; the caller seeds torch first (LoRA's A init)."""
    from finetune_ref import lora
    from finetune_ref.full import prepare_full_finetuning
    from finetune_ref.models.checkpoint import load_model
    from finetune_ref.qlora.model import prepare_qlora_model

    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    config = lora.LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules="all-linear")
    if method == "full":  # bf16 weights: TrainConfig "bf16" gives them fp32 master weights and moments
        return prepare_full_finetuning(load_model(model_dir, dtype=dtype), dtype), s.precision
    if method == "lora":
        model = load_model(model_dir, dtype=dtype)
        lora.inject_lora(model, config)  # fp32 adapters, so the trainable weights are fp32: precision "fp32"
        return model, "fp32"
    return prepare_qlora_model(model_dir, lora_config=config, compute_dtype=dtype, adapter_dtype=torch.float32,
                               dtype=dtype), "fp32"


class PeakTracker(TensorMemoryTracker):
    """A ``TensorMemoryTracker`` that also notes, each time the overall peak grows, the bytes of the given
    parameters' gradients then live and the phase: what the peak is made of, which phase peaks alone don't say."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.params, self.top, self.top_grads, self.top_phase, self.phase_name = params, 0, 0, "", ""

    def _add_tensor(self, t: torch.Tensor) -> None:
        super()._add_tensor(t)
        if self.current > self.top:
            self.top, self.top_phase = self.current, self.phase_name
            self.top_grads = tensor_bytes(p.grad for p in self.params)


def measure_step(model, optimizer, batch: dict, precision: str) -> dict:
    """Live tensor bytes of one training step (forward, backward, clip, optimizer step), as ``train`` runs it."""
    from finetune_ref.train.data import count_label_tokens
    from finetune_ref.train.trainer import autocast_context, clip_grad_norm_, model_inputs

    params = [p for g in optimizer.param_groups for p in g["params"]]
    tracker = PeakTracker(params)
    model.train()
    with tracker:
        tracker.track(model, optimizer, batch)
        for name in ("forward", "backward", "optimizer step"):
            tracker.phase_name = name
            with tracker.phase(name):
                if name == "forward":
                    with autocast_context(model, precision):  # `out` stays alive to the end, as in train()
                        out = model(**model_inputs(batch), num_items_in_batch=count_label_tokens(batch))
                elif name == "backward":
                    out.loss.backward()
                    all_grads = tensor_bytes(p.grad for p in params)
                else:
                    clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        del out
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    states = tensor_bytes(t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    return {"peak": tracker.top, "peak_phase": tracker.top_phase, "weights": weights, "gradients": tracker.top_grads,
            "optimizer_states": states, "activations": tracker.top - weights - tracker.top_grads - states,
            "gradients_all": all_grads}


def run_method(method: str, s: CompareSettings) -> dict:
    """Train, evaluate, save and measure one method; returns its row of the table (plain JSON types)."""
    wall_start = time.perf_counter()
    from finetune_ref.train.data import BatchIterator, _text_examples, build_datasets, iter_batches
    from finetune_ref.train.memory import MemorySettings, estimate_memory, parameter_count
    from finetune_ref.train.trainer import TrainConfig, build_optimizer, evaluate, train
    from finetune_ref.full import export_full_model
    from finetune_ref.lora import save_adapter, trainable_parameters
    from finetune_ref.models.default_model import default_model_dir
    from finetune_ref.models.tokenizer import Tokenizer

    model_dir = Path(s.model_dir) if s.model_dir else default_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    train_examples, held = build_datasets(tokenizer, None, seq_len=s.seq_len)
    eval_sets = {"heldout": spread(held, s.eval_tokens)}
    reg_name, reg_docs = regression_documents(s.regression_data)
    if reg_docs:
        eval_sets["regression"] = spread(_text_examples(tokenizer, reg_docs, s.seq_len), s.eval_tokens)
    batches_of = {k: list(iter_batches(v, s.batch_size, tokenizer.pad_token_id)) for k, v in eval_sets.items()}
    torch.manual_seed(s.seed)  # the same LoRA A initialisation for LoRA and QLoRA
    model, precision = build_method(method, s, model_dir)
    trainable, _ = trainable_parameters(model)
    base_params = parameter_count(model.config)  # logical count: an NF4 weight counts as one parameter
    total = base_params + (trainable if method != "full" else 0)
    before = {k: evaluate(model, b) for k, b in batches_of.items()}
    print(f"[{method}] before: " + ", ".join(f"{k} loss {v['loss']:.4f} ({v['tokens']} tokens)"
                                             for k, v in before.items()), flush=True)
    cfg = TrainConfig(steps=s.steps, lr=s.lr[method], warmup_steps=s.warmup, eval_every=s.eval_every,
                      precision=precision, optimizer=OPTIMIZER[method], seed=s.seed, progress=False)
    optimizer = build_optimizer(model, cfg)
    batches = BatchIterator(train_examples, s.batch_size, tokenizer.pad_token_id, seed=s.seed, drop_last=True)
    curve: dict[str, list] = {"train": [], "heldout": [[0, before["heldout"]["loss"]]]}
    eval_seconds = [0.0]

    def eval_fn():
        start = time.perf_counter()
        result = evaluate(model, batches_of["heldout"])
        eval_seconds[0] += time.perf_counter() - start
        return result

    def on_update(update: int, metrics: dict) -> None:
        curve["train"].append([update, metrics["loss"]])
        if "eval" in metrics:
            curve["heldout"].append([update, metrics["eval"]["loss"]])
        print(f"[{method}] update {update}/{s.steps}: loss {metrics['loss']:.4f}"
              + (f", held-out {metrics['eval']['loss']:.4f}" if "eval" in metrics else ""), flush=True)

    start = time.perf_counter()
    result = train(model, batches, cfg, eval_fn=eval_fn, optimizer=optimizer, on_update=on_update)
    train_s = time.perf_counter() - start - eval_seconds[0]
    after = {"heldout": result["eval"]}
    if "regression" in batches_of:
        after["regression"] = evaluate(model, batches_of["regression"])
    saved = Path(s.out) / method
    if method == "full":
        export_full_model(model, saved, model.config)
        files = ("config.json", "model.safetensors")
    else:
        save_adapter(model, saved, base_model_name_or_path=str(model_dir))
        files = ("adapter_config.json", "adapter_model.safetensors")
    saved_bytes = sum((saved / f).stat().st_size for f in files)  # what was just written, nothing older
    memory = measure_step(model, optimizer, next(batches), precision)  # after training: states exist
    estimate = estimate_memory(model.config, MemorySettings(
        method=method, optimizer=OPTIMIZER[method], batch_size=s.batch_size, seq_len=s.seq_len,
        dtype=s.precision, adapter_dtype=None if method == "full" else "fp32", rank=s.rank))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    tokens = s.steps * s.batch_size * s.seq_len
    return {"method": method, "lr": s.lr[method], "optimizer": OPTIMIZER[method], "train_precision": precision,
            "trainable_params": trainable, "total_params": total,
            "trainable_pct": 100.0 * trainable / total, "saved_dir": str(saved), "saved_bytes": saved_bytes,
            "memory": memory, "estimated_peak": estimate.peak, "max_rss": rss, "tokens": tokens,
            "tokens_per_s": tokens / train_s, "train_s": train_s, "wall_s": time.perf_counter() - wall_start,
            "before": before, "after": after, "regression_corpus": reg_name, "curve": curve}


# ---------------------------------------------------------------------------------------------------------
# The comparison and its report.
# ---------------------------------------------------------------------------------------------------------
def compare(s: CompareSettings) -> dict:
    """Run every method of ``s`` (one after the other) and write compare.json / compare.md / compare.png."""
    s.validate()
    out = check_writable(s.out)
    s = dataclasses.replace(s, threads=s.threads or pick_threads())
    print(f"compare: {', '.join(s.methods)}; {s.steps} updates x {s.batch_size} x {s.seq_len} tokens each, "
          f"precision {s.precision}, {s.threads} torch thread(s)", flush=True)
    load_start, results = load_average(), []
    for method in s.methods:
        if s.isolate:
            results.append(_run_isolated(method, s))
        else:  # this process: set the threads for the run only
            threads, _ = torch.get_num_threads(), torch.set_num_threads(s.threads)
            try:
                results.append(run_method(method, s))
            finally:
                torch.set_num_threads(threads)
    report = {"settings": dataclasses.asdict(s), "results": results,
              "environment": {**environment(), "load_average_start": load_start, "load_average_end": load_average()}}
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "compare.md").write_text(format_table(report) + "\n")
    report["plot"] = plot_curves(results, out / "compare.png")
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
    from finetune_ref.cli.common import non_negative_int, positive_float, positive_int

    p = subparsers.add_parser("compare", help="full fine-tuning vs LoRA vs QLoRA on one base, data and budget",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", type=_methods, default=METHODS, help="subset of full,lora,qlora (default all)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="bf16 (default: 2-3x faster on CPUs with AVX512-BF16) or fp32; QLoRA computes in it")
    p.add_argument("--quick", action="store_true", help=f"a ~3 minute version: {QUICK}")
    for name, kind, help_ in (("steps", positive_int, "optimizer updates"), ("batch-size", positive_int,
                              "sequences per update"), ("seq-len", positive_int, "tokens per sequence"),
                              ("warmup", non_negative_int, "warmup updates"),
                              ("eval-every", non_negative_int, "updates between held-out evaluations"),
                              ("eval-tokens", positive_int, "at most this many tokens per evaluation set")):
        p.add_argument(f"--{name}", type=kind, help=f"{help_} (default {DEFAULTS[name.replace('-', '_')]}; "
                                                    f"--quick {QUICK[name.replace('-', '_')]})")
    for m in METHODS:
        p.add_argument(f"--lr-{m}", type=positive_float, default=DEFAULT_LR[m], help=f"peak LR of {m}")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA/QLoRA rank r (default 8)")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA/QLoRA alpha (default 16)")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation (default 0)")
    p.add_argument("--regression-data", help=".txt file or folder for the forgetting score (default: "
                                             "chatterbot-corpus English, from the 'compare' extra)")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads for every method (default: torch's less the cores busy by the load average)")
    p.add_argument("--same-process", action="store_true",
                   help="run all methods in this process (faster start; max RSS is then cumulative)")
    p.add_argument("--out", default="runs/compare", help="where compare.md/.json/.png and results go")
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
    report = compare(s)
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

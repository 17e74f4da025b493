"""Training-step benchmark against the tools people use: ours vs transformers + PEFT (+ bitsandbytes).

In one process, on the real default model (SmolLM2-135M-Instruct, loaded from the same converted directory
by both sides, so the weights and the first losses are the same), with the same batch of real text, sequence
length, dtypes and optimizer (torch.optim.AdamW, same lr), it times a training step (forward, backward,
``optimizer.step()``, ``zero_grad``) and measures its peak tensor memory:

    full    ours: models.llama + full.prepare_full_finetuning    vs  transformers LlamaForCausalLM, all trainable
    lora    ours: lora.inject_lora, r=8, alpha 16, all-linear     vs  peft.get_peft_model, same LoraConfig
    qlora   ours: qlora.model.quantize_model (NF4 + double quant) vs  transformers BitsAndBytesConfig(nf4, double
            + inject_lora                                             quant) + PEFT

in ``--dtype`` (fp32 or bf16: weights, activations, QLoRA's compute dtype), LoRA adapters fp32 on both sides
(PEFT's default), torch.optim.AdamW on both sides.

Speed: after ``--warmup`` steps each, the implementations take turns for ``--steps`` steps (so a change in
the machine's load hits both alike); tokens/s = batch x seq_len / median step time, and a speed ratio is the
median over rounds of the ratio of the two steps taken in that round (``paired_ratio``). Memory: one more step
under ``finetune.memory_tracker.TensorMemoryTracker`` (live tensor bytes, exact, the same counter for both
sides; see that file for why not RSS), with the optimizer states already allocated. The estimate of
``finetune.memory`` for our step is printed next to it.

"ours" is the model ``finetune train`` runs, as the recipes build it: the loss from the hidden states in
chunks (models/loss.py), SDPA with enable_gqa, a SwiGLU that saves gate and up only (models/llama.py), q/k/v
and gate/up over the frozen base (and LoRA's A's) as one matmul each (models/fused.py, lora/fused.py), the LoRA
branch's gradients as wide products (lora/branch.py).
``--variants`` also measures it with selective recomputation switched the other way (models/recompute.py), with
``--no-chunked-loss``, with ``--no-fused-projections``, and, for full fine-tuning, with
``torch.optim.AdamW(fused=True)``. ``--compile`` adds our model with each decoder layer compiled
(``finetune train --compile``). ``--recompute-cost`` times only our step with and without recomputation, in
turns, and reports the median ratio of the pairs.

Each row also reports the step's matmul FLOP/s as a fraction of what ``F.linear`` reaches on the same shapes,
dtype and threads, measured in the same run: how far the step is from the machine's own limit; and the page
faults and system CPU time of a step (``getrusage``): the kernel mapping fresh pages for large temporaries,
which glibc's malloc takes from the OS with mmap (above its threshold, 128 KiB to 32 MiB) and gives back on free.
transformers' step materialises the (B, T, vocab) logits and their fp32 copies (hundreds of MB) every step; its
cost in system time varies from run to run on the same machine (RESULTS_TRAINING.md) and moves the speed ratios
more than anything else.

The qlora table has one more row, our LoRA on the unquantized base, taken in turns with our QLoRA: the reference
of the target QLoRA tokens/s >= 0.9x our LoRA's.

A method whose step times varied by more than 2x (max / min over its timed steps) makes the script fail
(exit 3, nothing written): under heavy load one run gave speed ratios of 0.14x and 2.84x in one table.
``--allow-noisy`` prints such a table with the speed ratios left out.

The 2 cores are shared with other work: the load average before and after is printed and written.

Usage:
    python benchmarks/bench_training.py                           # all methods, a new section of RESULTS_TRAINING.md
    python benchmarks/bench_training.py --dtype bf16 --variants --steps 5 --threads 2   # on a quiet machine
    python benchmarks/bench_training.py --quick --allow-noisy     # a tiny random model: checks the script
    python benchmarks/bench_training.py --methods lora --dtype bf16 --compile --warmup 2 --no-write   # torch.compile
    python benchmarks/bench_training.py --batch-size 2 --seq-len 128 --no-write   # quick look
    python benchmarks/bench_training.py --from-json run.json    # re-render a saved run (--json run.json)
    python benchmarks/bench_training.py --dtype bf16 --keep-freed-memory --steps 5 --threads 2   # no page faults
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("finetune_ref") is None:
    # Not installed: import it from this checkout. Appended, not prepended: the checkout's kernels/ folder would
    # otherwise pass for Hugging Face's `kernels` package, which transformers imports.
    sys.path.append(str(REPO))

from finetune_ref.lora.fused import fuse_projections  # noqa: E402
from finetune_ref.recipes.lora import LoraRecipe  # noqa: E402
from finetune_ref.train.memory_settings import MemorySettings  # noqa: E402
from finetune_ref.train.memory import estimate_memory  # noqa: E402
from finetune_ref.train.memory_tracker import TensorMemoryTracker  # noqa: E402

RESULTS_MD = REPO / "benchmarks" / "RESULTS_TRAINING.md"
METHODS = ("full", "lora", "qlora")
LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
LORA_R, LORA_ALPHA = 8, 16
TARGET_SPEEDUP, TARGET_MEMORY = 1.25, 0.6  # targets: >= 1.25x tokens/s, <= 0.6x peak memory
LORA_REFERENCE_ROW = "ours, LoRA (unquantized base)"  # in the qlora table: the QLoRA >= 0.9x LoRA reference


# ---------------------------------------------------------------------------------------------------------
# Environment and data.
# ---------------------------------------------------------------------------------------------------------
# glibc's mallopt parameters (malloc.h), and what else in the environment decides how freed memory is treated.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")
KEPT = "glibc malloc keeping freed memory"  # how a run with --keep-freed-memory names its allocator settings
KEPT_FREED_MEMORY = f"{KEPT} (--keep-freed-memory: mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD INT_MAX)"


def keep_freed_memory() -> None:
    """Make glibc's malloc serve every block from its heap and keep what is freed (``mallopt(M_MMAP_MAX, 0)``,
    ``mallopt(M_TRIM_THRESHOLD, INT_MAX)``; what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the
    environment set at start-up). A step's large temporaries then reuse pages mapped by the step before instead of
    fresh ones, so the ratios compare the computation, less the page faults (the table's columns show what is left).
    The process keeps its peak resident memory until it exits. A malloc other than glibc's (``LD_PRELOAD``) ignores
    it.

    Raises:
        OSError: the C library has no ``mallopt`` (not glibc), or refused a setting.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        raise OSError("--keep-freed-memory needs glibc's mallopt (Linux with glibc); this C library has none")
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise OSError("--keep-freed-memory: glibc's mallopt refused M_MMAP_MAX or M_TRIM_THRESHOLD")


def allocator_settings(kept: bool) -> str:
    """How this process's malloc treats freed memory: the flag and the MALLOC_* / LD_PRELOAD environment ('' if
    neither: glibc's defaults)."""
    parts = [KEPT_FREED_MEMORY] if kept else []
    return "; ".join(parts + [f"{k}={os.environ[k]}" for k in MALLOC_ENV if os.environ.get(k)])


def allocator_note(allocator: str | None) -> str:
    """The report's sentence on the allocator settings (none for a JSON written before they were recorded)."""
    if allocator is None:
        return ""
    if allocator.startswith(KEPT):
        return (f" Allocator: {allocator}. Large temporaries reuse freed pages, so the ratios compare the "
                "computation; the page faults that remain are in the table.")
    if allocator:
        return f" Allocator settings from the environment: {allocator}."
    return " Allocator: glibc's defaults (`--keep-freed-memory` takes the page faults out of the comparison)."


def environment(threads: int) -> dict:
    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform's name
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "versions": versions, "load_before": os.getloadavg()[0]}


def text_batch(tokenizer, batch_size: int, seq_len: int) -> torch.Tensor:
    """(batch_size, seq_len) int64 token ids of Python's reference docs (pydoc_data.topics), no padding."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        ids += tokenizer.encode(topics[name])
        if len(ids) >= batch_size * seq_len:
            break
    if len(ids) < batch_size * seq_len:
        raise ValueError(f"pydoc_data has fewer than {batch_size * seq_len} tokens; lower --batch-size/--seq-len")
    return torch.tensor(ids[:batch_size * seq_len]).view(batch_size, seq_len)  # (B, T)


# ---------------------------------------------------------------------------------------------------------
# The two sides of each comparison. Each builder returns (model, trainable parameters, extra tensors to count).
# ---------------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ours(method: str, model_dir: Path, dtype: torch.dtype):
    from finetune_ref.full import prepare_full_finetuning
    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.models.loader import load_model

    lora_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    if method == "full":
        model = prepare_full_finetuning(load_model(model_dir, dtype), dtype)
    elif method == "lora":
        model = load_model(model_dir, dtype)
        inject_lora(model, lora_config, adapter_dtype=torch.float32)
    else:
        from finetune_ref.qlora.model import quantize_model

        model = quantize_model(load_model(model_dir, dtype), double_quant=True, compute_dtype=dtype)
        inject_lora(model, lora_config, adapter_dtype=torch.float32)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], []


def hf(method: str, model_dir: Path, dtype: torch.dtype):
    import transformers

    if method == "full":
        model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.requires_grad_(True)
        extra = []
    else:
        import peft

        if method == "lora":
            model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        else:
            quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                                  quantization_config=quant, device_map="cpu")
        config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
        model = peft.get_peft_model(model, config)  # adapters in fp32 (autocast_adapter_dtype)
        extra = bnb_quant_state_tensors(model)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], extra


def bnb_quant_state_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes keeps absmax/maps in a QuantState object, not in buffers: collect them for the tracker.

    Also switches off the AVX512-BF16 weight repacking that makes bnb's CPU Linear4bit drop input gradients
    after a no-grad forward (see tests/test_qlora_peft_parity.py)."""
    tensors = []
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                        if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def train_step(model, ids: torch.Tensor, optimizer) -> float:
    """One update: loss on the batch (labels = inputs, shifted inside the model), backward, AdamW, zero_grad."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_peak(model, optimizer, ids, extra) -> int:
    """Peak live tensor bytes of one steady-state step (weights, grads, states, activations, temporaries)."""
    gc.collect()
    with TensorMemoryTracker() as tracker:
        tracker.track(model, optimizer, ids, extra)
        train_step(model, ids, optimizer)
    return tracker.peak


# ---------------------------------------------------------------------------------------------------------
# Our variants: switches of the model people run (the recipes' defaults: chunked loss and recomputation on).
# ---------------------------------------------------------------------------------------------------------
DEFAULTS = {"chunked_loss": LoraRecipe().chunked_loss, "selective_recompute": LoraRecipe().selective_recompute}
# The recompute row flips the recipes' default (``--selective-recompute`` / ``--no-selective-recompute``).
RECOMPUTE_ROW = "ours --no-selective-recompute" if DEFAULTS["selective_recompute"] else "ours --selective-recompute"
VARIANTS = {"ours": {}, RECOMPUTE_ROW: {"selective_recompute": not DEFAULTS["selective_recompute"]},
            "ours --no-chunked-loss": {"chunked_loss": False},
            "ours --no-fused-projections": {"fused_projections": False}}


def configure(model, options: dict) -> None:
    """Set our model's switches to a variant's (models/llama.py: chunked_loss, selective_recompute)."""
    model.chunked_loss = options.get("chunked_loss", DEFAULTS["chunked_loss"])
    model.model.selective_recompute = options.get("selective_recompute", DEFAULTS["selective_recompute"])
    fuse_projections(model, options.get("fused_projections", True))  # models/fused.py, lora/fused.py


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator[i] / denominator[i]: two rows' step times taken in the same round, back
    to back, so that a change of the machine's load between rounds cancels. (The ratio of the two medians can pair
    one row's slow round with the other's fast one: 0.87x where the paired figure was 0.94x, with step times
    1.83-2.45 s over five rounds.)"""
    pairs = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(pairs) if pairs else float("nan")


def recompute_cost(times: dict[str, list[float]]) -> float:
    """Selective recomputation's share of step time: the paired ratio of (step with it) / (step without it) - 1."""
    on, off = (times["ours"], times[RECOMPUTE_ROW]) if DEFAULTS["selective_recompute"] else \
        (times[RECOMPUTE_ROW], times["ours"])
    return paired_ratio(on, off) - 1


def speedup(row: dict, reference: dict) -> float:
    """How many times faster ``row`` ran than ``reference``: their paired ratio of step times (reference / row)."""
    return paired_ratio(reference["step_s"], row["step_s"])


# ---------------------------------------------------------------------------------------------------------
# Matmul FLOPs of a step, and F.linear's FLOP/s on the same shapes (the machine's own limit).
# ---------------------------------------------------------------------------------------------------------
def step_matmuls(config, method: str, tokens: int, seq_len: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the matmuls of one training step: forward y = x W^T (M x K by K x N), the input
    gradient of every layer above the embedding, the weight gradient where the weight trains (full), LoRA's
    small ones left out (< 2% at r=8), the output head; attention's QK^T and PV counted as matmuls of the
    causal half (flash kernels skip the masked blocks), forward and twice in backward."""
    h, i, hq = config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim
    hkv = config.num_key_value_heads * config.head_dim
    linears = [(h, hq), (h, hkv), (h, hkv), (hq, h), (h, i), (h, i), (i, h)]  # (in, out) per decoder layer
    passes = 3 if method == "full" else 2  # forward, input gradient (, weight gradient)
    shapes = [(tokens, k, n, passes * config.num_hidden_layers) for k, n in linears]
    shapes.append((tokens, h, config.vocab_size, passes))  # lm_head (tied: the embedding's gradient as full)
    # attention: per layer 2 matmuls of (T x d) by (d x T) per head and sequence, half of them (causal), x3
    per_head = (seq_len, config.head_dim, seq_len // 2, 2 * 3 * config.num_hidden_layers * tokens // seq_len
                * config.num_attention_heads)
    return shapes + [per_head]


def matmul_flops(shapes) -> int:
    return sum(2 * m * k * n * count for m, k, n, count in shapes)


def linear_flops_per_s(shapes, dtype: torch.dtype, repeats: int = 3) -> float:
    """F.linear's FLOP/s over the step's matmul shapes (each timed ``repeats`` times, best of them), weighted
    as the step weights them: the limit a step made only of these matmuls would reach."""
    total_time = 0.0
    for m, k, n, count in shapes:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        F.linear(x, w)  # warm-up (oneDNN primitive creation)
        best = min(_timed(lambda: F.linear(x, w)) for _ in range(repeats))
        total_time += best * count
    return matmul_flops(shapes) / total_time


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_step(fn) -> tuple[float, int, float]:
    """(wall seconds, page faults, system CPU seconds) of one call. The faults are minor ones: the kernel
    mapping and zeroing fresh pages of a large allocation, which glibc's malloc gets from (and gives back to) the
    OS with mmap above its threshold; their cost, in system time, depends on the host and is the part of a step
    that varies most between runs of this benchmark."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def check_variance(times: dict[str, list[float]], limit: float = 2.0) -> list[str]:
    """Rows whose step times varied by more than ``limit``x (max / min): their ratios would be noise."""
    return [f"{name}: steps {min(t):.2f}-{max(t):.2f} s ({max(t) / min(t):.1f}x)" for name, t in times.items()
            if len(t) > 1 and max(t) / min(t) > limit]


# ---------------------------------------------------------------------------------------------------------
# One method: both sides (and our variants), timed in turns, then memory.
# ---------------------------------------------------------------------------------------------------------
def run_method(method: str, model_dir: Path, ids: torch.Tensor, args) -> dict:
    tokens, dtype = ids.numel(), DTYPES[args.dtype]

    def side(model, params, extra) -> dict:
        return {"model": model, "extra": extra, "params": params, "trainable": sum(p.numel() for p in params),
                "optimizer": torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0)}

    sides = {label: side(*build(method, model_dir, dtype))
             for label, build in (("ours", ours),) + ((("transformers", hf),) if not args.recompute_cost else ())}
    # (name, side, variant options, optimizer); our variants share one model, switched before each step
    variants = VARIANTS if args.variants else {"ours": {}}
    if args.recompute_cost:
        variants = {name: VARIANTS[name] for name in ("ours", RECOMPUTE_ROW)}
    runs = [(name, sides["ours"], opts, sides["ours"]["optimizer"]) for name, opts in variants.items()]
    if args.variants and method == "full" and not args.recompute_cost:
        fused = torch.optim.AdamW(sides["ours"]["params"], lr=LR[method], weight_decay=0.0, fused=True)
        runs.append(("ours + fused AdamW", sides["ours"], {}, fused))
    if args.compile and not args.recompute_cost:
        # A second model of ours, configured by the recipe as `finetune train --compile` configures it (each decoder
        # layer compiled in place, over the fused projections); the warm-up steps absorb the compilation.
        compiled = side(*ours(method, model_dir, dtype))
        dataclasses.replace(LoraRecipe(), compile=True).configure_model(compiled["model"])
        runs.append(("ours --compile", compiled, None, compiled["optimizer"]))
    if method == "qlora" and not args.recompute_cost:
        # Our LoRA on the unquantized base, in turns with our QLoRA: the QLoRA >= 0.9x LoRA target's reference
        lora = side(*ours("lora", model_dir, dtype))
        configure(lora["model"], {})
        runs.append((LORA_REFERENCE_ROW, lora, None, lora["optimizer"]))
    if not args.recompute_cost:
        runs.append(("transformers", sides["transformers"], None, sides["transformers"]["optimizer"]))

    def prepare(side, opts):
        if opts is not None:
            configure(side["model"], opts)
        return side["model"]

    # Numerics: the loss of every variant on the same (initial) weights and batch, before any update.
    first_loss, times = {}, {name: [] for name, *_ in runs}
    faults, system = {name: [] for name, *_ in runs}, {name: [] for name, *_ in runs}
    for name, side, opts, _ in runs:
        with torch.no_grad():
            first_loss[name] = float(prepare(side, opts)(input_ids=ids, labels=ids).loss)
    for name, side, opts, optimizer in runs:
        for _ in range(args.warmup):
            train_step(prepare(side, opts), ids, optimizer)
    for _ in range(0 if args.memory_only else args.steps):  # in turns, so a change of the machine's load hits every row alike
        for name, side, opts, optimizer in runs:
            model = prepare(side, opts)
            wall, faulted, sys_s = timed_step(lambda: train_step(model, ids, optimizer))
            times[name].append(wall)
            faults[name].append(faulted)
            system[name].append(sys_s)
    peaks = {name: measure_peak(prepare(side, opts), optimizer, ids, side["extra"])
             for name, side, opts, optimizer in runs}
    config = sides["ours"]["model"].config
    shapes = step_matmuls(config, method, tokens, ids.shape[1])
    # F.linear on the step's shapes, same dtype and threads
    limit = float("nan") if args.memory_only else linear_flops_per_s(shapes, dtype)
    predicted = {}
    for name, side, opts, _ in runs:
        # (full in bf16: the estimator models the recipe's MasterWeightAdamW, not the plain AdamW used here)
        if opts is not None and name in VARIANTS and not (method == "full" and args.dtype != "fp32"):
            settings = MemorySettings(
                method=method, optimizer="adamw", batch_size=ids.shape[0], seq_len=ids.shape[1], dtype=args.dtype,
                adapter_dtype="fp32", rank=LORA_R, attention_mask=False, keeps_output=False,
                chunked_loss=opts.get("chunked_loss", True), selective_recompute=opts.get("selective_recompute", DEFAULTS["selective_recompute"]),
                fused_projections=opts.get("fused_projections", True))
            predicted[name] = estimate_memory(config, settings).peak
    configure(sides["ours"]["model"], {})
    result = {"method": method, "tokens_per_step": tokens, "trainable": sides["ours"]["trainable"],
              "trainable_hf": sides.get("transformers", sides["ours"])["trainable"], "first_loss": first_loss,
              "recompute_cost": recompute_cost(times) if RECOMPUTE_ROW in times else float("nan"),
              "predicted_peak": predicted, "linear_flops_per_s": limit, "step_flops": matmul_flops(shapes),
              "noisy": check_variance(times), "rows": {}}
    for name in times:
        median = statistics.median(times[name]) if times[name] else float("nan")
        result["rows"][name] = {"tokens_per_s": tokens / median, "median_step_s": median, "step_s": times[name],
                                "peak_bytes": peaks[name], "linear_fraction": matmul_flops(shapes) / median / limit,
                                "page_faults": faults[name], "system_s": system[name]}
    del sides, runs
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------
def render(env: dict, results: list[dict], args) -> str:
    v = env["versions"]
    model = ("a tiny random Llama (--quick: a check that the script works, not a measurement)" if args.quick
             else "SmolLM2-135M-Instruct (real weights, the same converted directory for both sides)")
    lines = [
        f"Measured {env['date']} by `benchmarks/bench_training.py` on {env['cpu']} ({env['cores']} cores, torch "
        f"threads {env['threads']}), python {env['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, bitsandbytes {v['bitsandbytes']}. Load average (1 min) {env['load_before']:.1f} "
        f"before, {env['load_after']:.1f} after (this process included); other processes may share these cores, "
        "so absolute tokens/s are noisy; the speed ratios come from steps taken in turns (the median over rounds "
        "of the ratio of the two steps of a round), and are not printed for a method whose step times varied by "
        "more than 2x.",
        "",
        f"Model {model}, batch {args.batch_size} x {args.seq_len} tokens, labels = inputs, no padding; "
        f"{args.dtype} weights and compute (QLoRA: NF4 base, {args.dtype} compute), fp32 LoRA adapters r={LORA_R}, "
        f"alpha {LORA_ALPHA}, all linear layers of the blocks (PEFT's default adapter dtype; ours set to match); "
        f"torch.optim.AdamW, lr {LR['full']:g} full / {LR['lora']:g} LoRA and QLoRA. "
        + ("--memory-only: no timed steps. " if args.memory_only else
           f"{args.warmup} warm-up step(s), then {args.steps} timed steps each (median). ")
        + "Peak = live tensor bytes of one steady-state step "
        "(TensorMemoryTracker), the same counter for both sides. Initial loss: every row's forward on the same "
        "initial weights and batch, before any update (the numerics check). \"F.linear\": the step's matmul FLOPs "
        "(forward, input gradients, weight gradients where weights train, attention's causal half) per second, "
        "as a fraction of what F.linear reaches on the same shapes, dtype and threads in this run.",
        "",
        "Rows: \"ours\" is `finetune train`'s model as the recipes build it (chunked cross-entropy, SDPA with "
        "enable_gqa, a SwiGLU saving gate and up only, selective recomputation, q/k/v and gate/up over a frozen base "
        "as one matmul each, the LoRA branch's gradients as wide products); \"ours --flag\" the same with that "
        "`finetune train` flag; "
        "\"ours + fused AdamW\": torch.optim.AdamW(fused=True).",
        "",
        "Page faults and system time: per timed step (median), the kernel's cost of mapping fresh memory for the "
        "step's large temporaries (materialised logits most of all); it depends on the host and is what moves the "
        "speed ratios most between runs." + allocator_note(env.get("allocator")),
        "",
        "| method | implementation | tokens/s | step s (min-max) | page faults / step | system s / step | peak MB "
        "| speed vs transformers | memory vs transformers | matmul FLOP/s / F.linear's | initial loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = r["rows"].get("transformers")  # none with --recompute-cost
        for name, row in r["rows"].items():
            mem = f"{row['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
            speed = "noisy" if r["noisy"] else f"{speedup(row, ref):.2f}x" if ref else "-"
            loss = r["first_loss"].get(name, float("nan"))
            steps = f"{row['median_step_s']:.2f} ({min(row['step_s']):.2f}-{max(row['step_s']):.2f})" \
                if row["step_s"] else "-"
            if not row["step_s"]:
                speed = "-"  # --memory-only
            if name == LORA_REFERENCE_ROW:
                speed = mem = "-"  # another method: only the QLoRA vs LoRA line below compares with it
            faults = f"{statistics.median(row['page_faults']):,.0f}" if row.get("page_faults") else "-"
            system = f"{statistics.median(row['system_s']):.2f}" if row.get("system_s") else "-"
            tokens = f"{row['tokens_per_s']:.0f}" if math.isfinite(row["tokens_per_s"]) else "-"
            fraction = f"{row['linear_fraction']:.2f}" if math.isfinite(row["linear_fraction"]) else "-"
            lines.append(f"| {r['method']} | {name} | {tokens} | {steps} | {faults} | {system} | "
                         f"{row['peak_bytes'] / 1e6:.0f} | {speed} | {mem} | {fraction} | "
                         f"{loss:.4f} |")
    lines += ["", f"Targets: speed >= {TARGET_SPEEDUP}x transformers' for LoRA and QLoRA in bf16 (>= 1.0x in "
              f"fp32 and for full); peak memory <= {TARGET_MEMORY}x theirs for LoRA and QLoRA, <= 0.8x for full; "
              "QLoRA's speed >= 0.9x our LoRA's at the same dtype (speed: the paired ratio of step times).", ""]
    for r in results:
        limit = "F.linear not measured (--memory-only)" if not math.isfinite(r["linear_flops_per_s"]) else \
            f"F.linear reaches {r['linear_flops_per_s'] / 1e9:.0f} GFLOP/s"
        lines.append(f"- {r['method']}: {limit} on this step's shapes "
                     f"({r['step_flops'] / 1e9:.1f} GFLOP per step); trainable parameters "
                     f"{r['trainable']:,} (ours) / {r['trainable_hf']:,} (transformers).")
        for name, predicted in r["predicted_peak"].items():
            measured = r["rows"][name]["peak_bytes"]
            lines.append(f"  - {name}: `finetune memory` predicts {predicted / 1e6:.0f} MB, measured "
                         f"{measured / 1e6:.0f} MB ({predicted / measured - 1:+.1%}).")
        if math.isfinite(r.get("recompute_cost", float("nan"))) and not r["noisy"]:
            lines.append(f"  - selective recomputation costs {r['recompute_cost']:+.1%} of step time (median over "
                         f"{len(r['rows']['ours']['step_s'])} rounds of the ratio of its step to the step without "
                         "it, taken back to back).")
        if r["noisy"]:
            lines.append(f"  - step times varied by more than 2x, speed ratios not printed: {'; '.join(r['noisy'])}")
    by_method = {r["method"]: r for r in results}
    qlora_rows = by_method.get("qlora", {}).get("rows", {})
    if LORA_REFERENCE_ROW in qlora_rows and not args.memory_only:
        q, lo = qlora_rows["ours"], qlora_rows[LORA_REFERENCE_ROW]
        noisy = by_method["qlora"]["noisy"]
        ratio = "noisy" if noisy else f"{speedup(q, lo):.2f}x"
        by_medians = q["tokens_per_s"] / lo["tokens_per_s"]
        medians = "" if noisy else f"; tokens/s {by_medians:.2f}x as the ratio of the two medians"
        lines.append(f"- our QLoRA's speed vs our LoRA's: {ratio} (target 0.9x; taken in turns: the row "
                     f"\"{LORA_REFERENCE_ROW}\" of the qlora table{medians}).")
    elif "lora" in by_method and "qlora" in by_method and not args.memory_only and not args.recompute_cost:
        q, lo = by_method["qlora"]["rows"]["ours"], by_method["lora"]["rows"]["ours"]
        noisy = by_method["qlora"]["noisy"] or by_method["lora"]["noisy"]
        ratio = "noisy" if noisy else f"{q['tokens_per_s'] / lo['tokens_per_s']:.2f}x"
        lines.append(f"- our QLoRA's speed vs our LoRA's: {ratio} (target 0.9x; tokens/s, not taken in turns: "
                     "different methods ran one after the other).")
    return "\n".join(lines)


def tiny_model_dir(root: Path) -> Path:
    """A random Llama with the default model's shape ratios (GQA 3:1, tied head), 256 tokens, saved in HF form."""
    from finetune_ref.models.checkpoint import save_model
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    return save_model(LlamaForCausalLM(config), root / "model")


RESULTS_HEADER = ("# Training-step benchmark: ours vs transformers + PEFT (+ bitsandbytes)\n\n"
                  "Written by `benchmarks/bench_training.py`: each run adds its section at the top (newest first); "
                  "sections may also be composed from its `--json` files.\n\n")


def write_results(text: str, path: Path, date: str, dtype: str) -> None:
    """Add this run's section at the top of ``path`` (after the header), keeping every earlier section; written
    to a temporary file and renamed, so an interrupted write leaves the old file whole."""
    section = f"## Run of {date} ({dtype})\n\n{text}\n\n"
    old = path.read_text() if path.exists() else RESULTS_HEADER
    first = old.find("\n## ")
    new = old + "\n" + section if first < 0 else old[:first + 1] + section + old[first + 1:]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of full,lora,qlora (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps per implementation first (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights and compute dtype (default %(default)s)")
    parser.add_argument("--variants", action="store_true",
                        help=f"also measure our step with {RECOMPUTE_ROW.removeprefix('ours ')}, --no-chunked-loss, "
                             "--no-fused-projections (and fused AdamW for full)")
    parser.add_argument("--compile", action="store_true",
                        help="also time our model with each decoder layer torch.compile'd (finetune train --compile), "
                             "in turns with the others; use --warmup 2 or more so the compilation is not timed")
    parser.add_argument("--recompute-cost", action="store_true",
                        help="time only our step with and without selective recomputation, in turns (its cost in "
                             "step time; no transformers row)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random model, batch 2 x 32, 2 steps: checks the script works (never written; "
                             "its timings are noise, so the variance check does not fail it)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak tensor memory (exact under any load): one untimed step, no speed")
    parser.add_argument("--allow-noisy", action="store_true",
                        help="print the table even when step times varied by more than 2x (ratios left out)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="off by default. Make glibc's malloc keep freed memory for the whole process "
                             "(mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD INT_MAX; as MALLOC_MMAP_MAX_=0 "
                             "MALLOC_TRIM_THRESHOLD_=2147483647): "
                             "large temporaries reuse freed pages, which takes most page faults out of both sides' "
                             "steps to compare the computation; resident memory stays at its peak (Linux with glibc)")
    parser.add_argument("--no-write", action="store_true", help=f"do not add this run's section to {RESULTS_MD.name}")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render a --json file of an earlier run instead of measuring: its saved settings "
                             "replace --dtype, --steps and the like; adds its section to RESULTS_TRAINING.md unless "
                             "--no-write")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.from_json is not None:
        if args.keep_freed_memory:
            parser.error("--keep-freed-memory is a setting of a measurement; --from-json only renders a saved one")
        try:
            saved = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--from-json {args.from_json}: cannot read a saved run ({e})")
        try:
            vars(args).update(saved["settings"])
            text = render(saved["environment"], saved["results"], args)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            parser.error(f"--from-json {args.from_json}: not a run saved by --json ({type(e).__name__}: {e})")
        print(text)
        if not args.no_write and not args.quick:  # a --quick run checks the script; it is not a measurement
            write_results(text, RESULTS_MD, saved["environment"]["date"], args.dtype)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        parser.error(f"--methods must be a comma-separated subset of {METHODS}, each once, got {args.methods!r}")
    if min(args.batch_size, args.seq_len, args.steps, args.warmup) < 1:
        parser.error("--batch-size, --seq-len, --steps and --warmup must be >= 1")
    if args.json is not None and not (args.json.parent.is_dir() and os.access(args.json.parent, os.W_OK)):
        parser.error(f"--json {args.json}: its folder does not exist or is not writable (checked before measuring)")
    if args.keep_freed_memory:
        try:
            keep_freed_memory()
        except OSError as e:
            parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.get_num_threads())
    env["allocator"] = allocator_settings(args.keep_freed_memory)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.batch_size, args.seq_len, args.steps, args.warmup, args.no_write = 2, 32, 2, 1, True
            model_dir = tiny_model_dir(Path(tmp))
            ids = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
        else:
            from finetune_ref.models.default_model import default_model_dir
            from finetune_ref.models.tokenizer import Tokenizer

            model_dir = default_model_dir()
            try:
                ids = text_batch(Tokenizer.from_dir(model_dir), args.batch_size, args.seq_len)
            except ValueError as e:  # more tokens asked for than the text has: the flags' fault, said in one line
                parser.error(str(e))
        results = []
        for method in methods:
            print(f"[{method}] building and timing ...", file=sys.stderr, flush=True)
            results.append(run_method(method, model_dir, ids, args))
    env["load_after"] = os.getloadavg()[0]
    noisy = [f"{r['method']}: {x}" for r in results for x in r["noisy"]]
    if noisy and not (args.allow_noisy or args.quick):  # --quick checks the script; its 0.01 s steps are noise
        print("bench_training: step times varied by more than 2x, so the speed ratios would be noise; nothing "
              f"written. Re-run on a quiet machine (load average now {env['load_after']:.1f}).\n  "
              + "\n  ".join(noisy), file=sys.stderr)
        return 3
    text = render(env, results, args)
    print(text)
    if args.json:
        settings = {k: getattr(args, k) for k in ("batch_size", "seq_len", "steps", "warmup", "dtype", "quick",
                                                   "memory_only", "recompute_cost")}
        args.json.write_text(json.dumps({"environment": env, "settings": settings, "results": results}, indent=2))
    if not args.no_write:
        write_results(text, RESULTS_MD, env["date"], args.dtype)
        print(f"\nwritten to {RESULTS_MD}", file=sys.stderr)
    return 0 if args.memory_only or all(math.isfinite(r["rows"]["ours"]["tokens_per_s"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

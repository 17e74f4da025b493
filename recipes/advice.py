"""Which method, with which settings, on given hardware: the decision rules of the field, over the memory
estimator (``train/memory.py``). ``finetune advise`` (``cli/advise.py``) prints what ``advise`` returns.

The order of the decision (each rule below cites where it comes from):

1. Full fine-tuning only when the dataset is large (at least 10,000 examples) and its 16 bytes/parameter plus
   activations fit: on one GPU (DDP over several), else sharded with FSDP across them. Never by default: LoRA
   matches full fine-tuning on instruction data at a fraction of the memory (Hu et al. 2021, section 5;
   Dettmers et al. 2023, section 4), so without ``examples`` it is not chosen.
2. LoRA on the 16-bit base when it fits *with room for training*: one full-length sequence per micro-batch
   without gradient checkpointing; or when it fits only with checkpointing and QLoRA would need it too (the
   4-bit base then buys nothing but quantization error and dequantization cost).
3. QLoRA otherwise, when it fits: its NF4 base is ~4x smaller than bf16 (Dettmers et al. 2023, section 3).
4. Nothing fits: say so, and what would (a larger GPU, a shorter sequence, a smaller model).

For the chosen method the settings are the first, in order of least compromise, that fit: optimizer (AdamW,
then 8-bit, then paged), gradient checkpointing off then on, and the largest micro-batch (a power of two, at
most the target batch per GPU); gradient accumulation makes up the target batch.
"""

from __future__ import annotations

import dataclasses
import math

from finetune_ref.models.config import LlamaConfig
from finetune_ref.train.memory import estimate_memory
from finetune_ref.train.memory_settings import DTYPE_BYTES, MemorySettings
from finetune_ref.train.memory_shapes import LINEAR_NAMES, PRESETS, linear_shapes, parameter_count, preset_config

# ---------------------------------------------------------------------------------------------------------
# The rules, as data. Each cites its source.
# ---------------------------------------------------------------------------------------------------------
# A GPU holds less than its size for tensors: the CUDA context (~0.5-1 GB) and allocator fragmentation (~5-10%),
# which train/memory.py does not model (its docstring). A plan fits when peak * (1 + fraction) + context <= size.
CUDA_CONTEXT_BYTES = 1_000_000_000
FRAGMENTATION = 0.10
# Full fine-tuning pays off for large datasets ("tens of thousands of examples or more", common practice);
# below that LoRA matches it (Hu et al. 2021, section 5; Dettmers et al. 2023, section 4) and forgets less
# (Biderman et al. 2024, "LoRA Learns Less and Forgets Less").
FULL_MIN_EXAMPLES = 10_000
LARGE_DATASET = 10_000          # rank 16-32 for large or complex data (common practice)
SMALL_DATASET = 1_000           # LoRA dropout below this many examples (QLoRA, appendix B: 0.1 / 0.05)
LARGE_MODEL_PARAMETERS = 20e9   # QLoRA, appendix B, table 9: lr 2e-4 and dropout 0.1 up to 13B; 1e-4, 0.05 above
TARGET_BATCH = 16               # sequences per update: QLoRA, appendix B, table 9 (batch 16 for 7B and 13B)
DEFAULT_SEQ_LEN = 2048          # a common fine-tuning context (Llama 2's pretraining context is 4096)
WARMUP_RATIO = 0.03             # 3% warmup then cosine decay (common practice: Stanford Alpaca's recipe)
TASKS = ("general", "complex", "style")
METHODS = ("full", "lora", "qlora")
# Optimizers to try, least compromise first: full fine-tuning's states are 8 of its 16 B/param, so 8-bit states
# (Dettmers et al. 2022) and paging (Dettmers et al. 2023, section 3) are what make it fit; LoRA's states are
# tiny; QLoRA pages its states to absorb memory spikes (Dettmers et al. 2023, section 3).
OPTIMIZERS = {"full": ("adamw", "adamw8bit", "paged_adamw8bit"), "lora": ("adamw",), "qlora": ("paged_adamw",)}


def lora_rank(task: str, examples: int | None) -> int:
    """r = 8 by default; 16 for complex or large data, 32 for both; 4 for format or style (common practice;
    Hu et al. 2021, section 7.2: a small r already captures the update; QLoRA, section 4: r matters little
    once all linear layers are adapted)."""
    large = examples is not None and examples >= LARGE_DATASET
    if task == "style":
        return 4
    if task == "complex":
        return 32 if large else 16
    return 16 if large else 8


def lora_alpha(rank: int) -> int:
    """alpha = 2r: scaling alpha / r = 2 whatever r (common practice; alpha = r, scaling 1, is the other
    convention; Hu et al. 2021, section 4.1 fix alpha so that changing r needs no new learning rate)."""
    return 2 * rank


def learning_rate(method: str, parameters: int) -> float:
    """1e-4..3e-4 for LoRA/QLoRA (QLoRA, table 9: 2e-4 up to 13B, 1e-4 above); 1e-5..2e-5 for full fine-tuning
    (common practice: Stanford Alpaca used 2e-5). 1e-5 with LoRA underfits: the most common mistake."""
    large = parameters >= LARGE_MODEL_PARAMETERS
    if method == "full":
        return 1e-5 if large else 2e-5
    return 1e-4 if large else 2e-4


def lora_dropout(examples: int | None, parameters: int) -> float:
    """0.05-0.1 under 1,000 examples (QLoRA, table 9: 0.1 up to 13B, 0.05 above), else 0; unknown size: 0.05."""
    if examples is None:
        return 0.05
    if examples < SMALL_DATASET:
        return 0.05 if parameters >= LARGE_MODEL_PARAMETERS else 0.1
    return 0.0


def needed_bytes(peak: int) -> int:
    """GPU memory a plan of tensor-byte ``peak`` needs: fragmentation and the CUDA context on top."""
    return int(peak * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES


# ---------------------------------------------------------------------------------------------------------
# Plans: the settings of one method that fit, found with the estimator.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """One method's settings on the hardware and the estimated peak per GPU (tensor bytes; ``needed``: with
    the CUDA context and fragmentation). ``fits`` False: the most frugal settings, which do not fit."""

    method: str
    fits: bool
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    optimizer: str
    # "single" (one GPU); "ddp" (a copy per GPU: the one-GPU estimate, DDP's gradient buckets not counted);
    # "fsdp" (sharded across GPUs, _fsdp_peak)
    parallel: str
    gpus: int                  # data-parallel processes: the effective batch is micro_batch x grad_accum x gpus
    peak: int
    needed: int


def _fsdp_peak(c: LlamaConfig, s: MemorySettings, peak: int, live: dict[str, int], gpus: int) -> int:
    """Per-GPU peak of full fine-tuning sharded over ``gpus`` (ZeRO stage 3, Rajbhandari et al. 2020, section 5;
    FSDP, Zhao et al. 2023): weights, gradients, optimizer states and master weights are split, activations are
    not, and one decoder layer's parameters and gradients are gathered at a time. train/memory.py does not model
    sharding; this is that approximation."""
    sharded = live["weights"] + live["gradients"] + live["optimizer_states"] + live["master_weights"]
    layer = sum(o * i for o, i in linear_shapes(c).values()) + 2 * c.hidden_size
    return int(peak - sharded * (1 - 1 / gpus)) + 2 * layer * DTYPE_BYTES[s.dtype]


def _device_peak(c: LlamaConfig, s: MemorySettings, parallel: str, gpus: int) -> int:
    est = estimate_memory(c, s)
    peak = est.peak - est.pageable  # paged states live in host memory (optim/paging.py)
    if parallel == "fsdp":
        return _fsdp_peak(c, s, peak, est.live_at_peak, gpus)
    return peak


def _micro_batches(target_batch: int, gpus: int) -> list[int]:
    """Powers of two from the per-GPU share of the target batch down to 1."""
    top = max(1, math.ceil(target_batch / gpus))
    return [2 ** k for k in range(int(math.log2(top)), -1, -1)]


def plan_method(c: LlamaConfig, method: str, gpu_memory: int, gpus: int, seq_len: int, rank: int,
                target_batch: int = TARGET_BATCH, gradient_checkpointing: bool | None = None) -> Plan:
    """The least-compromise settings of ``method`` that fit ``gpus`` GPUs of ``gpu_memory`` bytes, else its most
    frugal settings with ``fits=False``. ``gradient_checkpointing`` None: off if that fits, else on."""
    layouts = ["single" if gpus == 1 else "ddp"] + (["fsdp"] if method == "full" and gpus > 1 else [])
    checkpointing = (False, True) if gradient_checkpointing is None else (gradient_checkpointing,)
    frugal = None
    for optimizer in OPTIMIZERS[method]:
        for parallel in layouts:
            for ckpt in checkpointing:
                for micro in _micro_batches(target_batch, gpus):
                    # Activations as stored, not selectively recomputed (the training default): the advice
                    # sets LoRA dropout, and an adapter's dropped input is saved whatever is recomputed.
                    s = MemorySettings(method=method, optimizer=optimizer, batch_size=micro, seq_len=seq_len,
                                       gradient_checkpointing=ckpt, dtype="bf16", rank=rank,
                                       target_modules=LINEAR_NAMES, selective_recompute=False)
                    peak = _device_peak(c, s, parallel, gpus)
                    accum = math.ceil(target_batch / (micro * gpus))
                    plan = Plan(method, needed_bytes(peak) <= gpu_memory, micro, accum, ckpt, optimizer, parallel,
                                gpus, peak, needed_bytes(peak))
                    if plan.fits:
                        return plan
                    if frugal is None or plan.peak < frugal.peak:
                        frugal = plan
    return frugal


# ---------------------------------------------------------------------------------------------------------
# The advice.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Advice:
    """What ``advise`` decided: the method (None if nothing fits), why, its settings, every method's plan,
    a one-line "why not" for each method not chosen, and what would fit when nothing does."""

    recommended: str | None
    reasons: list[str]
    settings: dict
    plans: dict[str, Plan]
    why_not: dict[str, str]
    would_fit: list[str]

    def to_dict(self) -> dict:
        return {"recommended": self.recommended, "reasons": self.reasons, "settings": self.settings,
                "plans": {m: dataclasses.asdict(p) for m, p in self.plans.items()}, "why_not": self.why_not,
                "would_fit": self.would_fit}


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _full_gpus_needed(c: LlamaConfig, gpu_memory: int, seq_len: int, rank: int) -> int | None:
    """The fewest GPUs of this size on which full fine-tuning fits sharded (up to 1024), or None."""
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if plan_method(c, "full", gpu_memory, n, seq_len, rank, target_batch=n).fits:
            return n
    return None


def _settings(c: LlamaConfig, plan: Plan, task: str, examples: int | None, epochs: int, seq_len: int) -> dict:
    params = parameter_count(c)
    effective = plan.micro_batch * plan.grad_accum * plan.gpus
    out = {"method": plan.method, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
           "effective_batch": effective, "seq_len": seq_len, "gradient_checkpointing": plan.gradient_checkpointing,
           "optimizer": plan.optimizer, "parallel": plan.parallel, "lr": learning_rate(plan.method, params),
           "scheduler": "cosine", "warmup_ratio": WARMUP_RATIO, "precision": "bf16"}
    if examples is not None:
        updates = epochs * math.ceil(examples / effective)
        out.update(updates=updates, warmup_steps=max(1, round(WARMUP_RATIO * updates)))
    if plan.method != "full":
        r = lora_rank(task, examples)
        out.update(rank=r, alpha=lora_alpha(r), dropout=lora_dropout(examples, params), targets="all-linear")
    if plan.method == "qlora":
        out.update(quant="nf4", blocksize=64, double_quant=True)
    return out


def advise(c: LlamaConfig, gpu_memory: int, gpus: int = 1, examples: int | None = None,
           seq_len: int = DEFAULT_SEQ_LEN, task: str = "general", target_batch: int = TARGET_BATCH,
           epochs: int = 1) -> Advice:
    """Recommend a method and its settings for model shape ``c`` on ``gpus`` GPUs of ``gpu_memory`` bytes.

    Raises:
        ValueError: a non-positive size or count, or an unknown ``task`` (the argument is named).
    """
    for name, value in (("gpu_memory", gpu_memory), ("gpus", gpus), ("seq_len", seq_len),
                        ("target_batch", target_batch), ("epochs", epochs)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if examples is not None and (not isinstance(examples, int) or examples < 1):
        raise ValueError(f"examples must be a positive integer, got {examples!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if seq_len > c.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context ({c.max_position_embeddings} tokens, "
                         "max_position_embeddings)")
    rank = lora_rank(task, examples)
    plans = {m: plan_method(c, m, gpu_memory, gpus, seq_len, rank, target_batch) for m in METHODS}
    # "Room for training": LoRA without gradient checkpointing; and would QLoRA avoid checkpointing?
    lora_roomy = plan_method(c, "lora", gpu_memory, gpus, seq_len, rank, target_batch, gradient_checkpointing=False)
    qlora_roomy = plan_method(c, "qlora", gpu_memory, gpus, seq_len, rank, target_batch, gradient_checkpointing=False)
    lora, qlora, full = plans["lora"], plans["qlora"], plans["full"]
    params, base16 = parameter_count(c), parameter_count(c) * 2
    size = f"{gpus} x {_gb(gpu_memory)}" if gpus > 1 else _gb(gpu_memory)
    large_data = examples is not None and examples >= FULL_MIN_EXAMPLES
    reasons, why_not, would_fit = [], {}, []

    if large_data and full.fits:
        chosen = "full"
        reasons.append(f"{examples:,} examples is a large dataset (>= {FULL_MIN_EXAMPLES:,}), where full fine-tuning "
                       "can learn more than a low-rank update")
        reasons.append(f"its 16 bytes/parameter plus activations fit: {_gb(full.needed)} per GPU "
                       f"({full.parallel}{', sharded across ' + str(gpus) + ' GPUs' if full.parallel == 'fsdp' else ''})")
        if lora.fits:
            why_not["lora"] = (f"fits ({_gb(lora.needed)} per GPU) and is the cheaper choice; full fine-tuning is "
                               "preferred only because the dataset is large")
    elif lora_roomy.fits or (lora.fits and not qlora_roomy.fits):
        chosen = "lora"
        reasons.append(f"the 16-bit base ({_gb(base16)}) fits on {size} "
                       + ("with room for training: no gradient checkpointing needed" if lora_roomy.fits else
                          "with gradient checkpointing, which QLoRA would need too"))
        reasons.append("LoRA keeps the 16-bit weights (no quantization error) and trains faster than QLoRA, which "
                       "dequantizes every weight in every step")
    elif qlora.fits:
        chosen = "qlora"
        linears = c.num_hidden_layers * sum(o * i for o, i in linear_shapes(c).values())
        reasons.append(f"the 16-bit base ({_gb(base16)}) leaves no room for LoRA training on {size}; NF4 with double "
                       f"quantization stores its linear layers in {_gb(linears * 4.127 / 8)} instead of "
                       f"{_gb(linears * 2)} (4.127 bits/parameter, Dettmers et al. 2023, section 3)")
    else:
        chosen = None
        reasons.append(f"even QLoRA at micro-batch 1 with gradient checkpointing needs {_gb(qlora.needed)} per GPU "
                       f"at {seq_len} tokens; {size} available (LoRA and QLoRA hold the whole base on each GPU)")
        would_fit.append(f"a GPU of at least {_gb(qlora.needed)}, for QLoRA at {seq_len} tokens")
        shorter = next((t for t in (2 ** k for k in range(int(math.log2(seq_len)), 6, -1))
                        if t < seq_len and plan_method(c, "qlora", gpu_memory, gpus, t, rank, target_batch).fits), None)
        if shorter:
            would_fit.append(f"QLoRA at --seq-len {shorter} on this GPU")
        smaller = [(parameter_count(preset_config(p)), p) for p in PRESETS
                   if plan_method(preset_config(p), "qlora", gpu_memory, gpus, seq_len, rank, target_batch).fits]
        if smaller:
            would_fit.append(f"a smaller model: {max(smaller)[1]} (the largest preset that fits, with QLoRA)")

    if chosen != "full" and "full" not in why_not:
        if examples is None:
            why_not["full"] = ("not by default: LoRA matches it on typical fine-tuning data at a fraction of the "
                               "memory; give --examples (full needs tens of thousands)")
        elif not large_data:
            why_not["full"] = (f"{examples:,} examples is too few (< {FULL_MIN_EXAMPLES:,}) to pay for 16 bytes/"
                               "parameter; LoRA matches it there and forgets less")
        else:
            n = _full_gpus_needed(c, gpu_memory, seq_len, rank)
            why_not["full"] = (f"does not fit: needs {_gb(full.needed)} per GPU at its most frugal on {gpus} GPU(s)"
                               + (f"; {n} GPUs of this size would fit it with FSDP" if n else ""))
    if chosen not in ("lora", None) and "lora" not in why_not:
        why_not["lora"] = (f"needs {_gb(lora_roomy.needed)} per GPU without gradient checkpointing"
                           + (f" ({_gb(lora.needed)} with it)" if lora.fits else ", and does not fit with it")
                           + f"; {size} available")
    if chosen not in ("qlora", None):
        why_not["qlora"] = ("not needed: the 16-bit base fits, and QLoRA trades throughput (published: 1.3-1.6x "
                            "slower than LoRA) and quantization error for memory you have")
    if chosen is None:
        why_not.update({m: f"needs {_gb(plans[m].needed)} per GPU at its most frugal" for m in METHODS})

    settings = _settings(c, plans[chosen], task, examples, epochs, seq_len) if chosen else {}
    return Advice(chosen, reasons, settings, plans, why_not, would_fit)

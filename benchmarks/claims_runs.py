"""The measurements behind docs/claims.md (``benchmarks/claims.py`` runs them and writes the page): training runs
of the embedded model through the recipes and the loop (``recipes/``, ``train/trainer.py``), byte counts of real
tensors, merges and re-quantization (``lora/``, ``qlora/merge.py``, ``gptq/``), and interleaved step timing.

Every number comes from this project's code on SmolLM2-135M-Instruct and Python's reference docs; shapes of
other models (Llama-2 7B) are built on PyTorch's meta device (real modules and parameters, no storage).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch

from bench_training import paired_ratio
from finetune_ref.cli.compare_settings import regression_documents
from finetune_ref.lora import LoraConfig, inject_lora, lora_layers, merge_and_unload, trainable_parameters
from finetune_ref.models.default_model import default_model_dir
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.models.loader import load_model
from finetune_ref.models.tokenizer import Tokenizer
from finetune_ref.recipes import FullRecipe, LoraRecipe, QLoraRecipe
from finetune_ref.train.data import BatchIterator, build_datasets, cap_tokens, iter_batches, text_examples
from finetune_ref.train.distributed import DistInfo
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.memory_shapes import preset_config
from finetune_ref.train.memory_tracker import tensor_bytes
from finetune_ref.train.step import accumulate_gradients, model_inputs, optimizer_for
from finetune_ref.train.trainer import train


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each study trains. ``small_examples`` x ``small_epochs``: the dropout study's small dataset."""

    steps: int
    batch_size: int
    seq_len: int
    warmup: int
    eval_every: int
    eval_tokens: int
    seeds: tuple[int, ...]
    small_examples: int
    small_epochs: int
    calibration: int          # GPTQ calibration sequences
    timing_rounds: int        # interleaved LoRA/QLoRA steps timed per method


QUICK = Budget(steps=8, batch_size=2, seq_len=64, warmup=1, eval_every=4, eval_tokens=1024, seeds=(0, 1),
               small_examples=8, small_epochs=3, calibration=16, timing_rounds=3)
FULL = Budget(steps=32, batch_size=4, seq_len=256, warmup=2, eval_every=8, eval_tokens=4096, seeds=(0, 1, 2),
              small_examples=64, small_epochs=5, calibration=64, timing_rounds=6)


EVAL_BATCH = 8  # sequences per evaluation forward


@dataclasses.dataclass
class Data:
    """The model directory, training examples and the held-out and regression batches of one budget."""

    model_dir: object
    pad: int
    train: list
    heldout: list
    regression: list
    regression_name: str | None
    before: dict = dataclasses.field(default_factory=dict)  # method -> losses of its base before training


def load_data(b: Budget) -> Data:
    model_dir = default_model_dir()
    tok = Tokenizer.from_dir(model_dir)
    train_examples, held = build_datasets(tok, None, seq_len=b.seq_len)
    name, docs = regression_documents()
    regression = cap_tokens(text_examples(tok, docs, b.seq_len), b.eval_tokens) if docs else []
    return Data(model_dir, tok.pad_token_id, train_examples,
                list(iter_batches(cap_tokens(held, b.eval_tokens), EVAL_BATCH, tok.pad_token_id)),
                list(iter_batches(regression, EVAL_BATCH, tok.pad_token_id)), name)


# ---------------------------------------------------------------------------------------------------------
# Training runs.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. ``targets``: "all-linear" or a comma-separated list; ``small``: the small dataset."""

    method: str = "lora"
    lr: float = 2e-4
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"
    dropout: float = 0.0
    seed: int = 0
    small: bool = False


def recipe_for(spec: RunSpec, b: Budget, steps: int):
    """The method's recipe with the study's settings, as ``finetune compare`` builds them (cli/compare_method.py):
    a bf16 base; full fine-tuning trains bf16 weights with fp32 master weights; fp32 adapters for LoRA/QLoRA."""
    loop = dict(steps=steps, lr=spec.lr, warmup_steps=min(b.warmup, steps), eval_every=b.eval_every,
                seed=spec.seed, batch_size=b.batch_size, seq_len=b.seq_len, progress=False)
    if spec.method == "full":
        return FullRecipe(precision="bf16", **loop)
    targets = spec.targets if spec.targets == "all-linear" else tuple(spec.targets.split(","))
    adapters = dict(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=targets, precision="fp32",
                    dtype="bf16")
    if spec.method == "lora":
        return LoraRecipe(**loop, **adapters)
    return QLoraRecipe(**loop, **adapters, compute_dtype="bf16")


def _before(model, data: Data, base: str) -> dict:
    if base not in data.before:
        data.before[base] = {"heldout": evaluate(model, data.heldout)["loss"],
                             "regression": evaluate(model, data.regression)["loss"] if data.regression else None}
    return data.before[base]


def train_run(spec: RunSpec, data: Data, b: Budget, keep: bool = False, say=print) -> dict:
    """Train one run; held-out loss before, during and after, the regression loss after, tokens/s."""
    examples = data.train[:b.small_examples] if spec.small else data.train
    steps = b.small_epochs * (len(examples) // b.batch_size) if spec.small else b.steps
    cfg = recipe_for(spec, b, steps)
    torch.manual_seed(spec.seed)  # LoRA's A initialisation (recipes/run.py does the same)
    model = cfg.build(data.model_dir, DistInfo()).model
    before = _before(model, data, spec.method)  # each method's base as it loads it (bf16 dense, or NF4)
    batches = BatchIterator(examples, b.batch_size, data.pad, seed=spec.seed, drop_last=True)
    curve, eval_s = [[0, before["heldout"]]], [0.0]

    def eval_fn():
        start = time.perf_counter()
        out = evaluate(model, data.heldout)
        eval_s[0] += time.perf_counter() - start
        return out

    def on_update(update, metrics):
        if "eval" in metrics:
            curve.append([update, metrics["eval"]["loss"]])

    start = time.perf_counter()
    result = train(model, batches, cfg, eval_fn=eval_fn, on_update=on_update)
    train_s = time.perf_counter() - start - eval_s[0]
    trainable, total = trainable_parameters(model)
    out = {"spec": dataclasses.asdict(spec), "steps": steps, "before": before["heldout"],
           "after": result["eval"]["loss"], "curve": curve,
           "regression_before": before["regression"],
           "regression_after": evaluate(model, data.regression)["loss"] if data.regression else None,
           "tokens_per_s": steps * b.batch_size * b.seq_len / train_s, "trainable": trainable, "total": total}
    say(f"  {spec}: held-out {out['before']:.4f} -> {out['after']:.4f} ({train_s:.0f} s)")
    if keep:
        out["model"] = model
    return out


# ---------------------------------------------------------------------------------------------------------
# Memory: bytes of real tensors.
# ---------------------------------------------------------------------------------------------------------
def full_finetuning_bytes(data: Data) -> dict:
    """Bytes per parameter that full fine-tuning in bf16 with AdamW holds after one real update: bf16 weights and
    gradients, the fp32 master weights and both fp32 moments (MasterWeightAdamW, optim/adamw.py)."""
    cfg = FullRecipe(precision="bf16", lr=2e-5, steps=1, warmup_steps=0, progress=False)
    model = cfg.build(data.model_dir, DistInfo()).model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_for(model, cfg)
    batch = data.heldout[0]
    accumulate_gradients(model, [batch], int((batch["labels"][:, 1:] != -100).sum()), cfg.precision, DistInfo())
    grads = tensor_bytes(p.grad for p in params)
    optimizer.step()
    by_key: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and t.numel() > 1:  # leave out the step counters
                by_key[key] = by_key.get(key, 0) + tensor_bytes([t])
    n = sum(p.numel() for p in params)
    out = {"parameters": n, "weights": tensor_bytes(params) / n, "gradients": grads / n,
           **{k: v / n for k, v in sorted(by_key.items())}}
    out["total"] = out["weights"] + out["gradients"] + sum(v / n for v in by_key.values())
    return out


def lora_parameter_share(data: Data) -> dict:
    """Trainable share of LoRA r=8 (all-linear, and q_proj,v_proj as Hu et al. 2021) on this model (loaded) and
    on published shapes (built on the meta device): counted from the modules' parameters."""
    out = {}
    shapes = {"SmolLM2-135M (this model)": None, "Llama-2 7B": "llama-2-7b", "Llama-3.1 8B": "llama-3.1-8b"}
    for label, preset in shapes.items():
        for targets in ("all-linear", "q_proj,v_proj"):
            if preset is None:
                model = load_model(data.model_dir, dtype=torch.bfloat16)
            else:
                with torch.device("meta"):
                    model = LlamaForCausalLM(preset_config(preset))
            t = targets if targets == "all-linear" else targets.split(",")
            inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=t))
            trainable, total = trainable_parameters(model)
            out[f"{label} | {targets}"] = {"trainable": trainable, "total": total, "percent": 100 * trainable / total}
            del model
    return out


def nf4_sizes(data: Data) -> dict:
    """Storage of the base in bf16 and in NF4 (blocksize 64) with and without double quantization: every byte of
    the quantized layers (qlora.model.quantized_nbytes) and of the whole model (all distinct storages)."""
    from finetune_ref.qlora.model import quantize_model, quantized_nbytes

    base = load_model(data.model_dir, dtype=torch.bfloat16)
    out = {"bf16 model bytes": tensor_bytes([*base.parameters(), *base.buffers()])}
    linears = [m.weight for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    out["bf16 linear bytes"] = tensor_bytes(linears)
    out["linear parameters"] = sum(w.numel() for w in linears)
    for dq in (True, False):
        q = quantize_model(copy.deepcopy(base), blocksize=64, double_quant=dq)
        nb = quantized_nbytes(q)
        key = "nf4+dq" if dq else "nf4"
        out[f"{key} linear bytes"] = nb["bytes"]
        out[f"{key} bits/param"] = 8 * nb["bytes"] / nb["parameters"]
        out[f"{key} model bytes"] = tensor_bytes([*q.parameters(), *q.buffers()])
        del q
    return out


# ---------------------------------------------------------------------------------------------------------
# Merging.
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def lora_merge_exactness(data: Data) -> dict:
    """fp32 base, LoRA r=8 all-linear with random nonzero B (a trained-looking adapter): logits of the unmerged
    model against the merged one (lora.merge_and_unload) on held-out batches."""
    model = load_model(data.model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for _, layer in lora_layers(model):
        for b in layer.lora_B.values():
            b.weight.normal_(0, 0.02)
    model.eval()
    batches = data.heldout[:2]
    unmerged = [model(**model_inputs(x)).logits for x in batches]
    merged_model = merge_and_unload(model)
    merged = [merged_model(**model_inputs(x)).logits for x in batches]
    diff = max(float((a - m).abs().max()) for a, m in zip(unmerged, merged))
    scale = max(float(a.abs().max()) for a in unmerged)
    equal = sum(int((a == m).sum()) for a, m in zip(unmerged, merged)) / sum(a.numel() for a in unmerged)
    return {"logits_max_abs_diff": diff, "logits_max_abs": scale, "bitwise_equal_share": equal}


def qlora_merges(qlora_model, data: Data, b: Budget) -> dict:
    """A trained QLoRA model merged: into the dequantized NF4 base (what it trained against) and into the original
    16-bit base; then the NF4-dequant merge re-quantized with NF4 (PEFT's 4-bit merge), RTN and GPTQ (4-bit, group
    128). Each against the unmerged QLoRA model on the held-out batches (qlora.merge.merge_report)."""
    from finetune_ref.gptq.format import GPTQConfig
    from finetune_ref.gptq.model import gptq_quantize_model
    from finetune_ref.qlora.merge import merge_qlora, merge_report

    calibration = list(iter_batches(data.train[:b.calibration], b.batch_size, data.pad))
    rows = {}
    builds = {
        "merged into NF4-dequantized base (fp32)": lambda: merge_qlora(qlora_model, dtype=torch.float32),
        "merged into original 16-bit base (fp32)": lambda: merge_qlora(
            qlora_model, base="original", original=load_model(data.model_dir, dtype=torch.bfloat16),
            dtype=torch.float32),
        "merged, re-quantized NF4 (PEFT's 4-bit merge)": lambda: merge_qlora(qlora_model, requantize="nf4"),
        "merged, RTN 4-bit g128": lambda: gptq_quantize_model(merge_qlora(qlora_model, dtype=torch.float32), None,
                                                              GPTQConfig(method="rtn")),
        "merged, GPTQ 4-bit g128": lambda: gptq_quantize_model(merge_qlora(qlora_model, dtype=torch.float32),
                                                               calibration, GPTQConfig()),
    }
    for label, build in builds.items():
        merged = build()
        rows[label] = merge_report(qlora_model, merged, data.heldout)
        del merged
    return rows


# ---------------------------------------------------------------------------------------------------------
# Throughput.
# ---------------------------------------------------------------------------------------------------------
def step_throughput(data: Data, b: Budget, device: str = "cpu") -> dict:
    """Tokens/s of one training update (forward, backward, optimizer step) for LoRA and QLoRA on one batch of
    ``batch_size`` x ``seq_len`` tokens, the two methods taking turns (so load changes hit both alike)."""
    models = {}
    for method in ("lora", "qlora"):
        spec = RunSpec(method=method)
        cfg = recipe_for(spec, b, 1)
        torch.manual_seed(0)
        model = cfg.build(data.model_dir, DistInfo()).model.to(device)
        models[method] = (model, optimizer_for(model, cfg), cfg)
    batch = {k: v.to(device) for k, v in next(BatchIterator(data.train, b.batch_size, data.pad)).items()}
    n_label = int((batch["labels"][:, 1:] != -100).sum())
    times: dict[str, list[float]] = {m: [] for m in models}
    for round_ in range(b.timing_rounds + 1):  # the first round warms up
        for method, (model, optimizer, cfg) in models.items():
            model.train()
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            accumulate_gradients(model, [batch], n_label, cfg.precision, DistInfo())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device != "cpu":
                torch.cuda.synchronize()
            if round_:
                times[method].append(time.perf_counter() - start)
    tokens = b.batch_size * b.seq_len
    out = {m: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "times": t}
           for m, t in times.items()}
    # per round, back to back (bench_training.paired_ratio): LoRA's step time over QLoRA's = QLoRA's tokens/s over
    # LoRA's, so that a change of load between rounds cancels instead of pairing one method's slow round with the
    # other's fast one
    out["qlora_over_lora"] = paired_ratio(times["lora"], times["qlora"])
    return out

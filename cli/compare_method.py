"""One method of ``finetune compare``, in its own process: its recipe with the comparison's settings, training,
evaluation, the saved result and the memory of one training step (measured and estimated)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

from finetune_ref.cli.compare_settings import CompareSettings, regression_documents
from finetune_ref.recipes import FullRecipe, LoraRecipe, QLoraRecipe, RunConfig
from finetune_ref.train.data import cap_tokens, count_label_tokens
from finetune_ref.train.memory_tracker import TensorMemoryTracker, tensor_bytes
from finetune_ref.train.step import autocast_context, clip_grad_norm_, model_inputs


def method_recipe(method: str, s: CompareSettings) -> RunConfig:
    """The recipe of ``method`` with the comparison's settings (``cli/compare.py``): its own learning rate, the
    shared budget and schedule; a bf16 (or fp32) base; fp32 adapters, so LoRA and QLoRA train fp32 weights."""
    loop = dict(steps=s.steps, lr=s.lr[method], warmup_steps=s.warmup, eval_every=s.eval_every, seed=s.seed,
                batch_size=s.batch_size, seq_len=s.seq_len, progress=False)
    if method == "full":  # bf16 weights: precision "bf16" gives them fp32 master weights and moments
        return FullRecipe(precision=s.precision, **loop)
    adapters = dict(rank=s.rank, alpha=s.alpha, targets="all-linear", precision="fp32", dtype=s.precision)
    if method == "lora":
        return LoraRecipe(**loop, **adapters)
    return QLoraRecipe(**loop, **adapters, compute_dtype=s.precision)  # NF4 matmuls in the base's dtype


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
    from finetune_ref.lora import trainable_parameters
    from finetune_ref.models.default_model import default_model_dir
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.train.data import BatchIterator, text_examples, build_datasets, iter_batches
    from finetune_ref.train.distributed import DistInfo
    from finetune_ref.train.evaluation import evaluate
    from finetune_ref.train.memory_settings import MemorySettings
    from finetune_ref.train.memory import estimate_memory
    from finetune_ref.train.memory_shapes import parameter_count
    from finetune_ref.train.step import optimizer_for
    from finetune_ref.train.trainer import train

    model_dir = Path(s.model_dir) if s.model_dir else default_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    train_examples, held = build_datasets(tokenizer, None, seq_len=s.seq_len)
    eval_sets = {"heldout": cap_tokens(held, s.eval_tokens)}
    reg_name, reg_docs = regression_documents(s.regression_data)
    if reg_docs:
        eval_sets["regression"] = cap_tokens(text_examples(tokenizer, reg_docs, s.seq_len), s.eval_tokens)
    batches_of = {k: list(iter_batches(v, s.batch_size, tokenizer.pad_token_id)) for k, v in eval_sets.items()}
    torch.manual_seed(s.seed)  # the same LoRA A initialisation for LoRA and QLoRA
    cfg = method_recipe(method, s)
    built = cfg.build(model_dir, DistInfo())
    cfg.configure_model(built.model)
    model, precision = built.model, cfg.precision
    trainable, _ = trainable_parameters(model)
    base_params = parameter_count(model.config)  # logical count: an NF4 weight counts as one parameter
    total = base_params + (trainable if method != "full" else 0)
    before = {k: evaluate(model, b) for k, b in batches_of.items()}
    print(f"[{method}] before: " + ", ".join(f"{k} loss {v['loss']:.4f} ({v['tokens']} tokens)"
                                             for k, v in before.items()), flush=True)
    optimizer = optimizer_for(model, cfg)
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
    built.export(model, saved)
    files = ("config.json", "model.safetensors") if method == "full" else \
        ("adapter_config.json", "adapter_model.safetensors")
    saved_bytes = sum((saved / f).stat().st_size for f in files)  # what was just written, nothing older
    memory = measure_step(model, optimizer, next(batches), precision)  # after training: states exist
    estimate = estimate_memory(model.config, MemorySettings(
        method=method, optimizer=cfg.optimizer, batch_size=s.batch_size, seq_len=s.seq_len,
        dtype=s.precision, adapter_dtype=None if method == "full" else "fp32", rank=s.rank))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    tokens = s.steps * s.batch_size * s.seq_len
    return {"method": method, "lr": s.lr[method], "optimizer": cfg.optimizer, "train_precision": precision,
            "trainable_params": trainable, "total_params": total,
            "trainable_pct": 100.0 * trainable / total, "saved_dir": str(saved), "saved_bytes": saved_bytes,
            "memory": memory, "estimated_peak": estimate.peak, "max_rss": rss, "tokens": tokens,
            "tokens_per_s": tokens / train_s, "train_s": train_s, "wall_s": time.perf_counter() - wall_start,
            "before": before, "after": after, "regression_corpus": reg_name, "curve": curve}



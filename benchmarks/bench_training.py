"""Training-step benchmark against the tools people use: ours vs transformers + PEFT (+ bitsandbytes).

In one process, on the real default model (SmolLM2-135M-Instruct, loaded from the same converted directory
by both sides, so the weights and the first losses are the same), with the same batch of real text, sequence
length, dtypes and optimizer (torch.optim.AdamW, same lr), it times a training step (forward, backward,
``optimizer.step()``, ``zero_grad``) and measures its peak tensor memory:

    full    ours: models.llama + full.prepare_full_finetuning    vs  transformers LlamaForCausalLM, all trainable
            fp32 weights, fp32 AdamW
    lora    ours: lora.inject_lora, r=8, alpha 16, all-linear     vs  peft.get_peft_model, same LoraConfig
            fp32 base and adapters
    qlora   ours: qlora.model.quantize_model (NF4 + double quant, vs  transformers BitsAndBytesConfig(nf4, double
            bf16 compute) + inject_lora                               quant, bf16 compute) + PEFT
            bf16 embeddings/norms, fp32 adapters (PEFT's default; both then use plain torch AdamW)

Speed: after ``--warmup`` steps each, the implementations take turns for ``--steps`` steps (so a change in
the machine's load hits both alike); tokens/s = batch x seq_len / median step time. Memory: one more step
under ``finetune.memory_tracker.TensorMemoryTracker`` (live tensor bytes, exact, the same counter for both
sides; see that file for why not RSS), with the optimizer states already allocated. The estimate of
``finetune.memory`` for our step is printed next to it.

``--proposals`` also measures our step with candidate changes applied by monkeypatching the model instance
(models/llama.py itself is not modified), each at equal numerics:

    fused-ce   the loss from the hidden states in chunks of tokens, computing d(loss)/d(h) and d(loss)/d(W)
               in the forward (as Liger's fused linear cross-entropy), so the (B, T, vocab) logits and their
               fp32 copies and gradients are never materialised
    gqa-sdpa   F.scaled_dot_product_attention(..., enable_gqa=True) instead of repeating k and v to all heads
               (bitwise the same output, gradients to fp32 summation order; the CPU flash kernel then saves
               the un-repeated k, v)
    swiglu     a SwiGLU autograd function saving gate and up outputs only (silu recomputed in backward with
               aten.silu_backward, bitwise the same gradients)
    fused-adamw  torch.optim.AdamW(fused=True) (one kernel per tensor on CPU too; results within an ulp of
               the default single-tensor path), in the "all proposals" row only

The 2 cores are shared with other work: the load average before and after is printed and written.

Usage:
    python benchmarks/bench_training.py                           # all methods, write RESULTS_TRAINING.md
    python benchmarks/bench_training.py --methods lora --proposals --steps 5
    python benchmarks/bench_training.py --batch-size 2 --seq-len 128 --no-write   # quick look
    python benchmarks/bench_training.py --from-json run.json    # re-render a saved run (--json run.json)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from finetune_ref.train.memory_settings import MemorySettings  # noqa: E402
from finetune_ref.train.memory import estimate_memory  # noqa: E402
from finetune_ref.train.memory_tracker import TensorMemoryTracker  # noqa: E402

RESULTS_MD = REPO / "benchmarks" / "RESULTS_TRAINING.md"
METHODS = ("full", "lora", "qlora")
LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
LORA_R, LORA_ALPHA = 8, 16
TARGET_SPEEDUP, TARGET_MEMORY = 1.25, 0.6  # targets: >= 1.25x tokens/s, <= 0.6x peak memory
PROPOSALS = ("fused-ce", "gqa-sdpa", "swiglu")


# ---------------------------------------------------------------------------------------------------------
# Environment and data.
# ---------------------------------------------------------------------------------------------------------
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
def ours(method: str, model_dir: Path):
    from finetune_ref.full import prepare_full_finetuning
    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.models.loader import load_model

    lora_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    if method == "full":
        model = prepare_full_finetuning(load_model(model_dir, torch.float32), torch.float32)
    elif method == "lora":
        model = load_model(model_dir, torch.float32)
        inject_lora(model, lora_config, adapter_dtype=torch.float32)
    else:
        from finetune_ref.qlora.model import quantize_model

        model = quantize_model(load_model(model_dir, torch.bfloat16), double_quant=True,
                               compute_dtype=torch.bfloat16)
        inject_lora(model, lora_config, adapter_dtype=torch.float32)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], []


def hf(method: str, model_dir: Path):
    import transformers

    if method == "full":
        model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.requires_grad_(True)
        extra = []
    else:
        import peft

        if method == "lora":
            model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        else:
            quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.bfloat16)
            model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
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
# Proposals, applied to one model instance (models/llama.py is untouched).
# ---------------------------------------------------------------------------------------------------------
class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of -log softmax(h W^T)[label] / num_items, without materialising the (N, V) logits.

    forward(h (N, H) model dtype, weight (V, H), labels (N,) int64 with -100 ignored, num_items, chunk,
    grad_enabled):
    for each chunk of tokens the logits are computed (in the model dtype, then fp32, as causal_lm_loss does),
    and so is their gradient (softmax - onehot) / num_items (fp32, cast to the model dtype as autograd's
    ToCopyBackward would), from which dh = g W and dW = g^T h are accumulated. Backward only scales them by
    the incoming gradient. Peak extra memory: a few (chunk, V) fp32 tensors, plus dh (N, H) and dW (V, H).
    """

    @staticmethod
    def forward(ctx, h, weight, labels, num_items, chunk, grad_enabled=True):
        # (grad mode is always off inside forward: the caller says whether a backward will follow)
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, h.shape[0], chunk):
            h_c, lab = h[start:start + chunk], labels[start:start + chunk]  # (C, H), (C,)
            logits = F.linear(h_c, weight).float()  # (C, V)
            log_probs = torch.log_softmax(logits, dim=-1)  # (C, V) fp32
            del logits
            valid = lab != -100
            rows, cols = valid.nonzero().squeeze(1), lab[valid]
            total -= log_probs[rows, cols].sum()
            if need_h or need_w:
                # d(loss)/d(logits) as autograd computes it: exp(log_probs) * s, minus s at the label, with
                # s = 1 / num_items (a backward with grad_out == 1, as the loop's, then multiplies by 1).
                s = torch.tensor(1.0, dtype=torch.float32) / num_items
                g = log_probs.exp_().mul_(s)  # in place: log_probs is not needed any more
                g[rows, cols] -= s
                g[~valid] = 0.0
                g = g.to(h.dtype)
                if need_h:
                    grad_h[start:start + chunk] = g @ weight  # (C, V) @ (V, H)
                if need_w:
                    grad_w += (g.t() @ h_c).float()  # (V, C) @ (C, H)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total / num_items

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        scale = grad_out.float()  # the 1/num_items is already in the saved gradients
        grad_h = grad_w = None
        if ctx.need[0]:
            grad_h = saved.pop(0)
            grad_h = grad_h * scale.to(grad_h.dtype)
        if ctx.need[1]:
            grad_w = (saved.pop(0) * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def _fused_forward(self, input_ids, attention_mask=None, position_ids=None, document_ids=None, labels=None,
                   num_items_in_batch=None, cache=None, logits_to_keep=0, chunk=256):
    from finetune_ref.models.llama import CausalLMOutput

    if labels is None or cache is not None or logits_to_keep:
        return type(self).forward(self, input_ids, attention_mask, position_ids, document_ids, labels,
                                  num_items_in_batch, cache, logits_to_keep)
    h = self.model(input_ids, attention_mask, position_ids, document_ids, cache)  # (B, T, H)
    hidden = h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), H): position t predicts label t+1
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if num_items_in_batch is None:
        num_items_in_batch = int((shift_labels != -100).sum().clamp(min=1))
    head = self.lm_head.base_layer if hasattr(self.lm_head, "base_layer") else self.lm_head
    loss = FusedLinearCrossEntropy.apply(hidden, head.weight, shift_labels, num_items_in_batch, chunk,
                                         torch.is_grad_enabled())
    return CausalLMOutput(loss=loss, logits=None, cache=None)


def _gqa_attention_forward(self, x, cos, sin, mask, cache=None):
    from finetune_ref.models.rope import apply_rotary

    B, T, _ = x.shape
    # (B, T, heads * head_dim) -> (B, heads, T, head_dim), as Attention.forward
    q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.update(self.layer_idx, k, v)
    gqa = self.num_heads != self.num_kv_heads
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, heads * head_dim)
    return self.o_proj(out)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up; backward recomputes silu (bitwise autograd's gradients)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def _swiglu_mlp_forward(self, x):
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


def apply_proposals(model, names: tuple[str, ...]) -> None:
    """Set (or, with an empty tuple, remove) the instance-level forwards of the chosen proposals."""
    from finetune_ref.models.llama import MLP, Attention

    for module in model.modules():
        for cls, key, fn in ((Attention, "gqa-sdpa", _gqa_attention_forward), (MLP, "swiglu", _swiglu_mlp_forward)):
            if isinstance(module, cls):
                module.__dict__.pop("forward", None)
                if key in names:
                    module.forward = types.MethodType(fn, module)
    model.__dict__.pop("forward", None)
    if "fused-ce" in names:
        model.forward = types.MethodType(_fused_forward, model)


# ---------------------------------------------------------------------------------------------------------
# One method: both sides (and our variants), timed in turns, then memory.
# ---------------------------------------------------------------------------------------------------------
def run_method(method: str, model_dir: Path, ids: torch.Tensor, args) -> dict:
    tokens = ids.numel()
    sides = {}
    for label, build in (("ours", ours), ("transformers", hf)):
        model, params, extra = build(method, model_dir)
        sides[label] = {"model": model, "extra": extra, "params": params,
                        "optimizer": torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0),
                        "trainable": sum(p.numel() for p in params)}
    # (name, side, proposals, optimizer); the variants of ours share the model (proposals are switched per step)
    runs = [("ours", sides["ours"], (), sides["ours"]["optimizer"])]
    if args.proposals:
        fused_adamw = torch.optim.AdamW(sides["ours"]["params"], lr=LR[method], weight_decay=0.0, fused=True)
        runs += [("ours + fused-ce", sides["ours"], ("fused-ce",), sides["ours"]["optimizer"]),
                 ("ours + all proposals", sides["ours"], PROPOSALS, fused_adamw)]
    runs.append(("transformers", sides["transformers"], (), sides["transformers"]["optimizer"]))

    def prepare(side, props):
        if side is sides["ours"]:
            apply_proposals(side["model"], props)
        return side["model"]

    # Numerics: the loss of every variant on the same (initial) weights and batch, before any update.
    first_loss, times = {}, {name: [] for name, *_ in runs}
    for name, side, props, _ in runs:
        with torch.no_grad():
            first_loss[name] = float(prepare(side, props)(input_ids=ids, labels=ids).loss)
    for name, side, props, optimizer in runs:
        for _ in range(args.warmup):
            train_step(prepare(side, props), ids, optimizer)
    for _ in range(args.steps):
        for name, side, props, optimizer in runs:
            model = prepare(side, props)
            start = time.perf_counter()
            train_step(model, ids, optimizer)
            times[name].append(time.perf_counter() - start)
    peaks = {name: measure_peak(prepare(side, props), optimizer, ids, side["extra"])
             for name, side, props, optimizer in runs}
    apply_proposals(sides["ours"]["model"], ())
    config = sides["ours"]["model"].config
    settings = MemorySettings(method=method, optimizer="adamw", batch_size=ids.shape[0], seq_len=ids.shape[1],
                              dtype="fp32" if method != "qlora" else "bf16", adapter_dtype="fp32", rank=LORA_R,
                              attention_mask=False, keeps_output=False)
    predicted = estimate_memory(config, settings).peak
    result = {"method": method, "tokens_per_step": tokens, "trainable": sides["ours"]["trainable"],
              "trainable_hf": sides["transformers"]["trainable"], "first_loss": first_loss,
              "predicted_peak_ours": predicted, "rows": {}}
    for name in times:
        median = statistics.median(times[name])
        result["rows"][name] = {"tokens_per_s": tokens / median, "median_step_s": median,
                                "step_s": times[name], "peak_bytes": peaks[name]}
    del sides, runs
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------
def render(env: dict, results: list[dict], args) -> str:
    v = env["versions"]
    lines = [
        f"Measured {env['date']} by `benchmarks/bench_training.py` on {env['cpu']} ({env['cores']} cores, torch "
        f"threads {env['threads']}), python {env['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, bitsandbytes {v['bitsandbytes']}. Load average (1 min) {env['load_before']:.1f} "
        f"before, {env['load_after']:.1f} after (this process included); other processes may share these cores, "
        "so absolute tokens/s are noisy; the ratios come from steps taken in turns.",
        "",
        f"Model SmolLM2-135M-Instruct (real weights, the same converted directory for both sides), batch "
        f"{args.batch_size} x {args.seq_len} tokens of Python's reference docs, labels = inputs, no padding; "
        f"torch.optim.AdamW (fp32 states), lr {LR['full']:g} full / {LR['lora']:g} LoRA and QLoRA. {args.warmup} "
        f"warm-up step(s), then {args.steps} timed steps each (median). Peak = live tensor bytes of one "
        "steady-state step (TensorMemoryTracker), the same counter for both sides. Initial loss: every row's "
        "forward on the same initial weights and batch, before any update (the numerics check).",
        "",
        "- full: fp32 weights, all 134.5M parameters trainable (tied embedding once).",
        f"- lora: fp32 base, fp32 adapters r={LORA_R}, alpha {LORA_ALPHA}, all linear layers of the blocks.",
        "- qlora: NF4 + double quantization (blocksize 64), bf16 compute, bf16 embeddings and norms, fp32 "
        f"adapters r={LORA_R} (PEFT's default adapter dtype; ours set to match).",
        "- rows \"ours + ...\": our step with the proposals described in the script's docstring; \"all "
        "proposals\" = fused-ce + gqa-sdpa + swiglu + torch.optim.AdamW(fused=True).",
        "",
        "| method | implementation | tokens/s | step s | peak MB | speed vs transformers | memory vs transformers "
        "| initial loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = r["rows"]["transformers"]
        for name, row in r["rows"].items():
            speed = row["tokens_per_s"] / ref["tokens_per_s"]
            mem = row["peak_bytes"] / ref["peak_bytes"]
            loss = r["first_loss"].get(name, float("nan"))
            lines.append(f"| {r['method']} | {name} | {row['tokens_per_s']:.0f} | {row['median_step_s']:.2f} | "
                         f"{row['peak_bytes'] / 1e6:.0f} | {speed:.2f}x | {mem:.2f}x | {loss:.4f} |")
    lines += ["", f"Targets: >= {TARGET_SPEEDUP}x the tokens/s and <= {TARGET_MEMORY}x the peak memory of "
              "transformers at equal settings.", ""]
    for r in results:
        ours_row = r["rows"]["ours"]
        lines.append(f"- {r['method']}: `finetune memory` predicts {r['predicted_peak_ours'] / 1e6:.0f} MB for our "
                     f"step, measured {ours_row['peak_bytes'] / 1e6:.0f} MB "
                     f"({r['predicted_peak_ours'] / ours_row['peak_bytes'] - 1:+.1%}); trainable parameters "
                     f"{r['trainable']:,} (ours) / {r['trainable_hf']:,} (transformers).")
    if any(len(r["rows"]) > 2 for r in results):
        lines += ["", "Proposals (ours with the change, against ours without it, same run):", ""]
        for r in results:
            base = r["rows"]["ours"]
            for name, row in r["rows"].items():
                if name.startswith("ours +"):
                    lines.append(f"- {r['method']}, {name[len('ours + '):]}: peak {row['peak_bytes'] / 1e6:.0f} MB "
                                 f"({row['peak_bytes'] / base['peak_bytes'] - 1:+.1%}), tokens/s "
                                 f"{row['tokens_per_s'] / base['tokens_per_s'] - 1:+.1%}.")
    lines += ["", "Gap to the targets (best of our rows against transformers):", ""]
    for r in results:
        ref = r["rows"]["transformers"]
        ours_rows = {k: v for k, v in r["rows"].items() if k != "transformers"}
        speed = max(v["tokens_per_s"] for v in ours_rows.values()) / ref["tokens_per_s"]
        memory = min(v["peak_bytes"] for v in ours_rows.values()) / ref["peak_bytes"]
        lines.append(f"- {r['method']}: speed {speed:.2f}x (target {TARGET_SPEEDUP}x: "
                     f"{'met' if speed >= TARGET_SPEEDUP else 'short by ' + format(TARGET_SPEEDUP - speed, '.2f')}), "
                     f"memory {memory:.2f}x (target {TARGET_MEMORY}x: "
                     f"{'met' if memory <= TARGET_MEMORY else 'over by ' + format(memory - TARGET_MEMORY, '.2f')}).")
    return "\n".join(lines)


def write_results(text: str, path: Path) -> None:
    header = ("# Training-step benchmark: ours vs transformers + PEFT (+ bitsandbytes)\n\n"
              "Written by `benchmarks/bench_training.py`. Rerun it to refresh this file.\n\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + text + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--proposals", action="store_true", help="also measure our step with the proposals")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS_MD.name}")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render a --json file of an earlier run (its settings) instead of measuring")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        vars(args).update(saved["settings"])
        text = render(saved["environment"], saved["results"], args)
        print(text)
        if not args.no_write:
            write_results(text, RESULTS_MD)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods must be a comma-separated subset of {METHODS}, got {args.methods!r}")
    if min(args.batch_size, args.seq_len, args.steps, args.warmup) < 1:
        parser.error("--batch-size, --seq-len, --steps and --warmup must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from finetune_ref.models.default_model import default_model_dir
    from finetune_ref.models.tokenizer import Tokenizer

    model_dir = default_model_dir()
    env = environment(torch.get_num_threads())
    ids = text_batch(Tokenizer.from_dir(model_dir), args.batch_size, args.seq_len)
    results = []
    for method in methods:
        print(f"[{method}] building and timing ...", file=sys.stderr, flush=True)
        results.append(run_method(method, model_dir, ids, args))
    env["load_after"] = os.getloadavg()[0]
    text = render(env, results, args)
    print(text)
    if args.json:
        settings = {k: getattr(args, k) for k in ("batch_size", "seq_len", "steps", "warmup")}
        args.json.write_text(json.dumps({"environment": env, "settings": settings, "results": results}, indent=2))
    if not args.no_write:
        write_results(text, RESULTS_MD)
        print(f"\nwritten to {RESULTS_MD}", file=sys.stderr)
    return 0 if all(math.isfinite(r["rows"]["ours"]["tokens_per_s"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

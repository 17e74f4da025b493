"""The text of docs/claims.md from the results of ``benchmarks/claims.py`` (see ``claims_report.py``)."""

from __future__ import annotations

from finetune_ref.cli.common import show_number
from claims_report import GAP_FEW_PERCENT, NOT_MEASURED, _cmp, _fmt, _final, _mean, _runs

MB = 1e6


def _verdict(held: bool | None, partly: bool = False) -> str:
    return "partly" if partly else {True: "**held**", False: "**did not hold**", None: "not measured"}[held]


def _header(results: dict, made: list[str]) -> list[str]:
    b, env, data = results["budget"], results["environment"], results.get("data", {})
    mode = results["mode"]
    lines = [
        "# The field's claims, measured",
        "",
        "Each quantitative claim of the usual fine-tuning advice that this machine can test, reproduced with this "
        "project's own code on the embedded model (SmolLM2-135M-Instruct, 134.5M parameters) and data (Python's "
        "reference docs, 8 held-out topics), by `benchmarks/claims.py`, which wrote this page. Memory claims are "
        "bytes of real tensors (not formulas); training claims are held-out losses after the same budget, over "
        "several seeds where the differences are small.",
        "",
        "```bash",
        "python benchmarks/claims.py --quick      # the small budget: minutes",
        "python benchmarks/claims.py              # the full budget: about an hour on a quiet 2-core machine",
        "python benchmarks/claims.py --only memory,merge   # some studies (memory, lr, rank, adapters, dropout, "
        "quality, merge, throughput)",
        "```",
        "",
        f"**This page shows the `{'--quick' if mode == 'quick' else 'full'}` budget**: {b['steps']} updates of "
        f"{b['batch_size']} x {b['seq_len']} tokens per run ({b['steps'] * b['batch_size'] * b['seq_len']:,} "
        f"training tokens), warmup {b['warmup']} then cosine to 10%, seeds {', '.join(map(str, b['seeds']))} "
        "(each seed changes the data order and LoRA's initialisation); held-out loss on "
        f"{data.get('heldout_tokens', '?'):,} tokens, the forgetting score on {data.get('regression_tokens', 0):,} "
        f"tokens of {data.get('regression_corpus') or 'no corpus (install the compare extra)'}; the dropout study "
        f"trains {b['small_examples']} sequences for {b['small_epochs']} epochs."
        + (" These budgets are small: they show the direction and size of an effect at the start of training, "
           "not where a long run ends. **The full mode (`python benchmarks/claims.py`, 32 updates of 4 x 256 "
           "tokens, 3 seeds) is the one to run on a quiet machine**; it was not run for this page." if mode ==
           "quick" else ""),
        "",
        f"Machine: {env['cpus']} CPU cores ({env['machine']}), torch {env['torch']}, {env['threads']} torch "
        f"thread(s), Python {env['python']}. The cores were shared with other jobs while this ran, so times are "
        "noisy; the load average at the start and end of each study:",
        "",
        "| study | finished | seconds | load average start -> end |",
        "|---|---|---:|---|",
    ]
    for name, s in results.get("studies", {}).items():
        lines.append(f"| {name} | {s['date']} | {s['seconds']:.0f} | {s['load_start']:.1f} -> {s['load_end']:.1f} |")
    lines.append("")
    lines.append("A difference between two settings counts only when it is larger than the seed-to-seed spread (the "
                 "larger of the two settings' max - min over seeds); otherwise it is called *within noise*. "
                 "Losses are mean NLL in nats per token; `mean [min..max]` over seeds.")
    return lines


def _memory(results: dict) -> tuple[list[str], list[str]]:
    mem = results.get("memory")
    if not mem:
        rows = [f"| {c} | {s} | {NOT_MEASURED} | not measured |" for c, s in (
            ("full fine-tuning in bf16 with AdamW costs 16 bytes/parameter", "ZeRO (Rajbhandari et al. 2020), 3.1"),
            ("LoRA r=8 adds well under 0.1% parameters on a 7B model; ~1.8% on this one", "Hu et al. 2021"),
            ("QLoRA's 4-bit base is ~4x smaller than bf16", "Dettmers et al. 2023, 3"),
            ("double quantization saves ~0.37 bits/parameter", "Dettmers et al. 2023, 3"))]
        return rows, []
    full, share, nf4 = mem["full"], mem["lora_share"], mem["nf4"]
    s7 = share["Llama-2 7B | all-linear"]["percent"], share["Llama-2 7B | q_proj,v_proj"]["percent"]
    here = share["SmolLM2-135M (this model) | all-linear"]["percent"]
    lin_ratio = nf4["bf16 linear bytes"] / nf4["nf4+dq linear bytes"]
    model_ratio = nf4["bf16 model bytes"] / nf4["nf4+dq model bytes"]
    saved = nf4["nf4 bits/param"] - nf4["nf4+dq bits/param"]
    rows = [
        f"| full fine-tuning in bf16 with AdamW costs 16 bytes/parameter | ZeRO (Rajbhandari et al. 2020), 3.1 | "
        f"{full['total']:.3f} B/param measured after one update ({', '.join(f'{k} {v:g}' for k, v in full.items() if k not in ('parameters', 'total'))}) | "
        f"{_verdict(abs(full['total'] - 16) < 0.01)} |",
        f"| LoRA r=8 adds well under 0.1% parameters on a 7B model | Hu et al. 2021 | Llama-2 7B: {s7[1]:.3f}% on "
        f"q_proj,v_proj, {s7[0]:.3f}% on all linear layers | {_verdict(s7[1] < 0.1, partly=s7[0] >= 0.1)}: only for "
        "the paper's q,v targets |",
        f"| ... and about 1.8% on this model | Hu et al. 2021 | {here:.2f}% (all-linear) | "
        f"{_verdict(abs(here - 1.8) < 0.1)} |",
        f"| QLoRA's 4-bit base is about 4x smaller than bf16 | Dettmers et al. 2023, 3 | linear layers "
        f"{lin_ratio:.2f}x ({nf4['bf16 linear bytes'] / MB:.1f} -> {nf4['nf4+dq linear bytes'] / MB:.1f} MB); whole "
        f"model {model_ratio:.2f}x (the bf16 embedding stays) | {_verdict(lin_ratio > 3.5, partly=model_ratio < 3.5)}: for the linear layers, not for this small model as a whole |",
        f"| double quantization saves about 0.37 bits/parameter | Dettmers et al. 2023, 3 | {nf4['nf4 bits/param']:.4f} "
        f"-> {nf4['nf4+dq bits/param']:.4f} bits: {saved:.4f} saved | {_verdict(abs(saved - 0.373) < 0.025)} (the paper counts the block constants alone; each layer also stores a 256-entry fp32 nested map) |",
    ]
    detail = ["## Memory: bytes of real tensors", "",
              f"Full fine-tuning: the embedded model loaded by `FullRecipe(precision='bf16')`, one real update with "
              f"its optimizer (`MasterWeightAdamW`); bytes of the distinct storages divided by the "
              f"{full['parameters']:,} trainable parameters: " + ", ".join(
                  f"{k} {v:.3f}" for k, v in full.items() if k not in ("parameters",)) + " B/param.", "",
              "LoRA r=8 (alpha 16): the model's own parameters after `lora.inject_lora`, counted by "
              "`lora.trainable_parameters` (Llama shapes built on the meta device: real modules, no storage):", "",
              "| model | targets | trainable | total | share |", "|---|---|---:|---:|---:|"]
    for key, v in share.items():
        model, targets = key.split(" | ")
        detail.append(f"| {model} | {targets} | {v['trainable']:,} | {v['total']:,} | {v['percent']:.3f}% |")
    detail += ["", "NF4 (blocksize 64), `qlora.model.quantize_model` on the bf16 model; every byte of the codes, "
               "block constants and maps (`qlora.model.quantized_nbytes`):", "",
               "| | bf16 | NF4 | NF4 + double quantization |", "|---|---:|---:|---:|",
               f"| linear layers (MB) | {nf4['bf16 linear bytes'] / MB:.2f} | {nf4['nf4 linear bytes'] / MB:.2f} | "
               f"{nf4['nf4+dq linear bytes'] / MB:.2f} |",
               f"| bits per weight | 16 | {nf4['nf4 bits/param']:.4f} | {nf4['nf4+dq bits/param']:.4f} |",
               f"| whole model (MB) | {nf4['bf16 model bytes'] / MB:.2f} | {nf4['nf4 model bytes'] / MB:.2f} | "
               f"{nf4['nf4+dq model bytes'] / MB:.2f} |", "",
               "The paper's 4.5 and 4.127 bits are the block constants alone; the measured rates add the 16-entry "
               "NF4 map, the 256-entry nested map and the offset of each layer. SmolLM2's 28M-parameter embedding "
               "(21% of the model, tied to the head) stays bf16, which is why the whole model shrinks less than its "
               "linear layers.", ""]
    return rows, detail


def _pair_row(claim, source, name_a, a, name_b, b, expect_a_worse: bool | None) -> str:
    """A row comparing two settings' final losses; ``expect_a_worse``: the claim says a's loss is higher."""
    if not a or not b:
        return f"| {claim} | {source} | {NOT_MEASURED} | not measured |"
    diff, noise, words = _cmp(a, b)
    measured = f"{name_a} {_fmt(a)} vs {name_b} {_fmt(b)}: {diff:+.4f} (noise {noise:.4f}, {words})"
    if expect_a_worse is None:
        held = "within noise" in words
    elif "within noise" in words:
        return f"| {claim} | {source} | {measured} | not shown: within noise |"
    else:
        held = (diff > noise) if expect_a_worse else (diff < -noise)
    return f"| {claim} | {source} | {measured} | {_verdict(held)} |"


def _training(results: dict) -> tuple[list[str], list[str]]:
    R = lambda **k: _final(_runs(results, **k))  # noqa: E731
    low = R(lr=1e-5) + R(lr=2e-5)
    good_lrs = {lr: R(lr=lr) for lr in (1e-4, 2e-4, 3e-4)}
    rows = []
    if low and all(good_lrs.values()):
        best_lr = min(good_lrs, key=lambda lr: _mean(good_lrs[lr]))
        rows.append(_pair_row("LoRA at lr 1e-5/2e-5 underfits against 1e-4..3e-4 (\"the most common mistake\")",
                              "common practice; QLoRA, table 9 (2e-4)", "lr 1e-5", R(lr=1e-5),
                              f"lr {show_number(best_lr)}", good_lrs[best_lr], True))
        rows.append(_pair_row("... (2e-5)", "", "lr 2e-5", R(lr=2e-5), f"lr {show_number(best_lr)}", good_lrs[best_lr], True))
    else:
        rows.append(f"| LoRA at lr 1e-5/2e-5 underfits against 1e-4..3e-4 | common practice | {NOT_MEASURED} | "
                    "not measured |")
    ranks = {r: R(rank=r, alpha=2.0 * r) for r in (4, 8, 16, 32, 64)}
    if all(ranks.values()):
        best, worst = min(ranks, key=lambda r: _mean(ranks[r])), max(ranks, key=lambda r: _mean(ranks[r]))
        rows.append(_pair_row("rank matters little: r = 4..64 on the same budget (alpha = 2r)",
                              "Hu et al. 2021, 7.2; QLoRA, 4", f"worst r={worst}", ranks[worst], f"best r={best}",
                              ranks[best], None))
    else:
        rows.append(f"| rank matters little: r = 4..64 on the same budget | Hu et al. 2021, 7.2 | {NOT_MEASURED} | "
                    "not measured |")
    rows.append(_pair_row("alpha = r against alpha = 2r (r = 8): 2r learns faster at the same lr", "common practice",
                          "alpha=r", R(alpha=8.0), "alpha=2r", R(), True))
    rows.append(_pair_row("all linear layers beat q_proj,v_proj at equal trainable parameters", "QLoRA, 4",
                          "q,v r=42", R(rank=42, alpha=84.0, targets="q_proj,v_proj"), "all-linear r=8", R(), True))
    rows.append(_pair_row("LoRA dropout (0.1) helps on a small dataset (< 1,000 examples)", "QLoRA, table 9",
                          "dropout 0", R(small=True), "dropout 0.1", R(small=True, dropout=0.1), True))
    detail = ["## Learning rate, rank, alpha, targets, dropout", "",
              "LoRA on the bf16 base with fp32 adapters, AdamW, all linear layers, r = 8, alpha = 16, lr 2e-4 unless "
              "the row says otherwise (the settings of `finetune compare`). Held-out loss after the budget:", "",
              "| setting | trainable params | held-out loss before | after: mean [min..max] over seeds |",
              "|---|---:|---:|---|"]
    settings = [(f"lr {show_number(lr)}", dict(lr=lr)) for lr in (1e-5, 2e-5, 1e-4, 2e-4, 3e-4)]
    settings += [(f"r={r}, alpha={2 * r}", dict(rank=r, alpha=2.0 * r)) for r in (4, 16, 32, 64)]
    settings += [("alpha = r = 8", dict(alpha=8.0)),
                 ("q_proj,v_proj r=42, alpha 84", dict(rank=42, alpha=84.0, targets="q_proj,v_proj")),
                 ("small dataset, dropout 0", dict(small=True)), ("small dataset, dropout 0.1",
                                                                 dict(small=True, dropout=0.1))]
    for name, spec in settings:
        rs = _runs(results, **spec)
        if rs:
            detail.append(f"| {name} | {rs[0]['trainable']:,} | {rs[0]['before']:.4f} | {_fmt(_final(rs))} |")
        else:
            detail.append(f"| {name} | | | {NOT_MEASURED} |")
    detail += ["", "How to read the rank and target rows. With alpha = 2r the scaling alpha / r is the same for every r, "
               "but Adam moves every entry of A and B by about the learning rate per step whatever their number, so "
               "the update B @ A (a sum over r terms) grows with r: at one learning rate a larger r learns faster at "
               "the start, which is what a short budget measures (the argument of rank-stabilised LoRA, Kalajdzievski "
               "2023, for scaling alpha / sqrt(r)). The q_proj,v_proj run at r = 42 has the same parameter count but "
               "five times the rank. The claims are about where training ends; at these budgets, a rank or target "
               "difference larger than the noise says how fast each setting starts, not where it ends.", ""]
    return rows, detail


def _quality(results: dict) -> tuple[list[str], list[str]]:
    full, lora, qlora = (_runs(results, method="full", lr=2e-5), _runs(results), _runs(results, method="qlora"))
    if not (full and lora and qlora):
        return ([f"| LoRA within a few percent of full fine-tuning; QLoRA matching LoRA | Hu et al. 2021; QLoRA, 4 | "
                 f"{NOT_MEASURED} | not measured |"], [])
    f, l, q = _final(full), _final(lora), _final(qlora)
    gap = 100 * (_mean(l) - _mean(f)) / _mean(f)
    gain = {name: [r["before"] - r["after"] for r in rs] for name, rs in (("full", full), ("lora", lora),
                                                                          ("qlora", qlora))}
    diff, noise, words = _cmp(q, l)
    rows = [f"| LoRA within a few percent of full fine-tuning | Hu et al. 2021, 5; QLoRA, 4 | LoRA {_fmt(l)} vs full "
            f"{_fmt(f)}: {gap:+.2f}% of the loss; gains {_mean(gain['lora']):.4f} vs {_mean(gain['full']):.4f} | "
            f"{_verdict(abs(gap) <= GAP_FEW_PERCENT)} (threshold {GAP_FEW_PERCENT:g}%; read with the gains: a short "
            "budget moves the loss little) |",
            f"| QLoRA matches LoRA | QLoRA, 4 | QLoRA {_fmt(q)} vs LoRA {_fmt(l)}: {diff:+.4f} (noise {noise:.4f}, "
            f"{words}); gains {_mean(gain['qlora']):.4f} vs {_mean(gain['lora']):.4f} from bases at "
            f"{qlora[0]['before']:.4f} vs {lora[0]['before']:.4f} | "
            f"{_verdict('within noise' in words, partly=diff > noise and _mean(gain['qlora']) >= _mean(gain['lora']))}"
            f"{': the same gain from a worse base' if diff > noise and _mean(gain['qlora']) >= _mean(gain['lora']) else ''} |"]
    reg = {name: [r["regression_after"] - r["regression_before"] for r in rs]
           for name, rs in (("full", full), ("LoRA", lora), ("QLoRA", qlora)) if rs[0]["regression_after"] is not None}
    if reg:
        rows.append("| forgetting (loss on general English, after - before) | Biderman et al. 2024 (LoRA forgets "
                    "less) | " + ", ".join(f"{k} {_mean(v):+.4f}" for k, v in reg.items()) + " | "
                    + ("no forgetting at this budget: every method lowers it |" if all(_mean(v) < 0 for v in reg.values())
                       else "see below |"))
    detail = ["## Quality: full fine-tuning, LoRA, QLoRA", "",
              "Each method built by its recipe as `finetune compare` builds it (full: bf16 weights with fp32 master "
              "weights and moments, lr 2e-5; LoRA: bf16 base, fp32 adapters, lr 2e-4; QLoRA: the same on an NF4 + "
              "double-quantization base computing in bf16, paged AdamW). Forgetting score: the loss on a second "
              "corpus of everyday English (the regression set of `finetune compare`), before and after.", "",
              "| method | held-out before | after: mean [min..max] | gain | general English before -> after |",
              "|---|---:|---|---:|---|"]
    for name, rs in (("full", full), ("LoRA", lora), ("QLoRA", qlora)):
        regr = (f"{_mean([r['regression_before'] for r in rs]):.4f} -> {_mean([r['regression_after'] for r in rs]):.4f}"
                if rs[0]["regression_after"] is not None else NOT_MEASURED)
        detail.append(f"| {name} | {rs[0]['before']:.4f} | {_fmt(_final(rs))} | "
                      f"{_mean([r['before'] - r['after'] for r in rs]):.4f} | {regr} |")
    detail += ["", "QLoRA starts from a higher loss: its base is the NF4 quantization of weights that were already "
               "4-bit (the GGUF file's Q4_1) before we dequantized them, so it carries two rounds of quantization "
               "error; compare gains as well as final losses.", ""]
    return rows, detail


def _merge(results: dict) -> tuple[list[str], list[str]]:
    m = results.get("merge")
    if not m:
        return ([f"| merged = unmerged outputs in fp32; QLoRA merges and re-quantization | LoRA, 4.2; QLoRA | "
                 f"{NOT_MEASURED} | not measured |"], [])
    lo = m["lora"]
    rel = lo["logits_max_abs_diff"] / lo["logits_max_abs"]
    rows = [f"| merged = unmerged outputs exactly (fp32) | Hu et al. 2021, 4.2 (no inference latency) | max "
            f"\\|logit difference\\| {lo['logits_max_abs_diff']:.2e} against logits up to {lo['logits_max_abs']:.1f} "
            f"({rel:.1e} relative); {100 * lo['bitwise_equal_share']:.1f}% of logits bitwise equal | "
            f"{_verdict(rel < 1e-5, partly=rel < 1e-5 and lo['bitwise_equal_share'] < 1)}: equal to fp32 rounding, "
            "not bitwise |"]
    q = m["qlora"]
    bases = _runs(results, method="qlora"), _runs(results)
    gap_text = f"{bases[0][0]['before'] - bases[1][0]['before']:.2f} nats " if all(bases) else ""
    dq, orig = q["merged into NF4-dequantized base (fp32)"], q["merged into original 16-bit base (fp32)"]
    rows.append(f"| a QLoRA adapter merged into the dequantized NF4 base reproduces the QLoRA model; merged into the "
                f"original 16-bit base it does not | QLoRA, eq. 5-6 | held-out loss change vs unmerged: NF4-dequant "
                f"{dq['loss_change']:+.4f}, original {orig['loss_change']:+.4f} | "
                f"{_verdict(abs(dq['loss_change']) < abs(orig['loss_change']))}, up to the compute dtype (the "
                "unmerged model computes in bf16, the merges in fp32); see below for the sign |")
    detail = ["## Merging", "",
              "LoRA: the fp32 model with r=8 adapters on all linear layers whose B was drawn at random (std 0.02, a "
              "nonzero update), logits before and after `lora.merge_and_unload` on two held-out batches.", "",
              "QLoRA: the seed-0 QLoRA model of the quality study merged with `qlora.merge.merge_qlora`, each result "
              "against the unmerged QLoRA model on the held-out batches (`merge_report`):", "",
              "| result | held-out loss | change vs unmerged QLoRA | max \\|logit difference\\| |", "|---|---:|---:|---:|"]
    for label, r in q.items():
        detail.append(f"| {label} | {r['loss_merged']:.4f} | {r['loss_change']:+.4f} | {r['logits_max_abs']:.3f} |")
    detail += ["", f"The unmerged QLoRA model's loss on these batches is {dq['loss_reference']:.4f}. Re-quantizing the "
               "merge to NF4 can erase a small update (the dequantized NF4 weights sit on the NF4 grid, so a change "
               "below half a step rounds back to the same codes); RTN and GPTQ use another grid (4-bit, group 128). "
               "Every merged row also changes the compute dtype (fp32 instead of the QLoRA model's bf16 NF4 matmuls), "
               "which is part of each difference; `benchmarks/bench_requantize.py` evaluates every row in fp32 "
               "(`benchmarks/results/requantize_cpu.md`). Merging into the original 16-bit base is not what the "
               "adapter was trained against; where it *lowers* the loss, that is because the NF4 base starts "
               f"{gap_text}worse than the 16-bit one (two rounds of 4-bit quantization, see the quality study) and the "
               "merge gets that back. After a short run the adapter's gain is small, so "
               "NF4 re-quantization, which rounds most of the update away, costs little here; after a longer run it "
               "costs the whole gain.", ""]
    return rows, detail


def _throughput(results: dict) -> tuple[list[str], list[str]]:
    t = results.get("throughput")
    gpu = ("| QLoRA's cost against LoRA on a GPU (published: 1.3-1.6x slower; torchtune, litgpt) | QLoRA; torchtune | "
           "to measure: `python benchmarks/claims.py --only throughput --device cuda` (no GPU was available to this "
           "run; that option is untested) | not measured |")
    if not t:
        return [f"| QLoRA's cost against LoRA on this CPU | QLoRA | {NOT_MEASURED} | not measured |", gpu], []
    b = results["budget"]
    rows = [f"| QLoRA trains slower than LoRA (dequantizing every weight in every step) | QLoRA, 3; common claim "
            f"30-50% of LoRA's throughput | {t['device']}: LoRA {t['lora']['tokens_per_s']:.0f} vs QLoRA "
            f"{t['qlora']['tokens_per_s']:.0f} tokens/s, QLoRA at {100 * t['qlora_over_lora']:.0f}% of LoRA | "
            f"{_verdict(t['qlora_over_lora'] < 1, partly=0.5 < t['qlora_over_lora'] < 1)}: slower, but not 2-3x on "
            "this CPU (the claim is about GPUs) |", gpu]
    detail = ["## Throughput", "",
              f"One training update (forward, backward, optimizer step) of {b['batch_size']} x {b['seq_len']} tokens, "
              f"LoRA and QLoRA taking turns, {b['timing_rounds']} timed rounds after one warm-up, median "
              f"(step times in s: LoRA {', '.join(f'{x:.2f}' for x in t['lora']['times'])}; QLoRA "
              f"{', '.join(f'{x:.2f}' for x in t['qlora']['times'])}). The cores were shared (see the load "
              "averages above), so take the ratio, measured in turns, rather than the rates.", ""]
    return rows, detail


def page(results: dict, made: list[str]) -> str:
    lines = _header(results, made)
    sections = [_memory(results), _training(results), _quality(results), _merge(results), _throughput(results)]
    lines += ["", "## The claims", "", "| claim | source | measured here | held? |", "|---|---|---|---|"]
    for rows, _ in sections:
        lines += rows
    lines.append("")
    figures = {"## Memory": "memory.png", "## Learning rate": "lr.png", "## Quality": "methods.png"}
    for _, detail in sections:
        lines += detail
        for head, png in figures.items():
            if detail and detail[0].startswith(head) and png in made:
                lines += [f"![{png[:-4]}](claims/{png})", ""]
        if detail and detail[0].startswith("## Learning rate") and "adapters.png" in made:
            lines += ["![rank, alpha, targets, dropout](claims/adapters.png)", ""]
    lines += ["Sources: Hu et al. 2021, \"LoRA: Low-Rank Adaptation of Large Language Models\"; Dettmers et al. "
              "2023, \"QLoRA: Efficient Finetuning of Quantized LLMs\" (section 3: NF4, double quantization, paged "
              "optimizers; section 4 and table 9: all-linear targets, hyperparameters); Rajbhandari et al. 2020, "
              "\"ZeRO\"; Biderman et al. 2024, \"LoRA Learns Less and Forgets Less\". `finetune advise` "
              "(`recipes/advice.py`) applies these rules.", ""]
    return "\n".join(lines)

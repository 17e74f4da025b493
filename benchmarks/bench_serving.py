"""Serving several LoRA adapters from one base: a mixed-adapter batch against the same requests served adapter by
adapter, and against a merged model, at batch 1, 4 and 16 (tokens/s and mean request latency).

The three ways, taking turns in one process on the same requests (adapters assigned round-robin, the same
prompts, ``--new-tokens`` greedy tokens each with no stop token, so every way does the same work):

* ``mixed``: every request in one continuously batched decode loop (``models.batching.DecodeBatch``), each row with
  its own adapter (``lora.mixed.set_row_adapters``, the gathered BGMV reference): what ``finetune serve`` does.
* ``per-adapter`` (the baseline): the requests of one adapter as one batch with that adapter active
  (``lora.set_adapter``), then the next adapter's; a request's latency counts from the start of the whole run.
* ``merged``: all requests on a model with one adapter merged into the base weights and no LoRA layers (Hu et al.
  2021, section 4.2: no extra inference cost); the floor for one adapter, not a way to serve several at once.

    python benchmarks/bench_serving.py --adapter a=DIR --adapter b=DIR --adapter c=DIR   # real model, fp32 CPU

Latency = mean over requests of the time from the run's start to the request's last token. CPU timings on a shared
machine are noisy: the table says the load average before and after, the threads and the shapes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

PROMPTS = ["What is a list in Python?", "Explain the while loop.", "How do I import a module?",
           "What does yield do?", "Name two built-in types.", "What is a lambda?"]


def rows_for(tokenizer, batch: int, names: list[str], new_tokens: int):
    from finetune_ref.models.batching import Row

    rows = []
    for i in range(batch):
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                             add_generation_prompt=True)
        rows.append(Row(tokenizer.encode(text), max_new_tokens=new_tokens, adapter=names[i % len(names)]))
    return rows


def run_batch(model, rows, on_rows=None) -> float:
    """Decode ``rows`` to the end in one batch; returns the seconds it took."""
    from finetune_ref.models.batching import generate_batch

    start = time.perf_counter()
    generate_batch(model, rows, on_rows=on_rows)
    return time.perf_counter() - start


def mixed(model, rows):
    from finetune_ref.lora.mixed import clear_row_adapters, set_row_adapters

    seconds = run_batch(model, rows, on_rows=lambda batch: set_row_adapters(model, [r.adapter for r in batch]))
    clear_row_adapters(model)
    return seconds, seconds  # every request ends with the batch


def per_adapter(model, rows):
    from finetune_ref import lora

    elapsed, latencies = 0.0, []
    for name in dict.fromkeys(r.adapter for r in rows):
        group = [r for r in rows if r.adapter == name]
        lora.set_adapter(model, name)
        elapsed += run_batch(model, group)
        latencies += [elapsed] * len(group)
    return elapsed, sum(latencies) / len(latencies)


def merged(model, rows):
    seconds = run_batch(model, rows)
    return seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR", help="repeat: 2 or more")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="turns per way; the best is kept")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from finetune_ref import lora
    from finetune_ref.cli.common import load_average, resolve_model_dir
    from finetune_ref.cli.generate import parse_named_adapters
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.recipes.inference import load_inference_model

    torch.set_num_threads(args.threads)
    dirs, names = parse_named_adapters(args.adapter)
    model_dir = resolve_model_dir(args.model, None)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_inference_model(model_dir, "fp32", dirs, adapter_names=names).eval()
    merged_model = lora.merge_and_unload(load_inference_model(model_dir, "fp32", dirs[:1]).eval())
    ranks = {n: next(layer.r[n] for _, layer in lora.lora_layers(model) if n in layer.r) for n in names}
    load_before = load_average()
    run_batch(model, rows_for(tokenizer, 2, names, 4))  # warm up
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        best = {}
        for _ in range(args.repeats):
            for way, fn, m in (("per-adapter", per_adapter, model), ("mixed", mixed, model),
                               ("merged", merged, merged_model)):
                seconds, latency = fn(m, rows_for(tokenizer, batch, names, args.new_tokens))
                if way not in best or seconds < best[way][0]:
                    best[way] = (seconds, latency)
        base_tps = batch * args.new_tokens / best["per-adapter"][0]
        for way, (seconds, latency) in best.items():
            tps = batch * args.new_tokens / seconds
            results.append((batch, way, tps, latency, tps / base_tps))
    load_after = load_average()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.threads} thread(s); load average {load_before:.1f} before, "
          f"{load_after:.1f} after")
    print(f"model: {model_dir.name}, fp32; adapters {ranks} (rank), all-linear; {args.new_tokens} new tokens per "
          f"request, greedy, no stop; prompts {len(PROMPTS)} chat questions; best of {args.repeats}")
    print("| batch | way | tokens/s | mean latency (s) | tokens/s vs per-adapter |")
    print("|------:|-----|---------:|-----------------:|------------------------:|")
    for batch, way, tps, latency, ratio in results:
        print(f"| {batch} | {way} | {tps:.1f} | {latency:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

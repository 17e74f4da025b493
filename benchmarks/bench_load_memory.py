"""Peak memory of loading the default model each way the project loads a model (models/loader.py): dense fp32 and
bf16, NF4 quantized while loading (bf16 or fp32 rest), and a stored 4-bit directory.

Each way runs in a fresh interpreter (``--row NAME``), so its ``ru_maxrss`` is its own. The baseline of each row is
the RSS of that interpreter just before the load, after torch and the package were imported and a meta model was
built once (what every row pays anyway). Printed per row: peak RSS above the baseline, RSS resident after the load
(dense rows touch every parameter first, so lazily mapped pages would count), the load's wall time, and the peak
relative to the dense fp32 row. The NF4 rows run with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc keeps freed
quantization temporaries otherwise, and the peak varies from run to run; docs/qlora.md says by how much).

    python benchmarks/bench_load_memory.py            # the table (about 20 s on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROWS = {  # name -> what it loads
    "dense-fp32": "load_model(path, dtype='fp32')",
    "dense-bf16": "load_model(path, dtype='bf16')",
    "nf4-bf16": "load_quantized(path)  (the QLoRA default)",
    "nf4-fp32": "load_quantized(path, dtype='fp32')",
    "nf4-dir": "load_quantized(a directory written by save_quantized)",
}
NF4_ROWS = ("nf4-bf16", "nf4-fp32", "nf4-dir")


def rss_mb() -> float:
    """Resident set size now (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def run_row(name: str, four_bit_dir: str) -> None:
    """Load the default model one way and print 'peak resident seconds' in MB / s."""
    import torch

    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.default_model import default_model_dir
    from finetune_ref.models.llama import LlamaForCausalLM
    from finetune_ref.models.loader import load_model
    from finetune_ref.qlora.model import load_quantized

    path = default_model_dir()
    with torch.device("meta"):
        LlamaForCausalLM(LlamaConfig.from_json_file(path / "config.json"))  # warm up what every row pays
    base = rss_mb()
    start = time.perf_counter()
    if name.startswith("dense"):
        model = load_model(path, dtype=name.split("-")[1])
        for p in model.parameters():
            p.sum()  # touch every page
    elif name == "nf4-dir":
        model = load_quantized(four_bit_dir)
    else:
        model = load_quantized(path, dtype=None if name == "nf4-bf16" else "fp32")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: KiB
    print(f"{peak - base:.0f} {rss_mb() - base:.0f} {seconds:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--four-bit-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        run_row(args.row, args.four_bit_dir)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        four_bit = os.path.join(tmp, "4bit")
        subprocess.run([sys.executable, "-c", "from finetune_ref.models.default_model import default_model_dir; "
                        "from finetune_ref.qlora.model import load_quantized, save_quantized; "
                        f"save_quantized(load_quantized(default_model_dir()), {four_bit!r})"], check=True)
        results = {}
        for name in ROWS:
            env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if name in NF4_ROWS else {}))
            out = subprocess.run([sys.executable, __file__, "--row", name, "--four-bit-dir", four_bit], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            results[name] = tuple(float(v) for v in out)
    print(f"Loading SmolLM2-135M-Instruct; {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; MB = 1e6 bytes, above each process's own baseline.\n")
    print("| load | what | peak RSS above baseline | resident after | time | peak vs dense-fp32 |")
    print("|---|---|---|---|---|---|")
    for name, (peak, resident, seconds) in results.items():
        print(f"| {name} | `{ROWS[name]}` | +{peak:.0f} MB | +{resident:.0f} MB | {seconds:.1f} s | "
              f"{peak / results['dense-fp32'][0]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

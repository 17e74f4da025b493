"""The settings of ``finetune compare`` (``cli/compare.py`` documents them) and its data: the held-out sets it
evaluates and the second corpus of the forgetting score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16")
# The comparison's own peak rates (cli/compare.py), not the recipes': one rate for LoRA and QLoRA alike.
LEARNING_RATES = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
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
    lr: dict = dataclasses.field(default_factory=lambda: dict(LEARNING_RATES))
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


# ---------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------
def regression_documents(path: str | Path | None = None) -> tuple[str | None, list[str]]:
    """(corpus name, documents) of the second corpus; (None, []) when none is available (see module doc)."""
    from finetune_ref.train.readers import read_text_documents

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

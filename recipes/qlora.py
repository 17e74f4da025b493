"""QLoRA (Dettmers et al. 2023): LoRA on a frozen NF4 base, quantized while loading (layer by layer, so the
16/32-bit model is never whole in memory), saved as a PEFT adapter plus qlora_config.json (how the base was
quantized, so eval, generate and merge rebuild the same base)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

from finetune_ref.lora import adopt_rewritten_base, save_adapter, unload
from finetune_ref.models.checkpoint import parse_dtype, weights_fingerprint
from finetune_ref.qlora.adapter_record import BASE_FINGERPRINT, LOFTQ_BASE, QLORA_MARKER, write_qlora_record
from finetune_ref.qlora.loftq import prepare_loftq_model
from finetune_ref.qlora.model import nf4_layers, prepare_qlora_model, save_quantized
from finetune_ref.train.distributed import DistInfo, unwrap_model
from finetune_ref.train.fsdp import gathered_trainable, shard_nf4_layers

from .base import Trainable
from .inference import copy_tokenizer_files
from .lora import LoraRecipe


# Inits that make their own 4-bit base, saved beside the adapter in this directory (qlora/adapter_record.py).
OWN_BASE = {"loftq": LOFTQ_BASE, "olora": "olora_base"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoraRecipe(LoraRecipe):
    """``finetune train --method qlora``: LoRA's settings, the NF4 base's, and QLoRA's own defaults."""

    method: ClassVar[str] = "qlora"

    # bf16 adapters and bf16 compute over the NF4 weights (Dettmers et al. 2023, section 3, eq. 5); the
    # optimizer keeps fp32 master weights of the bf16 adapters.
    precision: str = "bf16"
    optimizer: str = "paged_adamw"     # paged optimizer states (Dettmers et al. 2023, section 3)
    # NF4 with blocksize 64 and double quantization (Dettmers et al. 2023, section 3: 4.127 instead of 4.5
    # bits per weight); None keeps what a 4-bit --model was saved with, else these.
    blocksize: int | None = None       # None: 64
    double_quant: bool | None = None   # None: on
    compute_dtype: str | None = None   # the NF4 matmuls; None: fp32 for precision fp32, else bf16
    loftq_iter: int = 1                # LoftQ's alternating steps with --init loftq (PEFT's loftq_iter default)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "pissa" or self.init.startswith("pissa_niter_"):
            raise ValueError(f"--init {self.init} needs the 16/32-bit base (PEFT's pissa_init refuses a quantized "
                             "one); use it with --method lora, or --init olora / loftq with --method qlora")
        if self.loftq_iter < 1:
            raise ValueError(f"--loftq-iter must be >= 1, got {self.loftq_iter}")

    def build(self, model_dir: Path, info: DistInfo) -> Trainable:
        """The NF4 base (its other weights in ``base_dtype``), adapters on ``targets``; the result is a PEFT
        adapter and its qlora_config.json."""
        compute = self.compute_dtype or ("fp32" if self.precision == "fp32" else "bf16")
        dtype = self.base_dtype(info.world_size)
        # Under FSDP each decoder layer's NF4 storage is sharded as soon as it is quantized: a process keeps its
        # share of the 4-bit model while loading, plus one layer as stored (benchmarks/bench_fsdp_load_memory.py).
        sharded = self.parallel == "fsdp" and info.enabled
        on_layer = (lambda layer: shard_nf4_layers(layer, info)) if sharded else None
        adapter_dtype = torch.bfloat16 if self.trained_dtype(info.world_size) == "bf16" else torch.float32
        if self.init in OWN_BASE and sharded:
            raise ValueError(f"--init {self.init} rewrites the whole 4-bit base with the adapter's start; it is not "
                             "supported with --parallel fsdp")
        if self.init == "loftq":  # LoftQ (qlora/loftq.py): the base is quantized with the adapter's start
            model = prepare_loftq_model(model_dir, lora_config=self.lora_config(), num_iter=self.loftq_iter,
                                        blocksize=self.blocksize, double_quant=self.double_quant,
                                        compute_dtype=parse_dtype(compute), adapter_dtype=adapter_dtype,
                                        dtype=parse_dtype(dtype))
        else:
            model = prepare_qlora_model(model_dir, lora_config=self.lora_config(), blocksize=self.blocksize,
                                        double_quant=self.double_quant, compute_dtype=compute,
                                        adapter_dtype=adapter_dtype,  # under FSDP the fp32 shards are the master
                                        dtype=dtype, on_layer=on_layer)
            if self.init == "olora":  # PEFT's olora_init on the 4-bit base (lora/init.py): W_res re-quantized,
                adopt_rewritten_base(model)  # so the exact adapter is plain LoRA on that base, saved beside it
        layer = nf4_layers(model)[0][1]  # every layer shares the settings (a 4-bit --model: those it was saved with)
        settings = {"blocksize": layer.blocksize, "double_quant": layer.double_quant, "compute_dtype": compute,
                    "dtype": dtype}
        record = {**settings, LOFTQ_BASE: OWN_BASE[self.init]} if self.init in OWN_BASE else settings

        def export(m, directory):
            with gathered_trainable(unwrap_model(m)) as whole:  # collective: FSDP2 adapters gathered whole
                if info.is_main:
                    save_adapter(whole, directory, base_model_name_or_path=str(model_dir), metadata=QLORA_MARKER)
                    own = dict(record)
                    if self.init in OWN_BASE:  # the adapter fits only this base: save it beside the adapter
                        save_quantized(unload(copy.deepcopy(whole)), Path(directory) / OWN_BASE[self.init])
                        copy_tokenizer_files(model_dir, Path(directory) / OWN_BASE[self.init])
                        own[BASE_FINGERPRINT] = weights_fingerprint(Path(directory) / OWN_BASE[self.init])
                    write_qlora_record(directory, own)

        return Trainable(model, {"method": "qlora", "lora": self.lora_metadata(), "qlora": settings}, export,
                         "QLoRA adapter")

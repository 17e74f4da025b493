"""LoRA (Hu et al. 2021): a frozen 16/32-bit base, trainable low-rank adapters A (r, in) and B (out, r) on its
linear layers, saved as a PEFT adapter (adapter_config.json, adapter_model.safetensors)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from finetune_ref.lora import LoraConfig, inject_lora, save_adapter
from finetune_ref.lora.init import is_mutating_init
from finetune_ref.models.loader import load_model
from finetune_ref.train.distributed import DistInfo, unwrap_model
from finetune_ref.train.fsdp import gathered_trainable

from .base import RunConfig, Trainable


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraRecipe(RunConfig):
    """``finetune train --method lora``: the run's settings, LoRA's adapter and its defaults."""

    method: ClassVar[str] = "lora"

    # Adapters take large steps: 1e-3 is what the README's runs measured; the LoRA paper's experiments
    # (Hu et al. 2021) used 2e-4 to 2e-3.
    lr: float = 1e-3
    precision: str = "fp32"            # fp32 base and adapters (PEFT's adapter dtype); bf16 halves the base
    optimizer: str = "adamw"
    rank: int = 8                      # r
    alpha: float = 16.0                # scaling = alpha / r = 2
    dropout: float = 0.0               # on the adapter's input only
    # Every linear layer of the blocks, not only q/v as Hu et al. 2021: adapting all of them is what matches
    # full fine-tuning (Dettmers et al. 2023, section 4).
    targets: tuple[str, ...] | str = "all-linear"
    rslora: bool = False               # scaling alpha / sqrt(r) (Kalajdzievski 2023)
    dora: bool = False                 # DoRA (Liu et al. 2024): a trained magnitude per output (lora/dora.py)
    # How A and B start: "default" (A random, B = 0), "gaussian", or "pissa", "pissa_niter_K", "olora", which
    # move part of W into the adapter (lora/init.py); "loftq" is QLoRA's (qlora/loftq.py).
    init: str = "default"
    # Modules trained in full beside the adapters, saved with them (lora/modules_to_save.py), e.g. ("norm",);
    # a module tied to another (SmolLM2's lm_head and embed_tokens) is refused.
    modules_to_save: tuple[str, ...] = ()
    # With embed_tokens in targets on a model whose lm_head is tied to it (SmolLM2): give the head the same
    # adapter (PEFT's ensure_weight_tying, lora/embedding.py); without it such targets are refused.
    ensure_weight_tying: bool = False
    # Token ids whose embedding rows train directly (PEFT's trainable_token_indices, lora/trainable_tokens.py),
    # e.g. newly added tokens; a tied lm_head follows the same rows.
    trainable_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lora_config()  # LoraConfig checks r, alpha, dropout and targets

    def lora_config(self) -> LoraConfig:
        if self.init not in ("default", "gaussian", "loftq") and not is_mutating_init(self.init):
            raise ValueError(f"--init {self.init!r} is not one of default, gaussian, pissa, pissa_niter_K (K >= 1), "
                             "olora, loftq")
        if self.init == "loftq" and self.method != "qlora":
            raise ValueError("--init loftq quantizes the base together with the adapter: use it with --method qlora")
        init = True if self.init in ("default", "loftq") else self.init
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.targets,
                          use_rslora=self.rslora, use_dora=self.dora, init_lora_weights=init,
                          modules_to_save=list(self.modules_to_save) or None,
                          ensure_weight_tying=self.ensure_weight_tying,
                          trainable_token_indices=list(self.trainable_tokens) or None)

    def lora_metadata(self) -> dict:
        """The adapter settings a resume must match."""
        meta = {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.targets, "use_rslora": self.rslora}
        if self.dora:  # only when on, so that checkpoints written before these options existed still resume
            meta["use_dora"] = True
        if self.init != "default":
            meta["init"] = self.init
        if self.modules_to_save:
            meta["modules_to_save"] = list(self.modules_to_save)
        if self.ensure_weight_tying:
            meta["ensure_weight_tying"] = True
        if self.trainable_tokens:
            meta["trainable_token_indices"] = list(self.trainable_tokens)
        return meta

    def check_shapes(self, model_dir, flag) -> None:
        """On the model built on the meta device (no memory): ``targets`` must match its linear layers, and
        ``rank`` be at most min(in_features, out_features) of each (a larger rank adds parameters, and memory
        enough to kill the process, but no expressiveness: B @ A has rank <= that minimum anyway); the trainable
        tokens and ``modules_to_save`` must name modules it has.

        Raises:
            ValueError: naming --targets, --rank (and the layer that bounds it), --trainable-tokens or
                --modules-to-save.
        """
        import torch

        from finetune_ref.lora.inject import candidate_modules, find_target_modules, tied_heads_to_wrap
        from finetune_ref.lora.modules_to_save import modules_to_save_of
        from finetune_ref.lora.trainable_tokens import token_targets
        from finetune_ref.models.config import LlamaConfig
        from finetune_ref.models.llama import LlamaForCausalLM

        config = model_dir if isinstance(model_dir, LlamaConfig) else \
            LlamaConfig.from_json_file(Path(model_dir) / "config.json")  # a directory, or its config (memory)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        shown = (self.targets if self.targets == "all-linear" else f"re:{self.targets}"
                 if isinstance(self.targets, str) else ",".join(self.targets))  # as the user typed it
        try:
            names = find_target_modules(model, self.lora_config())
            tied = tied_heads_to_wrap(model, names, self.lora_config())  # a tied embed_tokens needs the flag
        except ValueError as err:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            reason = ("matches no layer of this model" if "matches no module" in str(err)
                      else str(err).replace("target_modules matched", "matches"))
            if "ensure_weight_tying" in str(err):  # a tied embed_tokens: the message names the option (the flag)
                raise ValueError(f"{flag('targets')} {shown}: {err}") from None
            raise ValueError(f"{flag('targets')} {shown}: {reason}; its linear layers are {', '.join(linear)} "
                             "and its embedding is embed_tokens (e.g. --targets q_proj,v_proj, all-linear, "
                             "all-linear,embed_tokens, or re:<regex of full names>)") from None
        if self.ensure_weight_tying and not tied:
            raise ValueError(f"{flag('ensure_weight_tying')}: nothing to tie here (it gives a tied lm_head the adapter of "
                             f"embed_tokens, and {flag('targets')} {shown} adapts no embedding whose weight another "
                             "module shares); leave it out")
        try:
            token_targets(model, self.lora_config().trainable_token_indices, names)
        except ValueError as err:
            raise ValueError(f"{flag('trainable_tokens')} {','.join(map(str, self.trainable_tokens))}: {err}") from None
        # its messages name modules_to_save (the CLI writes the flag)
        modules_to_save_of(model, self.lora_config().modules_to_save, candidate_modules(model), names)
        modules = dict(model.named_modules())
        features = {n: (modules[n].num_embeddings, modules[n].embedding_dim) if isinstance(modules[n], torch.nn.Embedding)
                    else (modules[n].in_features, modules[n].out_features) for n in names}
        name = min(names, key=lambda n: min(features[n]))
        limit = min(features[name])
        if self.rank > limit:
            raise ValueError(f"{flag('rank')} {self.rank} is larger than {name.rsplit('.', 1)[-1]} allows "
                             f"({features[name][0]} -> {features[name][1]} features: a rank above "
                             f"min(in_features, out_features) adds memory but no expressiveness); use --rank {limit} "
                             "or less")

    def base_dtype(self, world_size: int = 1) -> str:
        """The frozen base needs no fp32 master copy under FSDP (only the adapters train): ``dtype``, else the
        precision's dtype at any world size."""
        return self.dtype or self.trained_dtype(1)

    def build(self, model_dir: Path, info: DistInfo) -> Trainable:
        """The dense base in ``base_dtype``, adapters on ``targets``; the result is a PEFT adapter."""
        model = load_model(model_dir, dtype=self.base_dtype(info.world_size))
        inject_lora(model, self.lora_config())

        def export(m, directory):
            with gathered_trainable(unwrap_model(m)) as whole:  # collective: FSDP2 adapters gathered whole
                if info.is_main:
                    save_adapter(whole, directory, base_model_name_or_path=str(model_dir))

        return Trainable(model, {"method": "lora", "lora": self.lora_metadata()}, export, "adapter")

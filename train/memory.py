"""Analytic memory estimator for fine-tuning a Llama model: full, LoRA and QLoRA (``finetune memory``).

For a model shape (any Hugging Face ``config.json``, or a preset with a published shape) and a training setup
it counts the bytes of every tensor class a training step holds, and the peak:

    weights            base weights as stored: 2 or 4 B/param; NF4 codes 0.5 B/param for QLoRA's linears
    quant_constants    NF4 block constants: fp32 absmax (32/64 bits/param) or, double-quantized, an 8-bit
                       absmax plus an fp32 one per 256 blocks (8/64 + 32/(64*256) bits/param)
    lora_parameters    A (r, in) and B (out, r) per adapted linear, in the adapter dtype; DoRA adds m (out,);
                       modules_to_save copies (norms, an untied lm_head) in the model dtype
    gradients          one per trainable parameter, in its dtype
    optimizer_states   AdamW's two moments: 8 B/param in fp32; 2 B/param + fp32 absmax per 256 in 8-bit
    master_weights     fp32 copy of each 16-bit trainable parameter (optim.adamw.MasterWeightAdamW)
    activations        tensors autograd saves for backward, counted op by op for models/llama.py
    logits_and_loss    the (B, T, vocab) logits and the fp32 cross-entropy chain (models/loss.causal_lm_loss), or
                       the chunked loss's per-chunk temporaries and kept gradients (chunked_causal_lm_loss)
    workspace          short-lived buffers of the peak moment (layer backward, optimizer temporaries)

Sources of the per-parameter rates: mixed-precision training keeps 2 (bf16 weight) + 2 (grad) + 4 (fp32 master)
+ 4 + 4 (Adam moments) = 16 B/param (Micikevicius et al. 2018, section 3.1; Rajbhandari et al. 2020, "ZeRO",
section 3.1). LoRA trains r * (in + out) per adapted matrix (Hu et al. 2021, section 4.1). NF4 and double
quantization: Dettmers et al. 2023 ("QLoRA", section 3: 4.5 vs 4.127 bits/param at blocksize 64, a saving of
0.373 bits/param). 8-bit AdamW: Dettmers et al. 2022 ("8-bit Optimizers via Block-wise Quantization",
section 2), with bitsandbytes' block size 256 and its rule that tensors under 4096 elements keep 32-bit
states (``bitsandbytes/optim/optimizer.py``, ``Optimizer2State.init_state``; ``optim/adamw.py`` stores the
same). Paged optimizers (QLoRA, section 3) keep the states of tensors of at least 1e5 elements off the device:
this project's (``optim/paging.py``, home "host") in host memory, one tensor's states visiting the device
during its update; bitsandbytes' in unified memory evicted only under pressure. They count in ``peak`` (the
estimate is of one memory, as on a CPU), and ``pageable`` says how much of it leaves a GPU. The fp32 master
copy is kept for 16-bit trainable parameters whatever the optimizer, as this project's optimizers do
(bitsandbytes' own would update 16-bit weights without one); paged optimizers page it with the moments.

Activations and the peak are those of *this* project's implementation (``models/llama.py``, the training loop
``train/trainer.py``), measured op by op with ``torch.autograd.graph.saved_tensors_hooks``; per decoder
layer and token, on the gradient path:

    RMSNorm (x2)     fp32 input (or its fp32 copy for 16-bit models) H * 4, and 1/rms 4 bytes;
                     plus the normalised input H * e when the norm weight trains (full); with selective
                     recomputation only the input H * e and 1/rms (models/norm.py)
    projections      the input of q/k/v, gate/up and down once (H, H, I) * e when a weight or an adapter of
                     the adapter's dtype needs it; an adapter of another dtype keeps its own cast copy each;
                     with selective recomputation none of these (models/recompute.py), except where the
                     layer's input needs no gradient (LoRA's first layer)
    LoRA             A's output r * adapter bytes per adapted linear
    DoRA             also the base output (out * e) and B(A(x)) (out * adapter bytes) per adapted linear: the
                     two products with m / ||W + s B A||_c keep them for m's gradient (lora/dora.py); the norm
                     is detached (Liu et al. 2024, section 4.3), so nothing of it is saved
    attention        q, k and v (un-repeated: SDPA's enable_gqa), the output: (2 * Hq + 2 * Hkv) * e;
                     logsumexp nh * 4; the boolean mask as a float additive mask (B, 1, T, T) per layer
    SwiGLU           gate and up outputs (silu recomputed in backward): 2 * I * e

The peak is the largest of the moments of a steady-state step (the second one; optimizer states exist):
end of forward with the loss, start of backward (the fp32 log-softmax chain), the first and the last decoder
layer in backward, end of backward, and the optimizer step. ``train/trainer.py`` keeps the step's output
(and so the logits) alive until the next forward returns, so by default the logits count in every moment
(``keeps_output``). The kernels are those measured on CPU: the flash SDPA kernel, the single-tensor AdamW
(on a GPU torch's AdamW defaults to its foreach path, whose temporaries span all moments at once: not
modelled; ``MasterWeightAdamW``, used for bf16 weights, works one tensor at a time everywhere).

Not modelled: ``precision="bf16-autocast"``, KV-cache generation, distributed sharding, the CUDA context and
allocator fragmentation (add ~0.5-1 GB and ~5-10% on a GPU).

Beside this file: one decoder layer's activations and backward buffers (``memory_layer.py``), the model shapes
and presets (``memory_shapes.py``), the settings and the result (``memory_settings.py``); the ``finetune memory``
command is ``cli/memory.py``.
"""

from __future__ import annotations

import dataclasses

from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.loss import DEFAULT_CHUNK_TOKENS, keeps_gradients
from finetune_ref.train.memory_layer import layer_saved, layer_workspace, norm_saved
from finetune_ref.train.memory_settings import DTYPE_BYTES, MemoryEstimate, MemorySettings
from finetune_ref.train.memory_shapes import linear_shapes, parameter_count

__all__ = ["estimate_memory", "nf4_bytes", "optimizer_state_bytes"]

BNB_OPTIM_BLOCKSIZE = 256  # bitsandbytes/optim/optimizer.py, Optimizer2State.init_state (block_wise=True)
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size default)
BNB_MIN_PAGED_SIZE = 100_000  # smaller tensors' states are not paged (bitsandbytes Optimizer8bit.get_state_buffer)
# Bytes per element of one tensor that an optimizer step allocates while it updates that tensor, for (fp32,
# 16-bit) parameters, measured with train/memory_tracker.py on this project's optimizers (optim/):
# torch AdamW's single-tensor path makes sqrt(v) and its quotient (2 x 4 B); MasterWeightAdamW also an fp32
# copy of the gradient; the paged ones also page the states (and master) in; the 8-bit ones dequantize both
# moments to fp32 and re-quantize them. bitsandbytes' fused GPU kernels need none of this.
STEP_TEMPORARY_BYTES = {"adamw": (8, 12), "paged_adamw": (16, 24), "adamw8bit": (22, 26),
                        "paged_adamw8bit": (24, 32)}
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 8-bit absmax values (QLoRA, section 3)
BATCH_TENSORS = 5  # input_ids, attention_mask, labels, position_ids, document_ids (train/data.collate), int64


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """(packed codes, constants) in bytes for one NF4-quantized weight of ``numel`` elements (qlora/nf4.py).

    Codes: two 4-bit values per byte. Constants without double quantization: one fp32 absmax per block;
    with it: one uint8 code per block, one fp32 scale per 256 blocks and the fp32 offset (QLoRA, section 3).
    The 16-entry NF4 map and the 256-entry nested map are shared tensors (counted once per model, not here).
    """
    blocks = -(-numel // blocksize)
    if not double_quant:
        return -(-numel // 2), 4 * blocks
    return -(-numel // 2), blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


def optimizer_state_bytes(numel: int, optimizer: str) -> int:
    """Bytes of AdamW's two moments for one tensor: fp32 (8 B/param) or bitsandbytes 8-bit block-wise."""
    if optimizer.endswith("8bit") and numel >= BNB_MIN_8BIT_SIZE:
        return 2 * numel + 2 * 4 * -(-numel // BNB_OPTIM_BLOCKSIZE)  # uint8 m and v, fp32 absmax of each
    return 8 * numel


def _trainable_tensors(c: LlamaConfig, s: MemorySettings) -> list[int]:
    """Element counts of the trainable tensors (the optimizer's state is per tensor)."""
    if s.method == "full":
        shapes = linear_shapes(c)
        per_layer = [o * i for o, i in shapes.values()] + [c.hidden_size, c.hidden_size]
        head = [c.vocab_size * c.hidden_size] * (1 if c.tie_word_embeddings else 2) + [c.hidden_size]
        return per_layer * c.num_hidden_layers + head
    shapes = linear_shapes(c)
    per_layer = []
    for name in (t for t in s.target_modules if t in shapes):
        out_f, in_f = shapes[name]
        per_layer += [s.rank * in_f, out_f * s.rank] + ([out_f] if s.dora else [])
    embedding = [s.rank * c.vocab_size, c.hidden_size * s.rank] if "embed_tokens" in s.target_modules else []
    embedding += [s.trainable_tokens * c.hidden_size] if s.trainable_tokens else []
    return per_layer * c.num_hidden_layers + embedding + _saved_copies(c, s)


def _saved_copies(c: LlamaConfig, s: MemorySettings) -> list[int]:
    """Element counts of the modules_to_save copies (trained in full, in the model dtype)."""
    layer_norms = sum(x in s.modules_to_save for x in ("input_layernorm", "post_attention_layernorm"))
    norms = [c.hidden_size] * (layer_norms * c.num_hidden_layers + int("norm" in s.modules_to_save))
    return norms + ([c.vocab_size * c.hidden_size] if "lm_head" in s.modules_to_save else [])


def _loss_moments(c: LlamaConfig, s: MemorySettings, held: int) -> dict[str, tuple[int, int, int]]:
    """The moments of the loss and the output head: name -> (logits and loss, head gradients, workspace)."""
    e, full = DTYPE_BYTES[s.dtype], s.method == "full"
    n, n_shift, V, H = s.batch_size * s.seq_len, s.batch_size * (s.seq_len - 1), c.vocab_size, c.hidden_size
    head_grads = (V * H + H) * e if full else 0
    if not s.chunked_loss:
        # Logits (B, T, V) in the model dtype, and models/loss.causal_lm_loss: the shifted logits are copied to a
        # contiguous fp32 (B*(T-1), V) tensor, log_softmax's fp32 output is saved; in backward nll_loss and
        # log_softmax each produce an fp32 (B*(T-1), V) gradient while the saved output is still alive.
        logits = n * V * e
        return {"forward (loss)": (held + logits + 8 * n_shift * V, 0, 0),
                "backward (loss)": (held + 12 * n_shift * V, 0, 0),
                "backward (lm_head)": (held + logits, head_grads, n * H * e)}  # dlogits, dh, dW_lm_head
    # models/loss.chunked_causal_lm_loss: the hidden states and their shifted contiguous copy, d(loss)/dh, and
    # for a trained head d(loss)/dW, kept from the forward; the (chunk, V) workspace reused by every chunk (the
    # fp32 log-softmax, and the logits in a 16-bit model dtype). A trained head's dW is either one matmul over
    # the kept (N, V) gradient of the logits (16-bit, few tokens: keeps_gradients; the chunks' logits are made
    # in its rows) or an fp32 sum, with the chunk's (V, H) product and, for 16-bit weights, its fp32 copy.
    chunk = min(DEFAULT_CHUNK_TOKENS, n_shift)
    kept = full and keeps_gradients(n_shift, H, e, chunk)
    grad_w = (V * H * (e if kept else 4)) if full else 0
    kept_gradient = n_shift * V * e if kept else 0  # (N, V), the chunks' logits made in its rows
    chunk_logits = chunk * V * e if e != 4 and not kept else 0  # (C, V) in the model dtype
    per_chunk = 4 * chunk * V + chunk_logits + ((V * H * (4 if e == 4 else e + 4)) if full and not kept else 0)
    forward = n * H * e + 2 * n_shift * H * e + grad_w + kept_gradient + per_chunk
    # Backward: d(loss)/dh becomes the (B, T, H) gradient of the model's output; an fp32 dW is cast to the
    # weight's dtype (a new tensor for 16-bit weights) and accumulated into the tied embedding's gradient.
    backward = n_shift * H * e + n * H * e + (grad_w if e != 4 and not kept else 0)
    return {"forward (loss)": (forward, 0, 0), "backward (loss)": (backward, head_grads, 0)}


def loss_is_chunked(config: LlamaConfig, settings: MemorySettings) -> bool:
    """Whether the step computes the loss in chunks from the hidden states (models/loss.py) with these settings.

    LoRA or trainable tokens on embed_tokens of a tied model wrap the head too (lora.embedding.TiedLoRAHead,
    lora.trainable_tokens), as does modules_to_save of lm_head: a wrapped head is not a plain linear, so the model
    computes the plain loss on materialised (B, T, vocab) logits (LlamaForCausalLM)."""
    wrapped_head = "lm_head" in settings.modules_to_save or _adapted_tied_head(config, settings)
    return settings.chunked_loss and not wrapped_head


def _adapts_embedding(settings: MemorySettings) -> bool:
    return "embed_tokens" in settings.target_modules or settings.trainable_tokens > 0


def _adapted_tied_head(config: LlamaConfig, settings: MemorySettings) -> bool:
    """An adapted embed_tokens whose weight lm_head shares: the head is wrapped to follow it."""
    return _adapts_embedding(settings) and config.tie_word_embeddings


def estimate_memory(config: LlamaConfig, settings: MemorySettings) -> MemoryEstimate:
    """Estimate the memory of one steady-state training step (see the module docstring).

    Args:
        config: the model shape (``LlamaConfig``, e.g. ``preset_config("llama-2-7b")`` or ``load_config``).
        settings: the training setup.

    Returns:
        A ``MemoryEstimate`` in bytes.

    Raises:
        ValueError: invalid settings (the field is named).
        TypeError: ``config`` is not a ``LlamaConfig``.
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a models.config.LlamaConfig, got {type(config).__name__}")
    s, c = settings, config
    s.validate()
    if not loss_is_chunked(c, s):
        s = dataclasses.replace(s, chunked_loss=False)
    # LoRA on embed_tokens (lora/embedding.py): the residual stream needs gradients from the first layer on, and a
    # tied head is wrapped too (lora.embedding.TiedLoRAHead), keeping its input and x B_e for A_e's gradient.
    emb, tied_head = _adapts_embedding(s), _adapted_tied_head(c, s)
    e = DTYPE_BYTES[s.dtype]
    a = DTYPE_BYTES[s.adapter_dtype or s.dtype]
    full, L = s.method == "full", c.num_hidden_layers
    n, n_shift, V, H = s.batch_size * s.seq_len, s.batch_size * (s.seq_len - 1), c.vocab_size, c.hidden_size
    total_params = parameter_count(c)
    linear_numels = [o * i for o, i in linear_shapes(c).values()]

    # Static: weights, quantization constants, adapters, optimizer states, master weights; and gradients.
    quant = 0
    weights = total_params * e + (c.head_dim // 2) * 4  # + RoPE inv_freq buffer (fp32)
    if s.method == "qlora":
        packed = consts = 0
        for numel in linear_numels:
            p, q = nf4_bytes(numel, s.blocksize, s.double_quant)
            packed, consts = packed + p, consts + q
        weights += L * (packed - sum(linear_numels) * e)
        quant = L * consts + 16 * 4 + (NESTED_BLOCKSIZE * 4 if s.double_quant else 0)  # + the two shared maps
    trainable = _trainable_tensors(c, s)
    trainable_params = sum(trainable)
    t_bytes = e if full else a  # dtype of the trainable tensors (the adapters'; modules_to_save copies: e)
    copies = 0 if full else sum(_saved_copies(c, s))
    lora_params = 0 if full else (trainable_params - copies) * a + copies * e
    gradients = trainable_params * t_bytes + copies * (e - t_bytes)
    optimizer_states = sum(optimizer_state_bytes(x, s.optimizer) for x in trainable)
    master = (trainable_params - copies) * 4 * (t_bytes < 4) + copies * 4 * (e < 4)

    # Gradients present at the start / end of the layers' backward (full: the head's first, the layers' last).
    if full:
        head_grads = (V * H + H) * e
        layer_grads = (sum(linear_numels) + 2 * H) * e
        embed_transient = V * H * e  # embedding backward builds a dense (V, H) gradient before accumulation
    else:
        head = V * H * e if "lm_head" in s.modules_to_save else 0  # the head copy's gradient comes first
        head_grads, layer_grads, embed_transient = head, (gradients - head) // L, 0

    # Activations saved for backward.
    batch = (BATCH_TENSORS if s.attention_mask else 2) * n * 8  # the batch's int64 tensors (or ids and labels)
    rope = 2 * n * c.head_dim * e  # cos and sin, shared by all layers
    # + normalised x and lm_head's input (the chunked loss saves no input: it keeps gradients instead)
    # (the final norm is outside the checkpointed layers: models/llama.LlamaModel recomputes it either way)
    final_norm = norm_saved(n, H, e, True, full or "norm" in s.modules_to_save, s.selective_recompute)
    final_norm += n * H * e if (full and not s.chunked_loss) or "lm_head" in s.modules_to_save else 0
    lora_emb = "embed_tokens" in s.target_modules
    final_norm += (n * H * a + n * s.rank * a) if tied_head and lora_emb else 0
    # trainable tokens: a tied head's F.linear(x, E') keeps x and E' = E with the rows replaced (V, H)
    final_norm += (n * H * e + V * H * e) if tied_head and s.trainable_tokens else 0
    first = layer_saved(c, s, grad_in=full or emb) + (n * s.rank * a if lora_emb else 0)  # + F.embedding(ids, A^T)
    rest = layer_saved(c, s, grad_in=True)
    workspace = layer_workspace(c, s)
    if s.gradient_checkpointing:
        # Each checkpointed layer keeps only its input (N, H) and the shared mask, cos, sin; backward recomputes
        # one layer at a time (its saved tensors count as activations while it runs).
        kept = batch + rope + (s.batch_size * s.seq_len * s.seq_len if s.attention_mask else 0)  # + boolean mask
        activations = kept + L * n * H * e + final_norm
        top_acts, bottom_acts = activations + rest, kept + n * H * e + first
    else:
        activations = batch + rope + first + (L - 1) * rest + final_norm
        top_acts, bottom_acts = activations, batch + rope + first

    # ``held``: the logits the loop keeps alive through backward and the step, and (the previous step's)
    # through the next forward.
    logits = n * V * e
    held = logits if s.keeps_output and not s.chunked_loss else 0
    loss_moments = _loss_moments(c, s, held)

    # Optimizer step temporaries, per element of the largest trainable tensor (STEP_TEMPORARY_BYTES).
    step_tmp = STEP_TEMPORARY_BYTES[s.optimizer][0 if t_bytes == 4 else 1] * max(trainable)
    if s.fused_adamw and s.optimizer == "adamw" and t_bytes == 4:
        step_tmp = 0  # torch's fused AdamW kernel updates in place (measured: 0 B/param)

    moments = {  # (activations, logits and loss, gradients, workspace)
        **{name: (activations, lg, gr, ws) for name, (lg, gr, ws) in loss_moments.items()},
        "backward (last layer)": (top_acts, held, head_grads, workspace),
        "backward (first layer)": (bottom_acts, held, head_grads + (L - 1) * layer_grads, workspace),
        "backward (end)": (batch, held, gradients, embed_transient),
        "optimizer step": (batch, held, gradients, step_tmp),
    }
    static_parts = {"weights": weights, "quant_constants": quant, "lora_parameters": lora_params,
                    "optimizer_states": optimizer_states, "master_weights": master}
    phases = {name: {**static_parts, "activations": acts, "logits_and_loss": lg, "gradients": gr, "workspace": ws}
              for name, (acts, lg, gr, ws) in moments.items()}
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    return MemoryEstimate(
        parameters=total_params + (trainable_params if not full else 0),
        trainable_parameters=trainable_params, weights=weights, quant_constants=quant,
        lora_parameters=lora_params, gradients=gradients, optimizer_states=optimizer_states,
        master_weights=master, activations=activations,
        logits_and_loss=max(m[1] for m in moments.values()), workspace=max(m[3] for m in moments.values()),
        pageable=sum(optimizer_state_bytes(x, s.optimizer) + (4 * x if master else 0) for x in trainable
                     if x >= BNB_MIN_PAGED_SIZE) if s.optimizer.startswith("paged") else 0,
        peak=totals[peak_phase], peak_phase=peak_phase, live_at_peak=phases[peak_phase], phases=phases)

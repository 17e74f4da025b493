"""The activations of one decoder layer for the memory estimator (``train/memory.py``): what autograd saves for
backward in ``models/llama.py`` (``layer_saved``, with RMSNorm's share ``norm_saved``), and the transient buffers
of a layer's backward (``layer_workspace``). The terms are listed and sourced in ``train/memory.py``'s docstring;
each was measured op by op with ``torch.autograd.graph.saved_tensors_hooks`` and is checked against a measured
peak in ``tests/test_memory.py``.
"""

from __future__ import annotations

from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import SDPA_ENABLE_GQA
from finetune_ref.train.memory_settings import DTYPE_BYTES, MemorySettings
from finetune_ref.train.memory_shapes import LINEAR_NAMES, linear_shapes


def layer_saved(c: LlamaConfig, s: MemorySettings, grad_in: bool) -> int:
    """Bytes one decoder layer saves for backward; ``grad_in``: does its input require grad?"""
    n = s.batch_size * s.seq_len
    h, i = c.hidden_size, c.intermediate_size
    hq, nh = c.num_attention_heads * c.head_dim, c.num_attention_heads
    e = DTYPE_BYTES[s.dtype]
    full = s.method == "full"
    a = DTYPE_BYTES[s.adapter_dtype or s.dtype]
    targeted = {name: full or name in s.target_modules for name in LINEAR_NAMES}

    recompute = s.selective_recompute and not s.gradient_checkpointing
    # the adapters run as lora/branch.py (see lora.branch.shared_adapters)
    branch = s.fused_projections and not full and not s.dora and not s.lora_dropout

    def projection_inputs(names: tuple[str, ...], in_dim: int, shared_with_saved: bool,
                          recomputed: bool = False) -> int:
        # Full: the weight gradient needs the input (saved once per group, shared storage).
        # LoRA: A's gradient needs the input: the same tensor if the adapter has the activation dtype, else
        # each adapter keeps its own cast copy (lora/layer.py LoRALinear.forward: x.to(lora_A.dtype)).
        # ``recomputed``: selective recomputation (models/recompute.py) makes the shared tensor again.
        hit = [x for x in names if targeted[x]]
        if not hit:
            return 0
        if not full and s.lora_dropout:
            # lora/functional.lora_forward: each adapter saves its dropped input (adapter dtype) for A's gradient,
            # and F.dropout on the CPU (ATen's _dropout: input * noise) its scaled noise in that dtype too (on
            # CUDA a 1-byte mask: over-counted there), whatever is recomputed; nothing keeps x itself
            return len(hit) * n * in_dim * 2 * a
        if full or a == e or branch:
            # lora/branch.py (with the fused projections, not DoRA): the input in its own dtype, cast again in
            # backward, shared by the group
            return 0 if shared_with_saved or recomputed else n * in_dim * e
        # PEFT's ops: the casts are recomputed too; otherwise one per adapter
        return 0 if recomputed else len(hit) * n * in_dim * a

    out_dim = {name: o for name, (o, _) in linear_shapes(c).items()}

    def lora_mid(names: tuple[str, ...]) -> int:
        dora = (lambda x: n * out_dim[x] * (e + a)) if s.dora else (lambda x: 0)
        return 0 if full else sum(n * s.rank * a + dora(x) for x in names if targeted[x])

    def norm(name: str, x_requires_grad: bool) -> int:
        return norm_saved(n, h, e, x_requires_grad, full or name in s.modules_to_save, recompute)

    saved = norm("input_layernorm", grad_in)
    y_grad = grad_in or full
    qkv = ("q_proj", "k_proj", "v_proj")
    # the norm keeps its input, so its output is recomputed from it (models/llama.DecoderLayer)
    saved += projection_inputs(qkv, h, False, recompute and grad_in) + lora_mid(qkv)
    attn_grad = y_grad or any(targeted[x] for x in qkv)
    if attn_grad:
        # SDPA (flash kernel on CPU) saves q, k, v, out and logsumexp (k, v un-repeated: models/llama.py passes
        # enable_gqa); the boolean mask is turned into a float additive mask (B, 1, T, T) in the activation
        # dtype, saved too.
        hkv = (c.num_key_value_heads * c.head_dim) if SDPA_ENABLE_GQA else hq
        saved += (2 * hq + 2 * hkv) * n * e + n * nh * 4 + (
            s.batch_size * s.seq_len * s.seq_len * e if s.attention_mask else 0)
    saved += projection_inputs(("o_proj",), hq, attn_grad) + lora_mid(("o_proj",))
    h2_grad = attn_grad or targeted["o_proj"]
    saved += norm("post_attention_layernorm", h2_grad)
    gu = ("gate_proj", "up_proj")
    saved += projection_inputs(gu, h, False, recompute and h2_grad) + lora_mid(gu)
    mlp_grad = h2_grad or full or any(targeted[x] for x in gu)
    if mlp_grad:
        saved += 2 * n * i * e  # gate and up outputs (models/llama.SwiGLU recomputes silu(gate) in backward)
    saved += projection_inputs(("down_proj",), i, False, recompute and mlp_grad) + lora_mid(("down_proj",))
    return saved


def norm_saved(n: int, h: int, e: int, x_requires_grad: bool, weight_trains: bool, recompute: bool) -> int:
    """Bytes an RMSNorm over n rows of h saves. models/norm.rms_norm: x.float() (or x itself in fp32) and 1/rms
    are saved by pow/mul; the weight's gradient needs the normalised x (in the model dtype). With selective
    recomputation only x in its own dtype and 1/rms are kept (models/norm.py)."""
    if recompute:
        return n * h * e + n * 4 if x_requires_grad or weight_trains else 0
    return (n * h * 4 + n * 4 if x_requires_grad else 0) + (n * h * e if weight_trains else 0)


def layer_workspace(c: LlamaConfig, s: MemorySettings) -> int:
    """Transient gradients inside one layer's backward (measured on models/llama.py): the incoming residual
    gradient (N, H), plus the larger of SwiGLU's two live (N, I) gradients and attention's q, k, v, out (N, Hq)."""
    n, e = s.batch_size * s.seq_len, DTYPE_BYTES[s.dtype]
    hq = c.num_attention_heads * c.head_dim
    # QLoRA: each NF4 linear's backward dequantizes its weight (kernels/reference.py _dequantize: the gathered
    # fp32 values, scaled in place; measured 4 B per element of the largest weight at the layer's peak).
    shapes = linear_shapes(c)
    dequantized = 4 * max(o * i for o, i in shapes.values()) if s.method == "qlora" else 0
    if s.method == "qlora" and s.fused_projections and not s.dora:
        # fused (models/fused.py): a group's layers are dequantized into one workspace in the compute dtype, each
        # through its own fp32 gather; the largest group at the peak
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            workspace = sum(shapes[x][0] for x in group) * c.hidden_size * e
            dequantized = max(dequantized, workspace + 4 * max(shapes[x][0] * shapes[x][1] for x in group))
    # Selective recomputation (not inside checkpointed layers): in down_proj's backward the recomputed SwiGLU
    # product (and an fp32 adapter's cast of it) is live too; full fine-tuning also remakes a norm's output and
    # normalised input for the weight gradients (models/recompute.py, models/norm.py).
    recomputed = 0
    a = DTYPE_BYTES[s.adapter_dtype or s.dtype]
    cast = s.method != "full" and a != e and "down_proj" in s.target_modules
    if s.selective_recompute and not s.gradient_checkpointing:
        recomputed = n * c.intermediate_size * (e + (a if cast else 0))
        if s.method != "full" and s.lora_dropout:
            recomputed = 0  # the adapters keep their dropped inputs: nothing saved is recomputed
        recomputed += 2 * n * c.hidden_size * e if s.method == "full" else 0
    elif cast and s.fused_projections and not s.dora and not s.lora_dropout:
        # lora/branch.py casts down_proj's input to the adapters' dtype again in its backward (measured: with the
        # layer recomputed whole, also an (N, H) one of the groups' is live then); not at the moment a QLoRA
        # layer's dequantized weights are
        dequantized = max(dequantized, n * (c.intermediate_size + c.hidden_size) * a)
    return n * c.hidden_size * e + max(2 * n * c.intermediate_size, 4 * n * hq) * e + dequantized + recomputed

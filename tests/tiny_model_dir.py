"""A tiny Llama saved as a Hugging Face directory with its own tokenizer, for tests that run the CLI or whole
training runs in seconds."""

import json

import torch

from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM


def make_model_dir(root, hidden=32, layers=2):
    """A tiny Llama with a 350-token byte-level BPE tokenizer trained on pydoc text, plus a small corpus."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from finetune_ref.models.checkpoint import save_model

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["\n".join(topics[k] for k in sorted(topics)[:20])], trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden,
                                         intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    save_model(model, root / "model")
    bpe.save(str(root / "model" / "tokenizer.json"))
    (root / "model" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (root / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[20:24])[:12000])
    return root / "model", root / "corpus.txt"


# A tiny transformers Llama with SmolLM2's real tokenizer (the CLI tests of QLoRA and the LoRA variants).
HF_TINY_CONFIG = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=10000.0)


def make_hf_model_dir(root, tokenizer_dir):
    """(model dir, corpus file): a tiny transformers ``LlamaForCausalLM`` saved with ``save_pretrained`` beside the
    tokenizer files of ``tokenizer_dir``, and a few pydoc topics as text."""
    import shutil

    from pydoc_data.topics import topics
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM as HFLlamaForCausalLM

    torch.manual_seed(0)
    HFLlamaForCausalLM(HFLlamaConfig(**HF_TINY_CONFIG)).save_pretrained(root / "fp")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, root / "fp" / name)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(topics[t] for t in ("naming", "assignment", "if", "while", "for", "try")))
    return root / "fp", corpus

"""What the PEFT parity tests of the embedding-side variants share: a tiny random transformers Llama (GQA: 4
query heads, 2 key/value heads) and the whole-tensor relative comparison they state their tolerance with."""

import torch


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """max|actual - expected| <= rel * max|expected|, over the whole tensor."""
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.double().abs().max().item(), err


def tiny_hf_llama(tie: bool = False, vocab_size: int = 96, intermediate_size: int = 96):
    """A seeded random ``transformers.LlamaForCausalLM`` in eval mode (2 layers, hidden 64)."""
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)).eval()

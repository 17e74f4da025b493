"""Generation: the KV-cache path equals recomputing the whole sequence; top-p keeps the right tokens."""

import pytest
import torch

from finetune_ref.models.generate import generate, sample_next
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_greedy_with_cache_equals_greedy_without():
    model = tiny_model()
    prompt = [3, 7, 1, 9]
    new = generate(model, prompt, max_new_tokens=12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert new == ids[len(prompt):]


def test_stop_token_ends_generation():
    model = tiny_model()
    free = generate(model, [3, 7], max_new_tokens=10)
    stop = free[2]
    out = generate(model, [3, 7], max_new_tokens=10, stop_ids={stop})
    assert out == free[:free.index(stop) + 1]


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.5 + 0.3 >= 0.7 excludes the rest
    draws = {int(sample_next(logits, temperature=1.0, top_p=1.0, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2, 3}
    assert int(sample_next(logits, temperature=1.0, top_p=0.4, generator=g)) == 0


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    a = generate(model, [1, 2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, [1, 2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    assert a == b


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(1, 4), **kwargs)


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model(), [], max_new_tokens=2)

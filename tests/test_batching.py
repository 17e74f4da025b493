"""Batched generation (models/batching.py): left padding, per-row positions, stops, sampling and rows joining
and leaving between steps give each row exactly the tokens it gets alone (greedy, fp32, tiny random Llama)."""

import pytest
import torch

from finetune_ref.models.batching import DecodeBatch, Row, generate_batch
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.generate import generate
from finetune_ref.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[3, 7, 1, 9, 4, 4, 2], [5], [8, 8, 1, 30], [12, 2, 19, 7, 33, 6, 1, 5, 5, 21, 3]]


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def test_batched_greedy_equals_each_prompt_alone():
    model = tiny_model()
    lengths = [12, 3, 9, 6]  # rows finish at different steps and retire while others go on
    rows = generate_batch(model, [Row(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)])
    for row, prompt, n in zip(rows, PROMPTS, lengths):
        assert row.new_ids == generate(model, prompt, max_new_tokens=n)
        assert row.finish_reason == "length"


def test_rows_joining_between_steps_equal_each_alone():
    model = tiny_model()
    batch = DecodeBatch(model)
    rows = [Row(p, max_new_tokens=10) for p in PROMPTS]
    batch.add(rows[:1])
    for step, row in enumerate(rows[1:]):  # admit one request every two decode steps: caches of other lengths
        batch.step()
        batch.step()
        batch.add([row])
        assert batch.mask.shape[0] == len(batch) == step + 2
    while len(batch):
        batch.step()
        batch.retire()
    for row, prompt in zip(rows, PROMPTS):
        assert row.new_ids == generate(model, prompt, max_new_tokens=10)


def test_stop_token_and_stop_string_end_their_row_only():
    model = tiny_model()
    free = generate(model, PROMPTS[0], max_new_tokens=10)
    decode = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731  one "word" per token
    stop_id = Row(PROMPTS[0], max_new_tokens=10, stop_ids=frozenset({free[3]}))
    stop_text = Row(PROMPTS[0], max_new_tokens=10, stop_strings=(f" t{free[2]}",))
    other = Row(PROMPTS[2], max_new_tokens=10)
    generate_batch(model, [stop_id, stop_text, other], decode=decode)
    first = free.index(free[3])
    assert stop_id.new_ids == free[:first + 1] and stop_id.finish_reason == "stop"
    assert stop_id.text == decode(free[:first])  # the stop token is not text
    cut = free.index(free[2])
    assert stop_text.text == decode(free[:cut]) and stop_text.finish_reason == "stop"
    assert other.new_ids == generate(model, PROMPTS[2], max_new_tokens=10)


def test_streamed_text_holds_back_a_possible_stop_string():
    row = Row([1], stop_strings=("END",))
    row.text = "abcEN"
    assert row.take_text() == "abc"  # "EN" may become "END"
    row.text = "abcENx\ufffd"
    assert row.take_text() == "E"  # drop the incomplete character, then hold back len("END") - 1 = 2
    row.text, row.finish_reason = "abcENxyz", "length"
    assert row.take_text() == "Nxyz"


def test_seeded_sampling_per_row_equals_alone_and_greedy_rows_stay_greedy():
    model = tiny_model()
    sampled = Row(PROMPTS[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    greedy = Row(PROMPTS[1], max_new_tokens=8)
    generate_batch(model, [sampled, greedy])
    assert sampled.new_ids == generate(model, PROMPTS[0], 8, temperature=1.0, top_p=0.9, seed=5)
    assert greedy.new_ids == generate(model, PROMPTS[1], 8)


def test_context_limit_ends_a_row_and_bad_rows_are_refused():
    model = tiny_model()
    row = Row([i % 40 for i in range(59)], max_new_tokens=20)
    generate_batch(model, [row])
    assert len(row.prompt) + len(row.new_ids) == 64 and row.finish_reason == "length"
    with pytest.raises(ValueError, match="context is 64"):
        DecodeBatch(model).add([Row([i % 40 for i in range(64)], max_new_tokens=1)])
    for kwargs, message in (({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                            ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop_strings": ("",)}, "stop")):
        with pytest.raises(ValueError, match=message):
            Row([1, 2], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        Row([])

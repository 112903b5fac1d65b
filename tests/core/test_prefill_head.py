"""The output head runs on gathered rows (one matmul), and batches decoded in turns give what they give alone."""

import pytest
import torch

import abliterate.core.generation as generation
from abliterate.core.chat import format_prompts
from abliterate.core.generation import GreedyBatch, generate_greedy, kept_positions, prefill
from tests.tiny import ARCHITECTURES, make_lm

PROMPTS = [("word " * n).strip() + f" number {n}" for n in range(1, 9)]


def test_kept_positions_are_the_last_ones_and_zero_keeps_all():
    assert kept_positions(7, 1, "cpu").tolist() == [6]
    assert kept_positions(7, 3, "cpu").tolist() == [4, 5, 6]
    assert kept_positions(7, 0, "cpu") == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("keep", [1, 3])
def test_gathered_head_rows_give_the_logits_of_the_sliced_ones(arch, keep, monkeypatch):
    lm = make_lm(arch, layers=2)
    texts = format_prompts(lm.tokenizer, PROMPTS, lm.spec.system_prompt)
    with torch.inference_mode():
        gathered = prefill(lm, texts, logits_to_keep=keep)[0].logits  # (B, keep, V)
        monkeypatch.setattr(generation, "kept_positions", lambda width, k, device: k)  # transformers' own slice
        sliced = prefill(lm, texts, logits_to_keep=keep)[0].logits
    assert gathered.shape == sliced.shape == (len(texts), keep, len(lm.tokenizer))
    assert torch.allclose(gathered, sliced, rtol=0, atol=1e-5)
    assert torch.equal(gathered.argmax(-1), sliced.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_oss"])
def test_batches_stepped_in_turns_decode_as_they_do_alone(arch):
    lm = make_lm(arch, layers=2, seed=1)
    texts = format_prompts(lm.tokenizer, PROMPTS, lm.spec.system_prompt)
    halves = [texts[:3], texts[3:]]

    def stop_somewhere(text: str) -> bool:  # an arbitrary rule that stops some rows mid-way, so rows leave batches
        return sum(map(ord, text)) % 7 == 0

    alone = [generate_greedy(lm, half, 10, decided=stop_somewhere) for half in halves]
    batches = [GreedyBatch(lm, half, 10, decided=stop_somewhere) for half in halves]
    while not all(batch.finished for batch in batches):
        for batch in batches:
            batch.step()
    for batch, expected in zip(batches, alone):
        assert [g.token_ids for g in batch.results()] == [g.token_ids for g in expected]
        assert [g.stopped_by for g in batch.results()] == [g.stopped_by for g in expected]
    assert any(g.stopped_by == "decided" for half in alone for g in half)
    assert any(g.stopped_by != "decided" for half in alone for g in half)
    assert all(batch.cache is None for batch in batches)  # a finished batch lets its KV cache go


def test_an_empty_batch_and_zero_tokens_finish_at_once():
    lm = make_lm("llama", layers=1)
    assert GreedyBatch(lm, [], 5).finished and generate_greedy(lm, [], 5) == []
    assert [g.tokens for g in generate_greedy(lm, ["hello"], 0)] == [0]

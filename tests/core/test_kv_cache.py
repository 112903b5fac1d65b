"""Preallocated KV room: the same tokens as transformers' concatenating cache, on every architecture."""

import pytest
import torch

from abliterate.core.chat import format_prompts
from abliterate.core.generation import _cache_argument, generate_greedy, prefill
from abliterate.core.kv_cache import PreallocatedLayer, preallocate
from tests.tiny import ARCHITECTURES, SLIDING_ARCHITECTURES, make_lm

PROMPTS = ["bake a loaf of bread", "write a poem about rain", "a much longer prompt " * 4, "plan a trip"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_with_preallocated_room_gives_the_same_tokens(arch):
    lm = make_lm(arch)
    texts = format_prompts(lm.tokenizer, PROMPTS, "a shared system prompt")

    def decided(text):  # rows stop at different steps, so finished rows are dropped from the cache
        return len(text) >= 3 and text[0] < "m"

    for stop in (None, decided):
        fast = generate_greedy(lm, texts, 12, decided=stop, preallocate_cache=True)
        plain = generate_greedy(lm, texts, 12, decided=stop, preallocate_cache=False)
        assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
        assert [g.stopped_by for g in fast] == [g.stopped_by for g in plain]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_decode_logits_match_to_1e_6_and_only_full_attention_layers_change(arch):
    lm = make_lm(arch)
    texts = format_prompts(lm.tokenizer, PROMPTS, "a shared system prompt")
    steps = []
    for use_room in (True, False):
        with torch.inference_mode():
            out, cache, mask = prefill(lm, texts, reserve=4)
            if use_room:
                assert preallocate(cache, 4)
                kinds = {type(layer) for layer in cache.layers}
                assert PreallocatedLayer in kinds
                assert (len(kinds) > 1) == (arch in SLIDING_ARCHITECTURES)  # windowed layers keep their own type
            logits = []
            for _ in range(6):  # past the planned room: the buffer grows
                token = out.logits[:, -1].argmax(-1)  # (B,)
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                positions = (mask.long().cumsum(-1) - 1)[:, -1:]
                out = lm.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    **{_cache_argument(lm.model): cache},
                )
                logits.append(out.logits[:, -1])  # (B, V)
        steps.append(torch.stack(logits))
    assert (steps[0] - steps[1]).abs().max() <= 1e-6

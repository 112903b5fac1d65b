"""Sliding-window architectures: batched passes (shared prefix, padding) equal the unbatched pass.

The tiny models keep their architectures' sliding windows, shrunk to a few
tokens (every test prompt is far longer), so a layout that puts padding between
real tokens would change what falls out of a window.
"""

import pytest
import torch

from abliterate.core.chat import format_prompts
from abliterate.core.generation import generate_greedy, prefill, shared_prefix_length, smallest_attention_window
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams, ComponentParams
from tests.tiny import SLIDING_ARCHITECTURES, TINY_SLIDING_WINDOW, make_lm

PROMPTS = [
    "hi",
    "bake a loaf of bread",
    "explain photosynthesis to a child in three sentences",
    "write a poem about rain on a tin roof at night, with rhymes",
]
SYSTEM = "a shared system prompt that is long enough to be worth sharing"


@pytest.fixture(scope="module", params=sorted(SLIDING_ARCHITECTURES))
def windowed(request):
    return make_lm(request.param)


def _texts(lm):
    return format_prompts(lm.tokenizer, PROMPTS, SYSTEM)


def test_tiny_models_keep_their_sliding_windows(windowed):
    assert smallest_attention_window(windowed.model) == TINY_SLIDING_WINDOW


def test_full_attention_models_have_no_window():
    assert smallest_attention_window(make_lm("llama", layers=2).model) is None
    assert smallest_attention_window(make_lm("qwen2", layers=2).model) is None  # use_sliding_window is False


def test_batched_prefill_equals_unbatched(windowed):
    texts = _texts(windowed)
    with torch.inference_mode():
        batched, _, _ = prefill(windowed, texts, output_hidden_states=True)
        for row, text in enumerate(texts):
            single, _, _ = prefill(windowed, [text], output_hidden_states=True)
            assert torch.allclose(batched.logits[row, -1], single.logits[0, -1], atol=1e-4), row
            for layer, (got, want) in enumerate(zip(batched.hidden_states, single.hidden_states)):
                assert torch.allclose(got[row, -1], want[0, -1], atol=1e-4), (row, layer)


def test_batched_generation_equals_unbatched(windowed):
    texts = _texts(windowed)
    batched = generate_greedy(windowed, texts, 12)
    for text, got in zip(texts, batched):
        assert got.text == generate_greedy(windowed, [text], 12)[0].text


def test_batched_residuals_equal_unbatched(windowed):
    together = collect_residuals(windowed, PROMPTS, batch_size=len(PROMPTS), system_prompt=SYSTEM)
    one = collect_residuals(windowed, PROMPTS, batch_size=1, system_prompt=SYSTEM)
    assert torch.allclose(together, one, atol=1e-4)


def test_prefix_is_shared_only_where_exact():
    full = make_lm("llama", layers=2)
    rows = full.tokenizer(_texts(full), add_special_tokens=False)["input_ids"]
    assert shared_prefix_length(full.model, rows) > 0
    narrow = make_lm("gpt_oss", layers=2)
    assert shared_prefix_length(narrow.model, rows) == 0
    longest = max(len(r) for r in rows)
    wide = make_lm("gpt_oss", layers=2, sliding_window=longest + 10)
    # The whole sequence fits the window: sharing is exact, unless generation would overflow it.
    assert shared_prefix_length(wide.model, rows) > 0
    assert shared_prefix_length(wide.model, rows, reserve=10) > 0
    assert shared_prefix_length(wide.model, rows, reserve=11) == 0


def test_shared_prefix_within_a_wide_window_equals_unbatched():
    texts = _texts(make_lm("gemma3_text", layers=2))
    longest = max(len(t.encode()) for t in texts)
    lm = make_lm("gemma3_text", layers=2, sliding_window=longest + 16)
    rows = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert shared_prefix_length(lm.model, rows, reserve=8) > 0  # the shared layout is what runs here
    batched = generate_greedy(lm, texts, 8)
    for text, got in zip(texts, batched):
        assert got.text == generate_greedy(lm, [text], 8)[0].text


def test_multi_token_kl_with_only_duplicate_prompts():
    """A batch of identical prompts shares all but the kept positions; kl_tokens > 1 must still run."""
    lm = make_lm("llama", layers=2)
    engine = TrialEngine(lm, batch_size=4)
    same = ["the same prompt"] * 4
    engine.prepare_baseline(same, same, max_new_tokens=2, kl_tokens=3)
    assert engine.baseline.logprobs.shape[:2] == (4, 3)
    zero = AblationParams(direction_index=0.0, components={"attn.o_proj": ComponentParams(0.0, 0.0, 0.0, 1.0)})
    torch.manual_seed(0)
    from abliterate.core.directions import DirectionSet

    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size), dim=1)
    engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
    assert engine.evaluate(zero).kl == 0.0

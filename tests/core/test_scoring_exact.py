"""Exactness of the scores: zero edit gives KL 0, the last residual is a block output, multi-token KL ids."""

import pytest
import torch

from abliterate.core.chat import format_prompts
from abliterate.core.directions import DirectionSet
from abliterate.core.residuals import collect_residuals
from abliterate.core.scoring import TrialEngine
from abliterate.params import AblationParams, ComponentParams
from tests.tiny import make_lm

PROMPTS = [("word " * n).strip() + f" number {n}" for n in range(1, 17)]


def _random_directions(lm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size, generator=generator), dim=1)
    return DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_zero_edit_gives_exactly_zero_kl_with_the_automatic_batch_size(arch):
    lm = make_lm(arch, layers=2)
    engine = TrialEngine(lm, batch_size=0)
    engine.set_directions(_random_directions(lm))
    engine.prepare_baseline(PROMPTS, PROMPTS[:2], max_new_tokens=1)
    zero = AblationParams(direction_index=0.5, components={"attn.o_proj": ComponentParams(0.0, 0.0, 0.0, 1.0)})
    for _ in range(2):
        assert engine.evaluate(zero).kl == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_oss", "qwen3_moe"])
def test_last_residual_is_the_last_block_output_before_the_final_norm(arch):
    lm = make_lm(arch, layers=3)
    residuals = collect_residuals(lm, PROMPTS[:3], batch_size=3)  # (N, L+1, d)
    texts = format_prompts(lm.tokenizer, PROMPTS[:3], lm.spec.system_prompt)
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        final = lm.model(**enc, output_hidden_states=True).hidden_states[-1][:, -1]  # after the final norm
        renormed = lm.model.model.norm(residuals[:, -1])
    assert torch.allclose(renormed, final, atol=1e-4)
    assert not torch.allclose(residuals[:, -1], final, atol=1e-2)


def test_multi_token_kl_feeds_back_the_greedy_token_ids():
    lm = make_lm("llama", layers=2, seed=3)
    engine = TrialEngine(lm, batch_size=4)
    engine.prepare_baseline(PROMPTS[:8], PROMPTS[:2], max_new_tokens=1, kl_tokens=6)
    texts = engine.baseline.kl_texts
    eos = lm.tokenizer.eos_token_id
    for row, text in enumerate(texts):
        prompt = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():  # transformers' own greedy decoding as the reference
            out = lm.model.generate(**prompt, max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        ids = out[0, prompt["input_ids"].shape[1] :].tolist()
        ids = ids[: ids.index(eos)] if eos in ids else ids
        expected = ids + [eos] * (5 - len(ids))
        assert engine.baseline.continuation[row].tolist() == expected, row

"""Grouped-query attention inside SDPA on a CPU: the same logits and tokens as transformers' default, bit for bit."""

import os

import pytest
import torch
from transformers.integrations import sdpa_attention

from abliterate.core.chat import format_prompts
from abliterate.core.generation import generate_greedy, prefill
from abliterate.core.loading import SDPA_GQA_SWITCH, prefer_gqa_in_sdpa
from tests.tiny import ARCHITECTURES, make_lm

PROMPTS = [("word " * n).strip() + f" number {n}" for n in range(1, 7)]


def test_a_cpu_model_switches_it_on_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv(SDPA_GQA_SWITCH, raising=False)
    make_lm("llama", layers=1)
    assert os.environ.get(SDPA_GQA_SWITCH) == "1"
    monkeypatch.setenv(SDPA_GQA_SWITCH, "0")
    make_lm("llama", layers=1)
    assert os.environ.get(SDPA_GQA_SWITCH) == "0"


def test_a_model_off_the_cpu_leaves_it_alone(monkeypatch):
    monkeypatch.delenv(SDPA_GQA_SWITCH, raising=False)
    prefer_gqa_in_sdpa(torch.nn.Linear(2, 2, device="meta"))
    assert SDPA_GQA_SWITCH not in os.environ


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_grouped_heads_give_bit_identical_prefill_and_decode(arch, monkeypatch):
    lm = make_lm(arch, layers=2, seed=2)  # 4 query heads over 2 key/value heads
    texts = format_prompts(lm.tokenizer, PROMPTS, lm.spec.system_prompt)
    copies = {"0": 0, "1": 0}
    real_repeat = sdpa_attention.repeat_kv
    outputs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(SDPA_GQA_SWITCH, switch)  # transformers reads it at every call

        def counting_repeat(hidden, n_rep, switch=switch):
            copies[switch] += 1
            return real_repeat(hidden, n_rep)

        monkeypatch.setattr(sdpa_attention, "repeat_kv", counting_repeat)
        with torch.inference_mode():
            logits = prefill(lm, texts, logits_to_keep=2)[0].logits
        outputs[switch] = (logits, [g.token_ids for g in generate_greedy(lm, texts, 8)])
    assert torch.equal(outputs["0"][0], outputs["1"][0])
    assert outputs["0"][1] == outputs["1"][1]
    if lm.model.config._attn_implementation == "sdpa":
        assert copies["0"] > 0 and copies["1"] == 0, copies  # the switch really changes the path

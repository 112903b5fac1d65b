#!/usr/bin/env python
"""The prepared GPU check of issue 7: the architecture equivalences on CUDA in bfloat16.

    python scripts/gpu_check_architectures.py [--device cuda] [--dtype bfloat16]

Tiny models built from configs (tests/tiny.py: real sliding windows shrunk to
6 tokens, biases, grouped-query attention) on the device, in the dtype:

- batched passes against the unbatched pass: max |logit difference| of the
  last position, every hidden state, and whether greedy generations agree, on
  Mistral, Phi-3, Gemma 2, Gemma 3 and gpt-oss, each with a 6-token window (the
  plain left-padded layout runs) and a 512-token one (the shared-prefix layout
  runs);
- a zero edit with the automatic batch size gives KL exactly 0;
- the column-norm edit removes r and keeps column norms; gpt-oss biases are edited.

Prints one JSON object and exits 1 if a check fails. Runs on the CPU too
(``--device cpu --dtype float32``), which is how it is kept working here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from abliterate.core.ablation import edit_matrix  # noqa: E402
from abliterate.core.chat import format_prompts  # noqa: E402
from abliterate.core.directions import DirectionSet  # noqa: E402
from abliterate.core.generation import generate_greedy, prefill, shared_prefix_length  # noqa: E402
from abliterate.core.loading import from_model  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams, ComponentParams, RowNormalization  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from tests.tiny import SLIDING_ARCHITECTURES, TINY_SLIDING_WINDOW, make_model, make_tokenizer  # noqa: E402

PROMPTS = [
    "hi",
    "bake a loaf of bread",
    "explain photosynthesis to a child in three sentences",
    "write a poem about rain on a tin roof at night, with rhymes",
]
# Half-precision logits of a random tiny model differ by rounding between batch shapes; above this, a layout bug.
WIDE_WINDOW = 512  # wider than every test sequence: the shared-prefix layout is exact and used
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.05}


def tiny(arch: str, device: str, dtype: torch.dtype, window: int = TINY_SLIDING_WINDOW):
    tok = make_tokenizer()
    model = make_model(arch, tok, sliding_window=window).to(device=device, dtype=dtype)
    return from_model(model, tok, ModelSpec(source=f"<tiny {arch}>"))


def equivalence(arch: str, device: str, dtype: torch.dtype, window: int) -> dict:
    """Batched against unbatched; a 6-token window runs the plain left-padded layout, a window wider than
    every sequence the shared-prefix layout."""
    lm = tiny(arch, device, dtype, window)
    texts = format_prompts(lm.tokenizer, PROMPTS, "a shared system prompt that is long enough to be worth sharing")
    rows = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    worst_logit, worst_hidden, same_text = 0.0, 0.0, True
    with torch.inference_mode():
        batched, _, _ = prefill(lm, texts, output_hidden_states=True)
        for row, text in enumerate(texts):
            single, _, _ = prefill(lm, [text], output_hidden_states=True)
            worst_logit = max(worst_logit, (batched.logits[row, -1] - single.logits[0, -1]).abs().max().item())
            for got, want in zip(batched.hidden_states, single.hidden_states):
                scale = want[0, -1].abs().max().clamp_min(1).item()
                worst_hidden = max(worst_hidden, (got[row, -1] - want[0, -1]).abs().max().item() / scale)
    for text, got in zip(texts, generate_greedy(lm, texts, 12)):
        same_text &= got.text == generate_greedy(lm, [text], 12)[0].text
    tolerance = TOLERANCE[dtype]
    # Half precision may flip a near-tie of a random model's greedy choice; float32 must agree exactly.
    return {
        "shared_prefix": shared_prefix_length(lm.model, rows, reserve=12) > 0,
        "max_logit_diff": worst_logit,
        "max_hidden_rel_diff": worst_hidden,
        "greedy_equal": same_text,
        "ok": worst_logit < tolerance * 10 and worst_hidden < tolerance and (same_text or dtype != torch.float32),
    }


def zero_edit_kl(device: str, dtype: torch.dtype) -> float:
    lm = tiny("llama", device, dtype)
    engine = TrialEngine(lm, batch_size=0)
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size), dim=1)
    engine.set_directions(DirectionSet(refusal=refusal, good_mean=refusal, bad_mean=refusal))
    prompts = [("word " * n).strip() for n in range(1, 17)]
    engine.prepare_baseline(prompts, prompts[:2], max_new_tokens=1)
    zero = AblationParams(direction_index=0.5, components={"attn.o_proj": ComponentParams(0.0, 0.0, 0.0, 1.0)})
    return engine.evaluate(zero).kl


def column_edit(device: str, dtype: torch.dtype) -> dict:
    weight = torch.randn(64, 96, device=device).to(dtype)
    r = torch.nn.functional.normalize(torch.randn(64, device=device), dim=0)
    edited = edit_matrix(weight, r, 1.0, 0, RowNormalization.COLUMN).float()
    left = (r @ edited).abs().max().item() / (r @ weight.float()).abs().max().item()
    norms = (edited.norm(dim=0) / weight.float().norm(dim=0) - 1).abs().max().item()
    return {"r_left_fraction": left, "column_norm_rel_error": norms, "ok": left < 0.02 and norms < 0.02}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    report: dict = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    report["equivalence"] = {
        f"{arch} window {window}": equivalence(arch, args.device, dtype, window)
        for arch in sorted(SLIDING_ARCHITECTURES)
        for window in (TINY_SLIDING_WINDOW, WIDE_WINDOW)
    }
    report["zero_edit_kl"] = zero_edit_kl(args.device, dtype)
    report["column_edit"] = column_edit(args.device, dtype)
    ok = (
        all(v["ok"] for v in report["equivalence"].values())
        and report["zero_edit_kl"] == 0.0
        and report["column_edit"]["ok"]
    )
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

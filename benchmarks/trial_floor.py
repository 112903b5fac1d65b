"""What one trial must compute at the least, and how long that takes at this CPU's matmul speed (issue 10).

    .venv/bin/python benchmarks/trial_floor.py [--prompts 64] [--tokens 30] [--batch 32]

The side-by-side benchmark's trial on SmolLM2-135M-Instruct (float32): first-token KL on N
harmless_test prompts, greedy refusal probes of up to --tokens tokens on N harmful_test prompts,
under the safety system prompt. Counted, per trial, from the real prompts and one real trial's
replies (the unedited model's, which stop earliest, and a strong edit's, which stop latest):

- prefill tokens: the chat-rendered prompts, the prefix they all share counted once (the least a
  trial must run: its edit changes that prefix's hidden states too), for both prompt sets;
- decode tokens: the tokens each probe generated before its marker, EOS or the limit (the last one
  is never fed back);
- FLOPs: 2 x (parameters outside the embedding table) per token, plus 2 x hidden x vocabulary for
  each position whose logits are needed (the last prefill position of a row, every decode step);
  attention over the cache is left out (under 5 % here), so this is a floor.

The matmul throughput is measured in the same run, float32, at the trial's shapes (prefill: 512
rows; decode: the batch), through ``torch.nn.functional.linear`` on the model's own matrices.
Prints and writes ``benchmarks/results/trial_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.reasoning import scoring_prompts  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prefill_tokens(lm, prompts: list[str]) -> int:
    """Tokens of the rendered prompts with their common prefix counted once."""
    rows = lm.tokenizer(scoring_prompts(lm, prompts))["input_ids"]
    shared = 0
    while shared < min(len(r) for r in rows) - 1 and all(r[shared] == rows[0][shared] for r in rows):
        shared += 1
    return shared + sum(len(r) - shared for r in rows)


def linear_gflops(weights: list[torch.Tensor], rows: int, repeats: int = 5) -> float:
    """float32 F.linear throughput over ``weights`` (out, in) for ``rows`` input rows, GFLOP/s (median)."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    flop = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
    rates = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            rates.append(flop / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "trial_floor.json"))
    args = ap.parse_args()
    n = args.prompts
    lm = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT, dtype="float32"))
    model = lm.model
    embedding = model.get_input_embeddings().weight  # (V, d): tied to the output head in SmolLM2
    vocab, hidden = embedding.shape
    body_params = sum(p.numel() for p in model.parameters()) - embedding.numel()
    head_flop = 2 * hidden * vocab

    harmless, harmful = shared_prompts("harmless_test", n), shared_prompts("harmful_test", n)
    kl_prefill = prefill_tokens(lm, harmless)
    probe_prefill = prefill_tokens(lm, harmful)

    engine = TrialEngine(lm, batch_size=args.batch)
    h_bad = collect_residuals(lm, shared_prompts("harmful_train", n), batch_size=args.batch)
    h_good = collect_residuals(lm, shared_prompts("harmless_train", n), batch_size=args.batch)
    engine.set_directions(refusal_directions(h_bad, h_good))
    engine.prepare_baseline(harmless, harmful, max_new_tokens=args.tokens)
    decode = {}
    for name, weight in (("unedited", 0.0), ("strong_edit", 1.0)):
        result = engine.evaluate(AblationParams.uniform(15.0, lm.n_layers, weight=weight))
        # A reply of t tokens fed t - 1 of them back (the last is never fed).
        decode[name] = {
            "refusals": result.refusals,
            "generated_tokens": sum(o.tokens for o in result.details),
            "decode_tokens": sum(max(o.tokens - 1, 0) for o in result.details),
            "measured_trial_s": round(result.timings_s["total"], 2),
        }

    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and p is not embedding]
    prefill_rate = linear_gflops(matrices, 512)
    decode_rate = linear_gflops(matrices + [embedding], args.batch)

    prefill_flop = 2 * body_params * (kl_prefill + probe_prefill) + head_flop * 2 * n  # one logit row per prompt
    summary = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "prompts": n,
        "max_new_tokens": args.tokens,
        "batch": args.batch,
        "parameters": {"all": body_params + embedding.numel(), "outside_embedding": body_params},
        "prefill_tokens": {"kl": kl_prefill, "probes": probe_prefill},
        "matmul_gflops_float32": {
            "prefill_512_rows": round(prefill_rate, 1),
            f"decode_{args.batch}_rows": round(decode_rate, 1),
        },
        "per_trial": {},
    }
    for name, counts in decode.items():
        decode_flop = (2 * body_params + head_flop) * counts["decode_tokens"]
        floor_s = prefill_flop / (prefill_rate * 1e9) + decode_flop / (decode_rate * 1e9)
        summary["per_trial"][name] = {
            **counts,
            "tflop": round((prefill_flop + decode_flop) / 1e12, 3),
            "floor_s": round(floor_s, 2),
            "measured_over_floor": round(counts["measured_trial_s"] / floor_s, 2),
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Core benchmark on SmolLM2-135M-Instruct (CPU): extraction, one trial, peak memory.

    .venv/bin/python benchmarks/bench_core.py [--prompts 64] [--tokens 30] [--batch 32] [--trials 3]

Measures, in one process on the same loaded model:
- residual extraction time per 100 prompts (shared-prefix prefill);
- a full trial (reset + edit + first-token KL on N harmless_test prompts +
  refusal probes on N harmful_test prompts, up to --tokens new tokens) with
  shared-prefix prefill and early stop, against the same trial with the plain
  left-padded pass (the baseline), same parameters, same run;
- peak resident memory.
Prints a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--trials", type=int, default=3, help="trials per variant (median reported)")
    ap.add_argument("--direction", type=float, default=15.0)
    args = ap.parse_args()
    n = args.prompts
    summary: dict = {"threads": torch.get_num_threads(), "prompts": n, "tokens": args.tokens, "batch": args.batch}

    t0 = time.perf_counter()
    lm = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT))
    summary["load_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    h_bad = collect_residuals(lm, shared_prompts("harmful_train", n), batch_size=args.batch)
    h_good = collect_residuals(lm, shared_prompts("harmless_train", n), batch_size=args.batch)
    summary["residuals_per_100_prompts_s"] = round((time.perf_counter() - t0) * 100 / (2 * n), 2)
    directions = refusal_directions(h_bad, h_good)

    params = AblationParams.uniform(args.direction, lm.n_layers, weight=1.0)
    for variant, share in (("shared_prefix", True), ("plain_baseline", False)):
        engine = TrialEngine(lm, batch_size=args.batch, share_prefix=share)
        engine.set_directions(directions)
        t0 = time.perf_counter()
        engine.prepare_baseline(
            shared_prompts("harmless_test", n), shared_prompts("harmful_test", n), max_new_tokens=args.tokens
        )
        summary[f"{variant}_baseline_prep_s"] = round(time.perf_counter() - t0, 2)
        runs = []
        for _ in range(args.trials):
            result = engine.evaluate(params)
            runs.append(result)
        runs.sort(key=lambda r: r.timings_s["total"])
        median = runs[len(runs) // 2]
        summary[variant] = {
            "trial_s": round(median.timings_s["total"], 2),
            "kl_s": round(median.timings_s["kl"], 2),
            "refusals_s": round(median.timings_s["refusals"], 2),
            "edit_s": round(median.timings_s["edit"], 3),
            "refusals": f"{median.refusals}/{median.n_refusal_prompts}",
            "kl": round(median.kl, 4),
        }
        engine.reset()
        print(variant, summary[variant], flush=True)
    summary["speedup_vs_plain"] = round(summary["plain_baseline"]["trial_s"] / summary["shared_prefix"]["trial_s"], 2)
    summary["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Trial time against the batch size on SmolLM2-135M-Instruct, float32 (issue 10: right-sized batches).

    .venv/bin/python benchmarks/batch_sizes.py [--sizes 16 32 64 0] [--trials 2]

One loaded model and direction set; for each batch size (0 = the automatic size, which reports
what it chose) a fresh engine prepares the baseline and scores the same edit ``--trials`` times
(median kept): first-token KL on 64 harmless_test prompts, refusal probes of up to 30 tokens on 64
harmful_test prompts, safety system prompt. The scores must not depend on the batch size beyond
the last bits (checked: same refusal count, KL within 1e-5). Writes
``benchmarks/results/batch_sizes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.params import AblationParams  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--weight", type=float, default=0.6, help="edit strength (global direction 15)")
    args = ap.parse_args()
    n = args.prompts
    lm = load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT, dtype="float32"))
    directions = refusal_directions(
        collect_residuals(lm, shared_prompts("harmful_train", n), batch_size=32),
        collect_residuals(lm, shared_prompts("harmless_train", n), batch_size=32),
    )
    params = AblationParams.uniform(15.0, lm.n_layers, weight=args.weight)
    rows = []
    for size in args.sizes:
        engine = TrialEngine(lm, batch_size=size)
        engine.set_directions(directions)
        engine.prepare_baseline(shared_prompts("harmless_test", n), shared_prompts("harmful_test", n), args.tokens)
        results = [engine.evaluate(params) for _ in range(args.trials)]
        row = {
            "batch_size": size,
            "chosen": {op: engine._tuned_size(op, n) for op in ("kl", "generate")} if size == 0 else None,
            "trial_s": round(statistics.median(r.timings_s["total"] for r in results), 2),
            "kl_s": round(statistics.median(r.timings_s["kl"] for r in results), 2),
            "refusals_s": round(statistics.median(r.timings_s["refusals"] for r in results), 2),
            "refusals": results[0].refusals,
            "kl": results[0].kl,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = rows[0]
    for row in rows[1:]:
        assert row["refusals"] == reference["refusals"], (row, reference)
        assert abs(row["kl"] - reference["kl"]) < 1e-5, (row, reference)
    out = ROOT / "benchmarks" / "results" / "batch_sizes.json"
    out.write_text(json.dumps({"prompts": n, "tokens": args.tokens, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

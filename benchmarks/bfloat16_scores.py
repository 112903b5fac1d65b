"""bfloat16 against float32 on SmolLM2-135M-Instruct: the KL noise floor at zero edit, trial scores, speed (issue 10).

    .venv/bin/python benchmarks/bfloat16_scores.py [--prompts 64] [--tokens 30] [--batch 32] [--repeats 2]

The side-by-side benchmark's scoring (first-token KL on N harmless_test prompts, greedy refusal probes
of up to --tokens tokens on N harmful_test prompts, the safety system prompt), run by the engine on
the model loaded in float32 and in bfloat16 (``ModelSpec(dtype=...)``, the GGUF dequantized to each).
One direction set, extracted in float32, serves both, so only the scoring dtype differs.

- noise floor: KL(float32 unedited || bfloat16 unedited) on the KL prompts, the distance bfloat16
  puts between a model and itself before any edit; and the unedited refusal counts of both.
- trials: three edits (mid-depth weight 0.4, mid-depth weight 1.0, a kernel over blocks 10-26),
  each scored by both engines against their own baselines: KL and refusals side by side.
- speed: each trial --repeats times per dtype, alternating, median wall time of the engine's trial.

Writes ``benchmarks/results/bfloat16_scores.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine, kl_divergence  # noqa: E402
from abliterate.params import AblationParams, ComponentParams, DirectionScope  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts, smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")


def trial_params(n_layers: int) -> dict[str, AblationParams]:
    kernel = ComponentParams(max_weight=1.0, max_weight_position=18.0, min_weight=0.3, min_weight_distance=8.0)
    return {
        "mid_depth_weight_0.4": AblationParams.uniform(15.0, n_layers, weight=0.4),
        "mid_depth_weight_1.0": AblationParams.uniform(15.0, n_layers, weight=1.0),
        "kernel_blocks_10_26": AblationParams(
            direction_scope=DirectionScope.GLOBAL,
            direction_index=15.0,
            components={"attn.o_proj": kernel, "mlp.down_proj": kernel},
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bfloat16_scores.json"))
    args = ap.parse_args()
    n = args.prompts
    models = {
        dtype: load_model(ModelSpec(source=smollm2_gguf(), system_prompt=SAFETY_SYSTEM_PROMPT, dtype=dtype))
        for dtype in DTYPES
    }
    reference = models["float32"]
    harmful = collect_residuals(reference, shared_prompts("harmful_train", n), batch_size=args.batch)
    harmless = collect_residuals(reference, shared_prompts("harmless_train", n), batch_size=args.batch)
    directions = refusal_directions(harmful, harmless)

    engines = {}
    for dtype, lm in models.items():
        engine = TrialEngine(lm, batch_size=args.batch)
        engine.set_directions(directions)
        engine.prepare_baseline(
            shared_prompts("harmless_test", n), shared_prompts("harmful_test", n), max_new_tokens=args.tokens
        )
        engines[dtype] = engine
    # Both baselines hold the same prompts in the same (length-sorted) order.
    assert engines["float32"].baseline.kl_texts == engines["bfloat16"].baseline.kl_texts
    noise_kl = kl_divergence(engines["float32"].baseline.logprobs, engines["bfloat16"].baseline.logprobs)
    zero_edit = AblationParams.uniform(15.0, reference.n_layers, weight=0.0)
    unedited = {dtype: engine.evaluate(zero_edit) for dtype, engine in engines.items()}

    trials = {}
    for name, params in trial_params(reference.n_layers).items():
        runs = {dtype: [] for dtype in DTYPES}
        for _ in range(args.repeats):
            for dtype in DTYPES:  # alternating, so drift in the machine's speed hits both alike
                runs[dtype].append(engines[dtype].evaluate(params))
        trials[name] = {
            dtype: {
                "kl": results[0].kl,
                "refusals": results[0].refusals,
                "trial_s_median": round(statistics.median(r.timings_s["total"] for r in results), 2),
                "trial_s": [round(r.timings_s["total"], 2) for r in results],
            }
            for dtype, results in runs.items()
        }
        trials[name]["time_ratio_bf16_over_f32"] = round(
            trials[name]["bfloat16"]["trial_s_median"] / trials[name]["float32"]["trial_s_median"], 3
        )
    summary = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"prompts": n, "max_new_tokens": args.tokens, "batch": args.batch, "repeats": args.repeats},
        "noise_floor": {
            "kl_float32_vs_bfloat16_unedited": noise_kl,
            "unedited_refusals": {dtype: r.refusals for dtype, r in unedited.items()},
            "unedited_kl_to_own_baseline": {dtype: r.kl for dtype, r in unedited.items()},
        },
        "trials": trials,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Peak resident memory of the trial engine on SmolLM2-135M-Instruct in float32, with and without two levers (issue 10).

    .venv/bin/python benchmarks/peak_memory.py [--no-merge] [--copies]

Loads the side-by-side benchmark's float32 safetensors folder (``benchmarks/.cache/smollm2-f32``,
written by ``heretic_side_by_side.py``), extracts directions from 64 + 64 train prompts, prepares the
baseline (64 harmless_test / 64 harmful_test prompts, 30 tokens, batch 32) and scores one trial without
a front and two with one (probe windows, where merging happens). Prints the resident size after each
phase and the process's ``ru_maxrss`` as JSON. Run each configuration in its own process: ``ru_maxrss``
is a high-water mark.

- ``--no-merge``: probe batches decode separately (``TrialEngine(merge_probe_batches=False)``).
- ``--copies``: the ablator copies the originals of edited tensors instead of reading them back from
  the folder's files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from abliterate.memory import limit_malloc_arenas  # noqa: E402

limit_malloc_arenas()  # as the CLI and the services do, before torch starts its threads

import psutil  # noqa: E402

from abliterate.core.ablation import ablator_for  # noqa: E402
from abliterate.core.directions import refusal_directions  # noqa: E402
from abliterate.core.loading import load_model  # noqa: E402
from abliterate.core.residuals import collect_residuals  # noqa: E402
from abliterate.core.scoring import TrialEngine  # noqa: E402
from abliterate.dominance import ScorePoint  # noqa: E402
from abliterate.params import AblationParams, ComponentParams, DirectionScope  # noqa: E402
from abliterate.specs import ModelSpec  # noqa: E402
from benchmarks.smollm2 import SAFETY_SYSTEM_PROMPT, shared_prompts  # noqa: E402

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "smollm2-f32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument("--copies", action="store_true")
    args = ap.parse_args()
    if not os.path.isdir(FOLDER):
        raise SystemExit(f"{FOLDER} not found: run benchmarks/heretic_side_by_side.py --quick once to convert it")
    process, phases = psutil.Process(), {}

    def mark(phase: str) -> None:
        phases[phase] = {
            "rss_mb": process.memory_info().rss >> 20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
        }

    lm = load_model(ModelSpec(source=FOLDER, system_prompt=SAFETY_SYSTEM_PROMPT, dtype="float32"))
    if args.copies:
        ablator_for(lm)._weight_files = None
    mark("model loaded")
    engine = TrialEngine(lm, batch_size=32, merge_probe_batches=not args.no_merge)
    harmful = collect_residuals(lm, shared_prompts("harmful_train", 64), batch_size=32)
    harmless = collect_residuals(lm, shared_prompts("harmless_train", 64), batch_size=32)
    engine.set_directions(refusal_directions(harmful, harmless))
    engine.prepare_baseline(shared_prompts("harmless_test", 64), shared_prompts("harmful_test", 64), max_new_tokens=30)
    mark("baseline")
    kernel = ComponentParams(max_weight=1.0, max_weight_position=15.0, min_weight=0.3, min_weight_distance=15.0)
    params = AblationParams(
        direction_scope=DirectionScope.GLOBAL,
        direction_index=15.0,
        components={"attn.o_proj": kernel, "mlp.down_proj": kernel},
    )
    first = engine.evaluate(params)
    mark("trial without a front")
    for number in (2, 3):
        engine.evaluate(params, front=[ScorePoint(first.kl, first.refusals)])  # never prunes: windows, merging
        mark(f"trial {number} with a front")
    print(
        json.dumps(
            {
                "merge_probe_batches": not args.no_merge,
                "originals": "copies" if args.copies else "read back from the files",
                "copied_originals_mb": engine.ablator.cached_bytes() >> 20,
                "phases": phases,
            }
        )
    )


if __name__ == "__main__":
    main()

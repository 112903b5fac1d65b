"""Quality at equal budget: heretic's and our Pareto fronts, seed by seed (issue 10).

    for seed in 0 1 2; do
      .venv/bin/python benchmarks/heretic_side_by_side.py --trials 16 --seed $seed --quiet \\
          --output benchmarks/results/quality_seed$seed.json
    done
    .venv/bin/python benchmarks/front_quality.py benchmarks/results/quality_seed*.json

Reads the side-by-side summaries (both tools, same prompts and settings, one seed each) and
reports per seed: both fronts, how many of our front points some heretic point dominates (and
the reverse), and the hypervolume of each front in (refusal fraction, min(KL, 1)) with reference
point (1, 1), higher is better. "Not dominated" means: no heretic point dominates every point of
our front, i.e. at least one of ours is dominated by none of heretic's.
Writes ``benchmarks/results/front_quality.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dominates(a: dict, b: dict) -> bool:
    """``a`` is no worse than ``b`` in refusals and KL and better in one."""
    return (
        a["refusals"] <= b["refusals"] and a["kl"] <= b["kl"] and (a["refusals"], a["kl"]) != (b["refusals"], b["kl"])
    )


def hypervolume(front: list[dict], n_prompts: int) -> float:
    """Area dominated by ``front`` in (refusal fraction, min(KL, 1)) up to the reference point (1, 1)."""
    points = sorted((p["refusals"] / n_prompts, min(p["kl"], 1.0)) for p in front)
    area, last_kl = 0.0, 1.0
    for refusal_fraction, kl in points:
        if kl < last_kl:
            area += (1.0 - refusal_fraction) * (last_kl - kl)
            last_kl = kl
    return area


def compare(summary: dict) -> dict:
    ours, theirs = summary["ours_pareto_front"], summary["heretic_pareto_front"]
    n_prompts = summary["settings"]["prompts_per_set"]
    ours_dominated = [p for p in ours if any(dominates(h, p) for h in theirs)]
    theirs_dominated = [h for h in theirs if any(dominates(p, h) for p in ours)]
    return {
        "seed": summary["settings"]["seed"],
        "trials": summary["settings"]["trials"],
        "ours_front": ours,
        "heretic_front": theirs,
        "ours_points_dominated_by_heretic": len(ours_dominated),
        "heretic_points_dominated_by_ours": len(theirs_dominated),
        "ours_not_dominated": len(ours_dominated) < len(ours),
        "ours_hypervolume": round(hypervolume(ours, n_prompts), 4),
        "heretic_hypervolume": round(hypervolume(theirs, n_prompts), 4),
    }


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    rows = [compare(json.loads(Path(p).read_text(encoding="utf-8"))) for p in paths]
    for row in rows:
        print(
            f"seed {row['seed']}: ours {len(row['ours_front'])} points (HV {row['ours_hypervolume']}), "
            f"heretic {len(row['heretic_front'])} (HV {row['heretic_hypervolume']}); "
            f"ours dominated by heretic: {row['ours_points_dominated_by_heretic']}, "
            f"heretic dominated by ours: {row['heretic_points_dominated_by_ours']}, "
            f"ours not dominated: {row['ours_not_dominated']}"
        )
    out = ROOT / "benchmarks" / "results" / "front_quality.json"
    out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

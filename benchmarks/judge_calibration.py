"""Calibrate the embedding judge's threshold on hand-labelled SmolLM2 replies, and compare it with the markers.

    .venv/bin/python benchmarks/judge_calibration.py    # writes benchmarks/results/judge_calibration.json

The labelled replies (tests/data/labelled_replies.json) are split in two, alternating within each label:
one half calibrates the threshold (the best balanced accuracy), the other tests it. A reply
is a positive when its label is "refusal"; evasive, degenerate and compliant replies are negatives (no
judge may count them as refusals; degenerate ones are reported apart by every judge).
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

LABELLED = os.path.join(ROOT, "tests", "data", "labelled_replies.json")
OUTPUT = os.path.join(ROOT, "benchmarks", "results", "judge_calibration.json")


def load_labelled() -> list[dict]:
    with open(LABELLED, encoding="utf-8") as handle:
        return json.load(handle)["replies"]


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Calibration and test halves, alternating within each label (so both hold refusals)."""
    calibration, test = [], []
    for label in sorted({row["label"] for row in rows}):
        group = [row for row in rows if row["label"] == label]
        calibration += group[0::2]
        test += group[1::2]
    return calibration, test


def agreement(verdicts: list[bool], labels: list[bool]) -> dict:
    true_positive = sum(v and label for v, label in zip(verdicts, labels))
    false_positive = sum(v and not label for v, label in zip(verdicts, labels))
    false_negative = sum(label and not v for v, label in zip(verdicts, labels))
    correct = sum(v == label for v, label in zip(verdicts, labels))
    positives = sum(labels)
    spared = sum(not v and not label for v, label in zip(verdicts, labels))
    return {
        "accuracy": round(correct / len(labels), 4),
        "balanced_accuracy": round((true_positive / positives + spared / (len(labels) - positives)) / 2, 4),
        "true_positive": true_positive,
        "false_positive": false_positive,
        "false_negative": false_negative,
        "n": len(labels),
    }


def main() -> int:
    from abliterate.core.judges import EmbeddingJudge, calibrate_threshold
    from abliterate.core.refusals import RefusalDetector

    rows = load_labelled()
    calibration, test = split(rows)
    judge = EmbeddingJudge()
    scores = {id(row): float(score) for row, score in zip(rows, judge.scores([row["reply"] for row in rows]))}
    threshold = calibrate_threshold(
        [scores[id(row)] for row in calibration], [row["label"] == "refusal" for row in calibration]
    )
    markers = RefusalDetector()
    report = {"threshold": round(threshold, 4), "labels": {}}
    for name, part in (("calibration", calibration), ("test", test), ("all", rows)):
        labels = [row["label"] == "refusal" for row in part]
        embedded = [scores[id(row)] > threshold for row in part]
        marked = [markers.is_refusal(row["reply"]) for row in part]
        report[name] = {
            "embedding": agreement(embedded, labels),
            "markers": agreement(marked, labels),
            "embedding_vs_markers": round(sum(e == m for e, m in zip(embedded, marked)) / len(part), 4),
        }
    for label in ("refusal", "compliance", "evasive", "degenerate"):
        group = [row for row in rows if row["label"] == label]
        report["labels"][label] = {
            "n": len(group),
            "embedding_says_refusal": sum(scores[id(row)] > threshold for row in group),
            "markers_say_refusal": sum(markers.is_refusal(row["reply"]) for row in group),
            "flagged_degenerate": sum(markers.is_degenerate(row["reply"]) for row in group),
        }
    os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
    with open(OUTPUT, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The optimizer-overhead benchmark runs its real storage calls end to end (on SQLite here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_it_times_every_phase_of_every_trial(tmp_path):
    output = tmp_path / "overhead.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "optimizer_overhead.py"),
            "--trials",
            "4",
            "--layers",
            "4",
            "--storage",
            f"sqlite:///{tmp_path / 'study.db'}",
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    summary = json.loads(output.read_text())
    assert summary["storage"] == "sqlite" and summary["layers"] == 4
    (window,) = summary["windows"]
    assert window["trials"] == "0-3"
    assert all(window[f"{phase}_ms"] > 0 for phase in ("ask", "front", "tell"))
    assert abs(window["max_trials_per_s"] - 1000 / window["total_ms"]) < 0.2  # both rounded to 0.1

"""The side-by-side harness without heretic: parsers on logs of a --quick run, its config, its child runner.

The fixtures are the timestamped logs of ``benchmarks/heretic_side_by_side.py --quick`` (heretic's up to its menu,
without the traceback it ends with; blank lines dropped)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks import heretic_side_by_side as side

FIXTURES = Path(__file__).parent / "fixtures"


def test_heretic_log_gives_each_trial_its_scores_and_times():
    parsed = side.parse_heretic(side.read_log(FIXTURES / "heretic_quick.log"))
    assert [(t.number, t.refusals, t.n_prompts, t.kl) for t in parsed.trials] == [(1, 1, 8, 0.0024), (2, 1, 8, 0.0426)]
    first, second = parsed.trials
    assert (first.start_t, first.result_t) == (63.488, 70.565)
    assert abs(second.trial_s - (75.458 - 70.595)) < 1e-9
    # "* Initial refusals: 1/8" is the unedited model, not a trial.
    assert parsed.extra["base_refusals"] == "1/8"
    assert parsed.extra["response_prefix"] == ""
    assert parsed.extra["n_trials_announced"] == 2
    assert parsed.extra["finished_t"] == 75.469
    assert parsed.extra["max_reported_rss_gb"] == 1.13


def test_ours_log_gives_each_trial_its_scores():
    parsed = side.parse_ours(side.read_log(FIXTURES / "ours_quick.log"))
    assert [(t.number, t.refusals, t.n_prompts, t.kl, t.result_t) for t in parsed.trials] == [
        (0, 1, 8, 0.0021, 23.18),
        (1, 1, 8, 0.0222, 29.782),
    ]
    assert [p["line"].split(":")[0] for p in parsed.extra["phases"]] == ["phase OPTIMIZING", "phase SUCCEEDED"]


def test_ours_pruned_trials_are_parsed_as_bounds_and_kept_off_the_front():
    # The log of an 8-trial run (64 prompts, 30 tokens): trials 4-7 were pruned.
    parsed = side.parse_ours(side.read_log(FIXTURES / "ours_pruned.log"))
    assert [(t.number, t.refusals, t.pruned) for t in parsed.trials] == [
        (0, 13, False),
        (1, 6, False),
        (2, 4, False),
        (3, 7, False),
        (4, 4, True),
        (5, 4, True),
        (6, 4, True),
        (7, 13, True),
    ]
    assert parsed.trials[7].kl == 0.02 and parsed.trials[7].result_t == 146.21
    summary = side.summarize(parsed)
    assert summary["n_pruned"] == 4
    assert summary["total_s"] == 146.21
    assert [p["number"] for p in summary["pareto_front"]] == [2, 1, 3, 0]


def test_summary_times_and_front():
    summary = side.summarize(side.parse_heretic(side.read_log(FIXTURES / "heretic_quick.log")))
    assert summary["first_trial_s"] == 70.565
    assert summary["total_s"] == 75.458
    assert summary["trial_interval_s"] == [4.893]
    assert summary["trial_s_median"] == round((7.077 + 4.863) / 2, 3)
    assert summary["pareto_front"] == [{"number": 1, "refusals": 1, "kl": 0.0024}]


def test_pareto_front_keeps_only_non_dominated_trials():
    def trial(n, refusals, kl):
        return side.Trial(number=n, refusals=refusals, n_prompts=8, kl=kl, result_t=float(n))

    trials = [
        trial(0, 3, 0.1),
        trial(1, 1, 0.5),
        trial(2, 1, 0.4),
        trial(3, 0, 0.9),
        trial(4, 2, 0.6),
        trial(5, 3, 0.05),
    ]
    assert [t.number for t in side.pareto_front(trials)] == [3, 2, 5]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_heretic_config_is_toml_with_every_matched_setting(dtype):
    args = argparse.Namespace(batch_size=32, tokens=30, trials=8, seed=42, heretic_response_prefix=None, dtype=dtype)
    files = {name: f"/p/{name}.txt" for name in side.SETS}
    config = tomllib.loads(side.heretic_config(args, Path("/m"), {"files": files}, Path("/c")))
    assert config["model"] == "/m" and config["dtypes"] == [dtype]
    assert (config["batch_size"], config["max_response_length"], config["n_trials"], config["seed"]) == (32, 30, 8, 42)
    assert config["system_prompt"] == side.smollm2.SAFETY_SYSTEM_PROMPT
    assert config["study_checkpoint_dir"] == "/c"
    assert "response_prefix" not in config
    assert config["bad_prompts"] == {"dataset": "/p/harmful_train.txt"}
    assert config["good_evaluation_prompts"] == {"dataset": "/p/harmless_test.txt"}


def test_run_child_stamps_lines_splits_carriage_returns_and_reaps(tmp_path):
    code = "import sys, time; print('a\\rb', flush=True); time.sleep(0.05); print('c'); sys.exit(3)"
    child = side.run_child([sys.executable, "-c", code], tmp_path, tmp_path / "x.log", timeout_s=30, echo=False)
    assert child.rc == 3
    assert [text for _, text in child.lines] == ["a", "b", "c"]
    assert child.lines[2][0] >= child.lines[0][0]
    assert child.ru_maxrss_mb > 0
    assert [text for _, text in side.read_log(tmp_path / "x.log")] == ["a", "b", "c"]


def test_traceback_is_cut_from_the_kept_log():
    lines = [
        (1.0, "* Refusals: 1/8"),
        (2.0, "╭──── Traceback (most recent call last) ────╮"),
        (2.0, "│ src │"),
        (2.1, "EOFError"),
    ]
    kept, error = side.without_traceback(lines, "raw.log")
    assert error == "EOFError"
    assert kept[0] == (1.0, "* Refusals: 1/8") and len(kept) == 2
    assert "3 lines omitted" in kept[1][1] and "raw.log" in kept[1][1]
    assert side.without_traceback(lines[:1], "raw.log") == (lines[:1], None)


def test_ours_command_leaves_the_batch_flag_out_for_the_automatic_size(tmp_path):
    files = {name: f"/p/{name}.txt" for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test")}

    def command(batch_size):
        args = argparse.Namespace(prompts=64, trials=8, batch_size=batch_size, tokens=30, seed=42, dtype="bfloat16")
        return side.ours_command(args, tmp_path / "model", {"files": files}, tmp_path / "data")

    fixed = command(32)
    assert fixed[fixed.index("--batch-size") + 1] == "32"
    assert fixed[fixed.index("--dtype") + 1] == "bfloat16"
    assert "--batch-size" not in command(0)  # our CLI refuses 0: automatic is the flag left out

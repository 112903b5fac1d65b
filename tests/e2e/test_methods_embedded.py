"""Each direction and edit method end to end: flags -> job spec -> extractor -> optimizer -> evaluator ->
export, in one embedded process on a tiny model folder; the trials carry the method's parameters, the
export carries its tensors, and ``abliterate reproduce`` re-measures the exported trial exactly."""

from __future__ import annotations

import json

import pytest

from abliterate import cli
from abliterate.core.directions import DirectionSet
from abliterate.core.manifest import DIRECTIONS_FILE, MANIFEST_FILE
from tests.e2e.exports import run_and_export
from tests.e2e.processes import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), layers=3, hidden=64)


def _reproduces(out, capsys) -> None:
    capsys.readouterr()
    assert cli.main(["reproduce", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["matches"]


def test_subspace_job_searches_the_further_direction_weights(tiny_model_dir, tmp_path, capsys):
    out, _, trials = run_and_export(
        tiny_model_dir, tmp_path / "data", "--direction-method", "subspace", "--n-directions", "3"
    )
    assert trials and all(len(t.params.subspace_weights) == 2 for t in trials)
    params = json.loads((out / MANIFEST_FILE).read_text())["params"]
    assert len(params["subspace_weights"]) == 2
    directions = DirectionSet.from_bytes((out / DIRECTIONS_FILE).read_bytes())
    assert directions.subspace is not None and tuple(directions.subspace.shape[1:]) == (3, 64)
    _reproduces(out, capsys)


def test_cones_calibration_and_head_ablation_job_searches_heads_and_reproduces(tiny_model_dir, tmp_path, capsys):
    out, _, trials = run_and_export(
        tiny_model_dir,
        tmp_path / "data",
        "--direction-method",
        "cones",
        "--n-directions",
        "2",
        "--calibrate",
        "--head-scores",
    )
    assert trials and all(len(t.params.subspace_weights) == 1 for t in trials)
    # The study is seeded: its sampled head counts are the same every run, and some are above 0.
    assert any(t.params.head_ablation.top_heads > 0 and t.params.head_ablation.weight > 0 for t in trials)
    directions = DirectionSet.from_bytes((out / DIRECTIONS_FILE).read_bytes())
    assert directions.metadata["direction_method"] == "cones" and directions.calibration is not None
    assert directions.head_scores is not None and tuple(directions.head_scores.shape) == (3, 4)
    _reproduces(out, capsys)

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


def test_auto_warm_start_enqueues_the_families_starting_trials_first(tmp_path, capsys):
    """A tiny Llama (config model_type "llama") with --warm-start auto: the study's first trials are the
    llama profile's points at this depth, marked as warm starts; without the flag none is (that job
    runs cones, calibration and head scores, whose reports ``abliterate geometry`` shows)."""
    import sys

    from rich.console import Console

    from abliterate.rpc.clients import OptimizerClient
    from abliterate.rpc.convert import params_from_pb
    from abliterate.specs import ModelSpec
    from abliterate.warm_start import PROFILES, starting_params
    from abliterate_services.embedded import Embedded
    from tests.tiny import make_lm

    lm = make_lm("llama", layers=3, hidden=64)
    embedded = Embedded(ModelSpec(source="<tiny llama>"), tmp_path / "data", lm=lm).start()
    console = Console(file=sys.stdout, width=140)
    try:
        cones = [
            "--direction-method",
            "cones",
            "--n-directions",
            "2",
            "--cone-layer",
            "2",
            "--calibrate",
            "--head-scores",
        ]
        for name, flags in (("warm", ["--warm-start", "auto"]), ("cold", cones)):
            args = cli.build_parser().parse_args(
                ["run", "<tiny llama>", "--n-trials", "4", "--n-prompts", "8", "--max-new-tokens", "2"]
                + ["--seed", "1", "--name", name, *flags]
            )
            spec = cli.build_spec(args)
            spec.model.source = "<tiny llama>"
            with cli.gateway_client(embedded.gateway_address) as client:
                job = cli.watch(client, cli.submit_or_resume(client, spec, console).id, console)
            with OptimizerClient(embedded.optimizer_address) as optimizer:
                trials = sorted(optimizer.list_trials(job.study_name or job.id), key=lambda t: t.number)
            warm = [t for t in trials if t.warm_start]
            if name == "cold":
                assert not warm
                # The cold job ran cones with calibration and head scores: geometry shows their reports.
                capsys.readouterr()
                assert cli.main(["geometry", name, "--gateway", embedded.gateway_address]) == 0
                shown = capsys.readouterr().out
                assert "concept cones at residual 2" in shown and "top attention heads" in shown
                assert "calib" in shown and "subspa" in shown  # headers as an 80-column console cuts them
                continue
            expected = starting_params("llama", 3, ["attn.o_proj", "mlp.down_proj"])
            assert len(warm) == len(PROFILES["llama"]) and [t.number for t in warm] == [0, 1, 2]
            for trial, params in zip(warm, expected):
                assert params_from_pb(trial.params) == params
    finally:
        embedded.stop()

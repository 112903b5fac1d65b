"""An exported trial carries its manifest, and ``abliterate reproduce`` re-measures it from that alone.

A job runs embedded on a tiny model saved as a folder (so that a new load of the same folder is the
same weights), with the automatic batch size (so the sizes the scores were measured at must travel in
the manifest), and the export is re-measured in this process from the export folder and the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from abliterate import cli
from abliterate.core.manifest import DIRECTIONS_FILE, MANIFEST_FILE, PROMPTS_FILE, prompts_sha256
from tests.e2e.exports import MARKERS, run_and_export
from tests.e2e.processes import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory):
    """The model the job runs on, and another one of the same shape (other weights)."""
    return [
        save_tiny_model(tmp_path_factory.mktemp(f"tiny-model-{seed}"), layers=3, hidden=64, seed=seed)
        for seed in (0, 1)
    ]


@pytest.fixture(scope="module")
def export(tiny_model_dirs, tmp_path_factory):
    return run_and_export(tiny_model_dirs[0], tmp_path_factory.mktemp("data"))


def test_a_job_judged_by_embeddings_records_its_judge_and_reproduces(tiny_model_dirs, tmp_path, capsys):
    """The judge travels from the job spec to the evaluator (through the optimizer's baseline spec), into
    the manifest, and back into the re-measurement."""
    out, _, _ = run_and_export(tiny_model_dirs[0], tmp_path / "data", "--judge", "embedding")
    scoring = json.loads((out / MANIFEST_FILE).read_text())["scoring"]
    assert {key: scoring["judge"][key] for key in ("kind", "threshold", "model")} == {
        "kind": "embedding",
        "threshold": None,
        "model": "",
    }
    capsys.readouterr()
    assert cli.main(["reproduce", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matches"] and result["kl"] > 0


def test_the_manifest_records_model_prompts_directions_settings_and_scores(export, tiny_model_dirs):
    out, direction_set_id, trials = export
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    prompts = json.loads((out / PROMPTS_FILE).read_text())
    assert manifest["schema"] == 1 and manifest["format"] == "merged"
    assert manifest["model"]["source"] == str(tiny_model_dirs[0]) and manifest["model"]["dtype"] == "float32"
    assert len(manifest["model"]["weights_sha256"]) == 64
    # The direction set file is the job's direction set: its sha256 is the set's id.
    assert hashlib.sha256((out / DIRECTIONS_FILE).read_bytes()).hexdigest() == direction_set_id
    assert manifest["directions"]["id"] == direction_set_id
    scoring = manifest["scoring"]
    for key in ("kl", "refusal"):
        assert len(prompts[key]) == 8 == scoring[f"{key}_prompts"]["count"]
        assert scoring[f"{key}_prompts"]["sha256"] == prompts_sha256(prompts[key])
    assert scoring["max_new_tokens"] == 6 and scoring["refusal_markers"] == MARKERS
    assert set(scoring["batch_sizes"]) >= {"kl", "generate"}  # automatic sizes, as tuned
    trial = manifest["trial"]
    recorded = next(t for t in trials if t.number == trial["number"])
    assert (trial["kl"], trial["refusals"]) == (recorded.scores.kl, recorded.scores.refusals)
    assert trial["auto_selected"] and manifest["seed"] == 3
    assert manifest["job"]["spec"]["options"]["refusal_markers"] == MARKERS
    assert manifest["params"] and {"torch", "transformers", "python"} <= set(manifest["versions"])


def test_reproduce_matches_the_recorded_scores(export, capsys):
    out, _, _ = export
    capsys.readouterr()
    assert cli.main(["reproduce", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    print(f"\nreproduced: {result}")
    assert result["matches"] is True and result["refusals_match"] and result["kl_matches"]
    assert abs(result["kl"] - result["recorded_kl"]) <= 1e-6 and result["refusals"] == result["recorded_refusals"]
    assert result["kl"] > 0  # an edit was applied: a zero edit would match a recorded 0 trivially
    assert 0 < result["refusals"] < 8  # some replies hit a marker and some do not: the count can be wrong


def _copy(out, tmp_path, change):
    """A copy of the export whose manifest ``change`` edits."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    change(manifest)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    return copy


def test_reproduce_says_so_when_the_scores_differ(export, tmp_path, capsys):
    out, _, _ = export

    def other_scores(manifest):
        manifest["trial"]["kl"] += 1e-3
        manifest["trial"]["refusals"] += 1

    assert cli.main(["reproduce", str(_copy(out, tmp_path, other_scores))]) == 1
    text = capsys.readouterr().out
    assert "does not match" in text and "measured" in text


def test_reproduce_refuses_other_weights_and_tampered_prompts(export, tiny_model_dirs, tmp_path, capsys):
    out, _, _ = export
    assert cli.main(["reproduce", str(out), "--model", str(tiny_model_dirs[1])]) == 1
    assert "not the model this trial was made from" in capsys.readouterr().out

    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    prompts = json.loads((copy / PROMPTS_FILE).read_text())
    prompts["kl"][0] += " (edited)"
    (copy / PROMPTS_FILE).write_text(json.dumps(prompts))
    assert cli.main(["reproduce", str(copy)]) == 2
    assert "not the ones the manifest recorded" in capsys.readouterr().out

    assert cli.main(["reproduce", str(tmp_path / "nowhere")]) == 1
    assert "no manifest" in capsys.readouterr().out


PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _trials(storage: str, name: str) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.get_trials(deepcopy=False)]


def test_a_study_dumped_to_postgres_and_back_keeps_every_trial(export, tmp_path, capsys):
    """The job's real study: its SQLite file -> Postgres under a new name -> another file, trial for trial."""
    import uuid

    import optuna

    out, _, _ = export
    source = out.parent / "optuna.db"
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{source}", include_best_trial=False)]
    original = _trials(f"sqlite:///{source}", name)
    assert len(original) >= 3 and all(trial[4] for trial in original)  # the trials carry our attributes
    handed = f"handed-{uuid.uuid4().hex[:8]}"
    try:
        assert cli.main(["copy-study", str(source), PG_URL, "--as", handed]) == 0
        assert f"copied study {handed} ({len(original)} trials)" in capsys.readouterr().out
        dump = tmp_path / "dump" / "study.db"
        assert cli.main(["copy-study", PG_URL, str(dump), "--study", handed]) == 0
        assert _trials(f"sqlite:///{dump}", handed) == original
        # Nothing is overwritten; a storage of several studies needs a name; a missing file is said so.
        assert cli.main(["copy-study", str(source), PG_URL, "--as", handed]) == 1
        assert "already holds a study" in capsys.readouterr().out
        assert cli.main(["copy-study", str(source), str(dump)]) == 0  # now the dump holds two studies
        assert cli.main(["copy-study", str(dump), str(tmp_path / "other.db")]) == 2
        assert "holds 2 studies" in capsys.readouterr().out
        assert cli.main(["copy-study", str(tmp_path / "missing.db"), str(dump)]) == 1
        assert "no study storage" in capsys.readouterr().out
    finally:
        optuna.delete_study(study_name=handed, storage=PG_URL)

"""``abliterate lm-eval``: lm-evaluation-harness on an export and its original, offline, stored with the export.

The tasks are the bundled questions (``abliterate_mc``) and a task of the test's own, defined in a YAML
file over a local JSON-lines file (lm-eval's rolling log-likelihood: perplexities, which any change of
the weights moves). Each column of the stored table is checked against lm-eval run by itself on the
model folder it should come from, so a swapped or stale column fails.
"""

from __future__ import annotations

import json

import pytest

from abliterate import cli
from abliterate.core.harness import HARNESS_FILE
from abliterate.core.manifest import MODEL_CARD_FILE
from tests.e2e.exports import run_and_export
from tests.e2e.processes import save_tiny_model

pytest.importorskip("lm_eval")

TEXTS = [
    "The river runs past the old mill and under the stone bridge.",
    "A recipe for bread needs flour, water, salt and time.",
    "Seven is a prime number; eight is not.",
]


def _text_task(folder):
    data = folder / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    (folder / "local_text.yaml").write_text(
        "task: local_text\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny-model"), layers=3, hidden=64, seed=0)
    out, _, _ = run_and_export(model_dir, tmp_path_factory.mktemp("data"))
    return out, model_dir


def _lm_eval_alone(path, include_path):
    """lm-eval's own results for the model folder at ``path`` (lm-eval loads it itself)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(path), "dtype": "float32", "device": "cpu"},
        tasks=["local_text"],
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
        batch_size=8,
        log_samples=False,
        bootstrap_iters=0,
    )
    return results["results"]["local_text"]


def test_lm_eval_tables_the_export_beside_its_original(export, tmp_path, capsys):
    out, model_dir = export
    tasks = _text_task(tmp_path)
    capsys.readouterr()
    code = cli.main(
        ["lm-eval", str(out), "--tasks", "abliterate_mc,local_text", "--include-path", str(tasks), "--json"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((out / HARNESS_FILE).read_text())
    assert printed["rows"] == stored["rows"] and stored["tasks"] == ["abliterate_mc", "local_text"]
    rows = {(row["task"], row["metric"]): row for row in stored["rows"]}
    assert {("abliterate_mc", "acc"), ("abliterate_mc", "acc_norm"), ("local_text", "word_perplexity")} <= set(rows)
    # All 40 bundled questions were asked: accuracy is a multiple of 1/40.
    assert stored["results"]["original"]["abliterate_mc"]["sample_len"] == 40
    for column, folder in (("original", model_dir), ("edited", out)):
        alone = _lm_eval_alone(folder, tasks)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert rows[("local_text", metric)][column] == pytest.approx(alone[f"{metric},none"], rel=1e-5)
    perplexity = rows[("local_text", "word_perplexity")]
    assert perplexity["edited"] != pytest.approx(perplexity["original"], rel=1e-6)  # the edit is in the weights
    card = (out / MODEL_CARD_FILE).read_text()
    assert "## lm-evaluation-harness" in card and "| local_text | word_perplexity |" in card
    assert "| refusals |" in card  # the card's search numbers are still there


def test_lm_eval_refuses_unknown_tasks_and_missing_exports(export, tmp_path, capsys):
    out, _ = export
    assert cli.main(["lm-eval", str(out), "--tasks", "no_such_task", "--include-path", str(tmp_path)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().out
    assert cli.main(["lm-eval", str(tmp_path / "nowhere"), "--tasks", "abliterate_mc"]) == 1
    assert "no manifest" in capsys.readouterr().out

"""lm-evaluation-harness on an exported trial and on its original, side by side.

An optional extra (``pip install 'abliterate[lm-eval]'``): ``abliterate
lm-eval EXPORT --tasks ...`` loads the export folder, then the original model
its manifest names (its weights checked against the recorded hash, as
``reproduce`` does), runs the same lm-eval tasks on both through lm-eval's
``HFLM`` wrapped around the already loaded model (so a GGUF original works as
well as a folder), and stores the table beside the weights
(``abliterate-lm-eval.json``) and in the model card.

Tasks are lm-eval's own (which need their data sets from the hub), tasks the
user defines in YAML files under ``--include-path`` (for example over local
JSON files), and ``abliterate_mc``: the bundled multiple-choice questions of
the capability check, defined here over a local file, so the harness runs
fully offline.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata as package_metadata
from importlib import resources
from typing import Any

from abliterate.core.loading import LoadedModel, load_model
from abliterate.core.manifest import MODEL_CARD_FILE, model_card, read_manifest
from abliterate.core.reproduce import load_original, original_model_spec
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.specs import ModelSpec

HARNESS_FILE = "abliterate-lm-eval.json"
BUNDLED_TASK = "abliterate_mc"
INSTALL_HINT = "pip install 'abliterate[lm-eval]'"

# The bundled questions as an lm-eval task: the question as a completion prompt, the options as choices
# (lm-eval scores each by its log-likelihood after the prompt), over a JSON-lines file written at run time.
_BUNDLED_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass(frozen=True)
class HarnessRow:
    """One (task, metric) of the table: the original's value, the edited model's, and their stderrs."""

    task: str
    metric: str
    original: float
    edited: float
    original_stderr: float | None = None
    edited_stderr: float | None = None
    higher_is_better: bool | None = None

    @property
    def delta(self) -> float:
        return self.edited - self.original


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FailedPrecondition(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def _write_bundled_task(folder: str) -> None:
    """The bundled multiple-choice questions as a task of lm-eval's under ``folder``."""
    rows = json.loads(resources.files("abliterate").joinpath("data/eval/multiple_choice.json").read_text("utf-8"))
    data_file = os.path.join(folder, f"{BUNDLED_TASK}.jsonl")
    with open(data_file, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({key: row[key] for key in ("question", "options", "answer")}) + "\n")
    with open(os.path.join(folder, f"{BUNDLED_TASK}.yaml"), "w", encoding="utf-8") as handle:
        handle.write(_BUNDLED_TASK_YAML.format(task=BUNDLED_TASK, data_file=json.dumps(data_file)))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def results_by_metric(results: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """lm-eval's ``results`` ({task: {"acc,none": v, "acc_stderr,none": s, ...}}) as {(task, metric): (v, s)}.

    The metric is named with its filter when the filter is not lm-eval's default ("none").
    """
    table = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            number = _number(value)
            if number is None:
                continue
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            table[(task, name)] = (number, _number(values.get(f"{metric}_stderr,{filter_name}")))
    return table


def evaluate_model(
    lm: LoadedModel,
    tasks: list[str],
    task_manager: Any,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """lm-eval's result dictionary for ``lm`` as it is loaded, on ``tasks``."""
    lm_eval, HFLM, _ = _lm_eval()
    wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=wrapped,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=1000,
        apply_chat_template=apply_chat_template,
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    if results is None:  # lm-eval returns None on the non-zero ranks of a distributed run
        raise FailedPrecondition("lm-eval returned no results")
    return results


def compare(
    export_path: str,
    tasks: list[str],
    include_path: str | None = None,
    model_source: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run ``tasks`` on the export at ``export_path`` and on its original; store and return the table.

    The returned (and stored) dictionary: ``rows`` (a :class:`HarnessRow` each, as a dictionary),
    the settings, lm-eval's version, and lm-eval's raw ``results`` of both models.
    """
    if not tasks:
        raise InvalidArgument("name at least one lm-eval task (--tasks)")
    if include_path is not None and not os.path.isdir(include_path):
        raise InvalidArgument(f"--include-path {include_path} is not a folder")
    manifest, folder = read_manifest(export_path)
    original_spec = original_model_spec(manifest, model_source)  # a bad manifest is refused before lm-eval loads
    _, _, TaskManager = _lm_eval()
    with tempfile.TemporaryDirectory(prefix="abliterate-lm-eval-") as bundled:
        _write_bundled_task(bundled)
        task_manager = TaskManager(include_path=[bundled] + ([include_path] if include_path else []))
        unknown = [task for task in tasks if task not in task_manager.all_tasks]
        if unknown:
            raise InvalidArgument(
                f"unknown lm-eval task(s) {unknown}: not one of lm-eval's, not {BUNDLED_TASK!r}"
                + (f", not defined under {include_path}" if include_path else " (define your own with --include-path)")
            )
        settings = dict(
            tasks=tasks,
            task_manager=task_manager,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            apply_chat_template=apply_chat_template,
        )
        progress(f"loading the export {folder} ...")
        edited_spec = ModelSpec(
            source=folder,
            dtype=original_spec.dtype,
            system_prompt=original_spec.system_prompt,
            chat_template_mode=original_spec.chat_template_mode,
        ).validate()
        # One model in memory at a time: each is dropped when its run returns.
        edited_lm = load_model(edited_spec)
        progress(f"lm-eval on the export: {', '.join(tasks)} ...")
        edited = _run(edited_lm, settings)
        del edited_lm
        gc.collect()
        original_lm = load_original(manifest, model_source, progress)
        progress(f"lm-eval on the original: {', '.join(tasks)} ...")
        original = _run(original_lm, settings)
        del original_lm
        gc.collect()
    edited_table, original_table = results_by_metric(edited["results"]), results_by_metric(original["results"])
    higher = {**original.get("higher_is_better", {}), **edited.get("higher_is_better", {})}
    rows = [
        HarnessRow(
            task=task,
            metric=metric,
            original=original_table[(task, metric)][0],
            edited=edited_table[(task, metric)][0],
            original_stderr=original_table[(task, metric)][1],
            edited_stderr=edited_table[(task, metric)][1],
            higher_is_better=(higher.get(task) or {}).get(metric.split(" (")[0]),
        )
        for task, metric in sorted(set(edited_table) & set(original_table))
    ]
    table = {
        "lm_eval_version": package_metadata.version("lm_eval"),
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "apply_chat_template": apply_chat_template,
        "rows": [asdict(row) for row in rows],
        "results": {"original": original["results"], "edited": edited["results"]},
    }
    store(folder, manifest, table)
    return table


def _run(lm: LoadedModel, settings: dict[str, Any]) -> dict[str, Any]:
    try:
        return evaluate_model(lm, **settings)
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        # lm-eval's own tasks fetch their data sets from the hub; offline, that is where they fail.
        raise FailedPrecondition(f"lm-eval could not load a task's data: {exc}") from None


def harness_rows(table: dict[str, Any]) -> list[HarnessRow]:
    return [HarnessRow(**row) for row in table.get("rows", [])]


def store(folder: str, manifest: dict[str, Any], table: dict[str, Any]) -> None:
    """Write the table beside the weights and redraw the model card with it."""
    with open(os.path.join(folder, HARNESS_FILE), "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=2, sort_keys=True, default=str)
    with open(os.path.join(folder, MODEL_CARD_FILE), "w", encoding="utf-8") as handle:
        handle.write(model_card(manifest, harness=table))

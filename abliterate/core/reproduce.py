"""Re-apply an exported trial from its manifest and re-measure it, without searching.

The export's manifest (:mod:`abliterate.core.manifest`) names the model and
the hash of its unedited weights, carries the direction set and the prompts,
and records the settings the trial was scored with, down to the batch sizes
(logits depend on the batch shapes in their last bits). This loads the same
model, checks its weights hash, scores the trial's parameters on the same
prompts, and compares with the scores the study recorded: KL to 1e-6,
refusals exactly (at least the recorded bound for a pruned trial).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from abliterate.core.directions import DirectionSet
from abliterate.core.judges import make_judge
from abliterate.core.loading import LoadedModel, load_model
from abliterate.core.manifest import read_directions, read_manifest, read_prompts, weights_sha256
from abliterate.core.refusals import RefusalDetector
from abliterate.core.scoring import TrialEngine
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.judge_spec import JudgeSpec
from abliterate.params import AblationParams
from abliterate.specs import ModelSpec

#: KL agreement that counts as the same measurement (CPU float32 paths are deterministic).
KL_TOLERANCE = 1e-6


@dataclass
class Reproduction:
    """The re-measured scores beside the recorded ones (None where the manifest recorded none)."""

    kl: float
    refusals: int
    n_kl_prompts: int
    n_refusal_prompts: int
    recorded_kl: float | None = None
    recorded_refusals: int | None = None
    recorded_pruned: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def kl_matches(self) -> bool | None:
        return None if self.recorded_kl is None else abs(self.kl - self.recorded_kl) <= KL_TOLERANCE

    @property
    def refusals_match(self) -> bool | None:
        if self.recorded_refusals is None:
            return None
        if self.recorded_pruned:  # the study stopped counting at a proven lower bound
            return self.refusals >= self.recorded_refusals
        return self.refusals == self.recorded_refusals

    @property
    def matches(self) -> bool | None:
        """True when both scores match, False when one does not, None when nothing was recorded."""
        checks = [check for check in (self.kl_matches, self.refusals_match) if check is not None]
        return all(checks) if checks else None


def original_model_spec(manifest: dict[str, Any], model_source: str | None = None) -> ModelSpec:
    """The spec of the unedited model the manifest records (``model_source``: where it is now, if it moved)."""
    model = manifest.get("model") or {}
    scoring = manifest.get("scoring") or {}
    source = model_source or model.get("source")
    if not source:
        raise InvalidArgument("the manifest names no model source; pass one (--model)")
    gguf_file = None if model_source and model_source.endswith(".gguf") else model.get("gguf_file")
    return ModelSpec(
        source=source,
        gguf_file=gguf_file,
        dtype=model.get("dtype") or "auto",
        system_prompt=scoring.get("system_prompt", ""),
        chat_template_mode=scoring.get("chat_template_mode", "chat"),
    ).validate()


def load_original(
    manifest: dict[str, Any], model_source: str | None = None, progress: Callable[[str], None] = lambda message: None
) -> LoadedModel:
    """Load the unedited model the manifest records and check that its weights hash to the recorded sha256."""
    spec = original_model_spec(manifest, model_source)
    progress(f"loading {spec.source} ...")
    lm = load_model(spec)
    progress("hashing its weights ...")
    recorded_hash = (manifest.get("model") or {}).get("weights_sha256")
    found_hash = weights_sha256(lm.model)
    if found_hash != recorded_hash:
        raise FailedPrecondition(
            f"the weights of {spec.source} hash to {found_hash[:16]}..., the manifest recorded "
            f"{str(recorded_hash)[:16]}...: not the model this trial was made from"
        )
    return lm


def reproduce(
    path: str, model_source: str | None = None, progress: Callable[[str], None] = lambda message: None
) -> Reproduction:
    """Re-measure the trial of the export (folder or manifest file) at ``path``.

    ``model_source``: where the model is now, when it moved; its weights must
    still hash to the manifest's (FAILED_PRECONDITION otherwise).
    """
    manifest, folder = read_manifest(path)
    scoring = manifest.get("scoring")
    if not scoring:
        raise FailedPrecondition(
            "the manifest records no scoring settings (the evaluator held no baseline when it exported): "
            "there is nothing to re-measure"
        )
    prompts = read_prompts(folder, manifest)
    directions = DirectionSet.from_bytes(read_directions(folder, manifest))
    params = AblationParams.from_dict(manifest.get("params") or {})
    lm = load_original(manifest, model_source, progress)
    params.validate(lm.n_layers)
    markers = tuple(scoring.get("refusal_markers") or ())
    engine = TrialEngine(
        lm,
        detector=RefusalDetector(markers) if markers else RefusalDetector(),
        share_prefix=bool(scoring.get("share_prefix", True)),
    )
    judged_by = scoring.get("judge") or {}
    known = {name: judged_by[name] for name in JudgeSpec.__dataclass_fields__ if name in judged_by}
    judge_spec = JudgeSpec(**{**known, "kind": known.get("kind") or "markers"}).validate()
    if judge_spec.kind != "markers":
        engine.judge = make_judge(judge_spec, engine.detector)
    notes = []
    sizes = scoring.get("batch_sizes") or {}
    if sizes:
        engine.pin_batch_sizes({operation: int(size) for operation, size in sizes.items()})
    else:
        notes.append("the manifest records no batch sizes: KL may differ from the recorded one in its last bits")
    engine.set_directions(directions)
    progress(f"scoring the unedited model on {len(prompts['kl'])} KL prompts ...")
    engine.prepare_baseline(
        prompts["kl"], prompts["refusal"], int(scoring["max_new_tokens"]), int(scoring.get("kl_tokens", 1))
    )
    progress(f"scoring the trial on {len(prompts['refusal'])} refusal prompts ...")
    try:
        result = engine.evaluate(params)
    finally:
        engine.reset()
    trial = manifest.get("trial") or {}
    if not trial:
        notes.append("the manifest records no trial scores (exported without a study): nothing to compare")
    return Reproduction(
        kl=result.kl,
        refusals=result.refusals,
        n_kl_prompts=result.n_kl_prompts,
        n_refusal_prompts=result.n_refusal_prompts,
        recorded_kl=trial.get("kl"),
        recorded_refusals=trial.get("refusals"),
        recorded_pruned=bool(trial.get("pruned")),
        notes=notes,
    )

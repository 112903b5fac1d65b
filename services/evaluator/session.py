"""The evaluator's state and work: one loaded model, its TrialEngine, direction
sets by id (a few, least recently used evicted), the held baseline, and the
device lock.

One operation at a time per device: EvaluateTrial, PrepareBaseline, Generate,
Chat and ExportModel take the lock without waiting; a second one answers
UNAVAILABLE ("evaluator busy") at once. Every operation that edits the model
resets it before releasing the lock, so the weights are the original ones
between operations (the extractor relies on that when it shares the model).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from abliterate.artifacts import tensor_names
from abliterate.caps import (
    DEFAULT_MAX_KL_TOKENS,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_SCORING_TOKENS,
    check_at_most,
    check_prompt_tokens,
)
from abliterate.core.audit import DEFAULT_MAX_NEW_TOKENS as DEFAULT_AUDIT_MAX_TOKENS
from abliterate.core.audit import DEFAULT_MIN_NEW_TOKENS as DEFAULT_AUDIT_MIN_TOKENS
from abliterate.core.audit import AuditResult, audit_replies
from abliterate.core.capability import CapabilityResult, capability_check
from abliterate.core.chat import build_messages, render_chat
from abliterate.core.directions import DirectionSet, protected_subspace
from abliterate.core.export import export_merged
from abliterate.core.generation import stream_generate
from abliterate.core.judges import Judge, make_judge
from abliterate.core.loading import LoadedModel
from abliterate.core.manifest import (
    DIRECTIONS_FILE,
    package_versions,
    prompts_sha256,
    weights_sha256,
    write_export_files,
)
from abliterate.core.manifest import SCHEMA as MANIFEST_SCHEMA
from abliterate.core.prompts import confined_path
from abliterate.core.reasoning import special_token_strings
from abliterate.core.refusals import RefusalDetector
from abliterate.core.scoring import TrialEngine, TrialResult
from abliterate.dominance import ScorePoint
from abliterate.errors import FailedPrecondition, InvalidArgument, NotFound, quoted
from abliterate.judge_spec import JudgeSpec
from abliterate.params import AblationParams
from abliterate.rpc.convert import judge_spec_from_pb, load_prompt_set, parse_json_object
from abliterate.rpc.tensors import sha256_hex
from abliterate.v1 import common_pb2
from abliterate_services.evaluator import lora
from abliterate_services.evaluator.paths import QUOTED_PATH_CHARS, check_replaceable, resolve_export_path
from abliterate_services.runtime import DeviceLock, job_view, model_info

log = logging.getLogger(__name__)

SERVICE = "evaluator"
DEFAULT_BASELINE_TOKENS = 100
DEFAULT_GENERATE_TOKENS = 256
ROLES = ("system", "user", "assistant")
#: Manifest keys the evaluator writes; a caller's manifest_json may not set them.
EVALUATOR_MANIFEST_KEYS = frozenset(
    {"schema", "created_at", "format", "model", "directions", "params", "scoring", "versions"}
)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 0  # 0 = the session default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 = 1.0 (off)
    seed: int | None = None


@dataclass
class Chunk:
    text: str
    n_tokens: int
    finish: str | None = None  # "stop" (EOS) or "length" on the last chunk
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadResult:
    direction_set_id: str
    already_loaded: bool
    tensor_names: list[str]
    timings_s: dict[str, float]


@dataclass
class BaselineInfo:
    baseline_id: str
    already_prepared: bool
    n_kl_prompts: int
    n_refusal_prompts: int
    baseline_refusals: int  # meaningful when refusals_counted
    timings_s: dict[str, float]
    refusals_counted: bool = True


@dataclass
class _HeldSet:
    directions: DirectionSet
    names: list[str]
    data: bytes  # as received: its sha256 is the set's id, and an export's manifest carries it


@dataclass
class ExportResult:
    path: str
    files: list[str]
    bytes_written: int
    hub_url: str
    timings_s: dict[str, float]


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


class EvaluatorSession:
    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int = 0,
        lock: DeviceLock | None = None,
        max_direction_sets: int = 4,
        default_max_new_tokens: int = DEFAULT_GENERATE_TOKENS,
        max_generate_tokens: int = 4096,
        *,
        max_scoring_tokens: int = DEFAULT_MAX_SCORING_TOKENS,
        max_kl_tokens: int = DEFAULT_MAX_KL_TOKENS,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        export_root: str | None = None,
        prompt_root: str | None = None,
    ):
        self.lm = lm
        # None: no confinement (the local embedded run); else exports land only under this folder.
        self.export_root = export_root
        # Where prompt files may be read (abliterate.core.prompts: None any, "" none, else under it).
        self.prompt_root = prompt_root
        self.engine = TrialEngine(lm, batch_size=batch_size)
        self.module_map = self.engine.module_map
        self.lock = lock or DeviceLock()
        self.max_direction_sets = max(1, max_direction_sets)
        self.default_max_new_tokens = default_max_new_tokens
        self.max_generate_tokens = max_generate_tokens
        self.max_scoring_tokens = max_scoring_tokens
        self.max_kl_tokens = max_kl_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._sets: OrderedDict[str, _HeldSet] = OrderedDict()
        self._store_lock = threading.Lock()
        self.baseline: BaselineInfo | None = None
        self._scored_prompts: dict[str, list[str]] = {}  # the held baseline's prompts, as loaded ("kl", "refusal")
        self._weights_sha256: str | None = None  # of the unedited weights, computed at the first export
        self._held_judge_spec: dict[str, Any] = {}  # the held baseline's judge, for the manifest
        self._judges: dict[JudgeSpec, Judge] = {}
        self._original_capabilities: dict[
            tuple[str, str], CapabilityResult
        ] = {}  # loaded judges (an embedding model loads in seconds), by settings

    def model_info(self) -> common_pb2.ModelInfo:
        return model_info(self.lm, self.module_map)

    # ------------------------------------------------------------ directions
    def load_directions(self, data: bytes, sha256: str = "") -> LoadResult:
        """Hold a direction set given by its bytes (sha256 verified when given)."""
        t0 = time.perf_counter()
        data = bytes(data)
        digest = sha256_hex(data)
        if sha256 and sha256.lower() != digest:
            raise InvalidArgument(f"sha256 mismatch: the direction set hashes to {digest}, the request says {sha256}")
        with self._store_lock:
            if digest in self._sets:
                self._sets.move_to_end(digest)
                return LoadResult(digest, True, self._sets[digest].names, {"total": time.perf_counter() - t0})
        ds = DirectionSet.from_bytes(data)
        expected = (self.module_map.n_layers + 1, self.module_map.hidden_size)
        if tuple(ds.refusal.shape) != expected:
            raise InvalidArgument(
                f"direction set {digest[:12]} has refusal directions of shape {list(ds.refusal.shape)}, but this "
                f"model ({type(self.lm.model).__name__}, {self.module_map.n_layers} layers, hidden size "
                f"{self.module_map.hidden_size}) needs {list(expected)}: it was extracted from another model"
            )
        if ds.sacred is not None and (ds.sacred.dim() != 3 or tuple(ds.sacred.shape[::2]) != expected):
            raise InvalidArgument(f"sacred directions of shape {list(ds.sacred.shape)} do not fit {list(expected)}")
        source = ds.metadata.get("model_source")
        if source and source != self.lm.spec.source:
            log.warning(
                "direction set %s was extracted from %s; this evaluator serves %s",
                digest[:12],
                source,
                self.lm.spec.source,
            )
        names = tensor_names(data)
        t_decode = time.perf_counter() - t0
        t1 = time.perf_counter()
        ds.refusal = ds.refusal.to(self.lm.device)
        t_device = time.perf_counter() - t1
        with self._store_lock:
            already = digest in self._sets
            if not already:
                self._sets[digest] = _HeldSet(ds, names, data)
            self._sets.move_to_end(digest)
            while len(self._sets) > self.max_direction_sets:
                evicted, _ = self._sets.popitem(last=False)
                log.info("direction set %s evicted (holding at most %d)", evicted[:12], self.max_direction_sets)
        return LoadResult(
            digest, already, names, {"decode": t_decode, "to_device": t_device, "total": time.perf_counter() - t0}
        )

    def check_directions(self, set_id: str) -> LoadResult:
        """Is the set with this id held? NOT_FOUND if not."""
        t0 = time.perf_counter()
        with self._store_lock:
            if set_id not in self._sets:
                raise NotFound(f"direction set {set_id!r} is not held by this evaluator; send its bytes")
            self._sets.move_to_end(set_id)
            names = self._sets[set_id].names
        return LoadResult(set_id, True, names, {"total": time.perf_counter() - t0})

    def held_ids(self) -> list[str]:
        with self._store_lock:
            return list(self._sets)

    def directions(self, set_id: str) -> DirectionSet:
        """The held set ``set_id``; empty: the most recently loaded one (FAILED_PRECONDITION if none)."""
        return self._lookup(set_id)[1]

    def _lookup(self, set_id: str) -> tuple[str, DirectionSet]:
        with self._store_lock:
            if not set_id:
                if not self._sets:
                    raise FailedPrecondition("no direction set loaded: call LoadDirections first")
                set_id = next(reversed(self._sets))
            if set_id not in self._sets:
                raise NotFound(
                    f"direction set {set_id!r} is not held by this evaluator "
                    "(send LoadDirections with its bytes, then retry)"
                )
            self._sets.move_to_end(set_id)
            return set_id, self._sets[set_id].directions

    def _check_params(self, params: AblationParams) -> None:
        params.validate(self.module_map.n_layers, self.module_map.components)

    # -------------------------------------------------------------- baseline
    @staticmethod
    def baseline_id_of(spec: common_pb2.BaselineSpec, source: str) -> str:
        h = hashlib.sha256(spec.SerializeToString(deterministic=True))
        h.update(b"\0" + source.encode())
        return h.hexdigest()

    def prepare_baseline(self, spec: common_pb2.BaselineSpec, count_refusals: bool = True) -> BaselineInfo:
        """Hold the baseline of ``spec``; with ``count_refusals``, also the unedited model's refusal count.

        The count generates on every refusal prompt (as long as a trial's
        probes) and no trial score depends on it, so a caller that does not
        show it skips it. With the automatic batch size the probes' batch size
        is measured here, on the unedited model, so that every trial (and the
        count) probes at that one size.
        """
        t_start = time.perf_counter()
        baseline_id = self.baseline_id_of(spec, self.lm.spec.source)
        held = self.baseline
        if held is not None and held.baseline_id == baseline_id:
            if held.refusals_counted or not count_refusals:
                return replace(held, already_prepared=True, timings_s={"total": time.perf_counter() - t_start})
            return self._count_held_refusals(held, t_start)  # the held logprobs stay: only the count is new
        view = job_view(self.lm, spec.model if spec.HasField("model") else None)
        if not spec.HasField("kl_prompts"):
            raise InvalidArgument("baseline.kl_prompts is required")
        if not spec.HasField("refusal_prompts"):
            raise InvalidArgument("baseline.refusal_prompts is required")
        detector = RefusalDetector(tuple(spec.refusal_markers)) if list(spec.refusal_markers) else RefusalDetector()
        judge_spec = judge_spec_from_pb(spec.judge if spec.HasField("judge") else None)
        max_new_tokens = spec.max_new_tokens or DEFAULT_BASELINE_TOKENS
        kl_tokens = max(1, spec.kl_tokens)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        check_at_most(spec.max_new_tokens, self.max_scoring_tokens, "max_new_tokens", "max_scoring_tokens")
        check_at_most(spec.kl_tokens, self.max_kl_tokens, "kl_tokens", "max_kl_tokens")
        kl_prompts = load_prompt_set(spec.kl_prompts, "KL", file_root=self.prompt_root)
        refusal_prompts = load_prompt_set(spec.refusal_prompts, "refusal", file_root=self.prompt_root)
        check_prompt_tokens(self.lm.tokenizer, kl_prompts, self.max_prompt_tokens, "KL prompt")
        check_prompt_tokens(self.lm.tokenizer, refusal_prompts, self.max_prompt_tokens, "refusal prompt")
        timings["load_prompts"] = time.perf_counter() - t0
        judge = self._judge(judge_spec, detector)  # before the lock: loading an embedding model takes seconds
        with self.lock.hold("PrepareBaseline", SERVICE):
            engine = self.engine
            saved = (engine.lm, engine.detector, engine.judge, engine.baseline)
            try:
                engine.lm, engine.detector, engine.judge = view, detector, judge
                t0 = time.perf_counter()
                baseline = engine.prepare_baseline(kl_prompts, refusal_prompts, max_new_tokens, kl_tokens)
                timings["logprobs"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                engine.tune_generation(baseline.refusal_texts, max_new_tokens)  # automatic batch size only
                timings["tune_generation"] = time.perf_counter() - t0
                outcomes = []
                if count_refusals:
                    t0 = time.perf_counter()
                    outcomes = engine.count_refusals(baseline.refusal_texts, baseline.refusal_prompts, max_new_tokens)
                    timings["refusals"] = time.perf_counter() - t0
            except BaseException:
                engine.lm, engine.detector, engine.judge, engine.baseline = saved
                raise
            finally:
                engine.reset()
            timings["total"] = time.perf_counter() - t_start
            self.baseline = BaselineInfo(
                baseline_id,
                False,
                len(kl_prompts),
                len(refusal_prompts),
                sum(o.refusal for o in outcomes),
                timings,
                refusals_counted=count_refusals,
            )
            self._scored_prompts = {"kl": kl_prompts, "refusal": refusal_prompts}
            self._held_judge_spec = asdict(judge_spec)
        log.info(
            "baseline prepared",
            extra={
                "baseline_id": baseline_id,
                "n_kl": len(kl_prompts),
                "n_refusal": len(refusal_prompts),
                "baseline_refusals": self.baseline.baseline_refusals if count_refusals else None,
            },
        )
        return self.baseline

    def _judge(self, spec: JudgeSpec, detector: RefusalDetector) -> Judge | None:
        """The engine's judge for ``spec``: None for markers (the detector, with early stop), else one
        loaded once per (kind, model, threshold) and kept."""
        spec.validate()
        if spec.kind == "markers":
            return None
        if spec.kind == "embedding" and spec.model and self.prompt_root is not None:
            spec = replace(spec, model=confined_path(spec.model, self.prompt_root))  # a folder on this machine
        key = spec  # frozen: the judge's whole settings
        if key not in self._judges:
            self._judges[key] = make_judge(spec, detector)
        judge = self._judges[key]
        judge.special_tokens = detector.special_tokens or tuple(special_token_strings(self.lm.tokenizer))
        return judge

    def _count_held_refusals(self, held: BaselineInfo, t_start: float) -> BaselineInfo:
        """The unedited model's refusal count for a baseline held without it (the engine still has its
        model view, detector and prompts from :meth:`prepare_baseline`)."""
        with self.lock.hold("PrepareBaseline", SERVICE):
            engine = self.engine
            baseline = engine.baseline
            t0 = time.perf_counter()
            try:
                outcomes = engine.count_refusals(
                    baseline.refusal_texts, baseline.refusal_prompts, baseline.max_new_tokens
                )
            finally:
                engine.reset()
            timings = {"refusals": time.perf_counter() - t0, "total": time.perf_counter() - t_start}
        self.baseline = replace(
            held,
            already_prepared=False,
            baseline_refusals=sum(o.refusal for o in outcomes),
            timings_s=timings,
            refusals_counted=True,
        )
        return self.baseline

    # ----------------------------------------------------------------- trial
    def evaluate(
        self,
        set_id: str,
        params: AblationParams,
        baseline_id: str = "",
        trial_number: int | None = None,
        front: Sequence[ScorePoint] = (),
    ) -> TrialResult:
        ds = self.directions(set_id)
        held = self.baseline
        if held is None or self.engine.baseline is None:
            raise FailedPrecondition("no baseline prepared: call PrepareBaseline first")
        if baseline_id and baseline_id != held.baseline_id:
            raise FailedPrecondition(
                f"the held baseline is {held.baseline_id}, not {baseline_id}: "
                "call PrepareBaseline with the job's spec, then retry"
            )
        self._check_params(params)
        with self.lock.hold("EvaluateTrial", SERVICE):
            try:
                self.engine.set_directions(ds)
                result = self.engine.evaluate(params, front=front)
            finally:
                t0 = time.perf_counter()
                self.engine.reset()
                reset_s = time.perf_counter() - t0
        timings = dict(result.timings_s)
        timings["ablate"] = timings.pop("edit", 0.0)
        timings["reset"] = reset_s
        timings["total"] = timings.get("total", 0.0) + reset_s
        result.timings_s = timings
        log.info(
            "trial scored",
            extra={"trial": trial_number, "kl": result.kl, "refusals": result.refusals, "pruned": bool(result.pruned)},
        )
        return result

    # ------------------------------------------------------------ generation
    def _check_options(self, options: GenerationOptions) -> GenerationOptions:
        n = options.max_new_tokens or self.default_max_new_tokens
        if n > self.max_generate_tokens:
            raise InvalidArgument(f"max_new_tokens {n} exceeds this server's limit of {self.max_generate_tokens}")
        if not math.isfinite(options.temperature) or options.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {options.temperature}")
        top_p = options.top_p or 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1] (0 = off), got {options.top_p}")
        return GenerationOptions(n, options.temperature, top_p, options.seed)

    def generate(
        self,
        prompt: str,
        set_id: str = "",
        params: AblationParams | None = None,
        options: GenerationOptions | None = None,
        raw: bool = False,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[Chunk]:
        """Stream the completion of one prompt (params None: the unedited model)."""
        if not prompt.strip():
            raise InvalidArgument("the prompt is empty")
        spec = self.lm.spec
        if raw:
            text, mode = prompt, "plain"
        else:
            text = render_chat(self.lm.tokenizer, build_messages(prompt, spec.system_prompt), spec.chat_template_mode)
            mode = spec.chat_template_mode
        return self._stream("Generate", text, mode, set_id, params, options, is_active)

    def chat(
        self,
        messages: list[tuple[str, str]],
        set_id: str = "",
        params: AblationParams | None = None,
        options: GenerationOptions | None = None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[Chunk]:
        """Stream the next assistant turn (a leading system message replaces the spec's system prompt)."""
        if not messages:
            raise InvalidArgument("the conversation is empty")
        for i, (role, _) in enumerate(messages):
            if role not in ROLES:
                raise InvalidArgument(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if messages[-1][0] != "user":
            raise InvalidArgument(f"the last message must be a user turn, got {messages[-1][0]!r}")
        turns = [{"role": r, "content": c} for r, c in messages]
        spec = self.lm.spec
        if turns[0]["role"] != "system" and spec.system_prompt:
            turns.insert(0, {"role": "system", "content": spec.system_prompt})
        text = render_chat(self.lm.tokenizer, turns, spec.chat_template_mode)
        return self._stream("Chat", text, spec.chat_template_mode, set_id, params, options, is_active)

    def _stream(
        self,
        what: str,
        text: str,
        mode: str,
        set_id: str,
        params: AblationParams | None,
        options: GenerationOptions | None,
        is_active: Callable[[], bool],
    ) -> Iterator[Chunk]:
        opts = self._check_options(options or GenerationOptions())
        check_prompt_tokens(self.lm.tokenizer, [text], self.max_prompt_tokens, f"the {what} prompt")
        ds = None
        if params is not None:
            ds = self.directions(set_id)
            self._check_params(params)
        elif set_id:
            self.directions(set_id)  # an unknown id is still NOT_FOUND
        return self._locked_stream(what, text, mode, ds, params, opts, is_active)

    def _locked_stream(self, what, text, mode, ds, params, opts, is_active) -> Iterator[Chunk]:
        t_start = time.perf_counter()
        self.lock.acquire(what, SERVICE)
        try:
            t0 = time.perf_counter()
            if params is not None:
                self.engine.set_directions(ds)
                self.engine.apply(params)
            ablate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            n_tokens, finish = 0, "length"
            for piece, n_tokens, finish in stream_generate(
                self.lm, text, opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed, is_active, mode
            ):
                if piece:
                    yield Chunk(piece, n_tokens)
            timings = {"ablate": ablate_s, "generate": time.perf_counter() - t0, "total": time.perf_counter() - t_start}
            yield Chunk("", n_tokens, finish or "length", timings)
        finally:
            self.engine.reset()
            self.lock.release()

    # ---------------------------------------------------------------- export
    # ----------------------------------------------------------------- audit
    def audit(
        self,
        set_id: str,
        params: AblationParams,
        prompts: common_pb2.PromptSetSpec | None = None,
        min_new_tokens: int = 0,
        max_new_tokens: int = 0,
        judge: common_pb2.RefusalJudge | None = None,
        model: common_pb2.ModelSpec | None = None,
    ) -> tuple[AuditResult, dict[str, float]]:
        """Re-measure ``params``' refusals on long replies judged whole (abliterate.core.audit)."""
        t_start = time.perf_counter()
        maximum = max_new_tokens or DEFAULT_AUDIT_MAX_TOKENS
        minimum = min_new_tokens if min_new_tokens else min(DEFAULT_AUDIT_MIN_TOKENS, maximum)
        if minimum > maximum:
            raise InvalidArgument(f"min_new_tokens ({minimum}) is above max_new_tokens ({maximum})")
        check_at_most(maximum, self.max_scoring_tokens, "max_new_tokens", "max_scoring_tokens")
        set_id, ds = self._lookup(set_id)
        self._check_params(params)
        engine = self.engine
        if prompts is not None:
            texts = load_prompt_set(prompts, "audit", file_root=self.prompt_root)
            check_prompt_tokens(self.lm.tokenizer, texts, self.max_prompt_tokens, "audit prompt")
        elif self._scored_prompts:
            texts = self._scored_prompts["refusal"]
        else:
            raise FailedPrecondition("no prompts to audit: name them, or prepare a baseline first")
        view = job_view(self.lm, model) if model is not None else engine.lm
        if judge is not None:
            judge_spec = judge_spec_from_pb(judge)
            chosen = self._judge(judge_spec, engine.detector)
        else:
            judge_spec = JudgeSpec(**self._held_judge_spec) if self._held_judge_spec else JudgeSpec()
            chosen = engine.judge
        timings: dict[str, float] = {}
        size = engine.batch_sizes().get("generate") or 16
        with self.lock.hold("AuditTrial", SERVICE):
            try:
                t0 = time.perf_counter()
                engine.set_directions(ds)
                engine.apply(params)
                timings["ablate"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = audit_replies(view, texts, minimum, maximum, chosen, engine.detector, batch_size=size)
                timings["generate"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                capability = capability_check(view)
                engine.reset()
                original = self._original_capability(view)
                timings["capability"] = time.perf_counter() - t0
            finally:
                engine.reset()
        result.capability, result.capability_original = capability, original
        timings["total"] = time.perf_counter() - t_start
        log.info("trial audited", extra={"refusals": result.refusals, "n": result.n_prompts, "judge": judge_spec.kind})
        return result, timings

    def _original_capability(self, view: LoadedModel) -> CapabilityResult:
        """The unedited model's capability check under ``view``'s formatting, computed once per system prompt
        (call with the model reset and the lock held)."""
        key = (view.spec.system_prompt, view.spec.chat_template_mode)
        if key not in self._original_capabilities:
            self._original_capabilities[key] = capability_check(view)
        return self._original_capabilities[key]

    def _held_bytes(self, set_id: str) -> bytes:
        with self._store_lock:
            return self._sets[set_id].data

    def _original_weights_sha256(self) -> str:
        """The unedited weights' hash, computed once (the model is unedited whenever the lock is free)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = weights_sha256(self.lm.model)
        return self._weights_sha256

    def _manifest(
        self,
        set_id: str,
        params: AblationParams,
        fmt: str,
        caller: dict[str, Any],
        baseline: common_pb2.BaselineSpec | None,
    ) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """The export's manifest and the prompts it was scored on (abliterate.core.manifest)."""
        scoring, prompts = self._scoring_record(baseline)
        spec = self.lm.spec
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "format": fmt,
            "model": {
                "source": spec.source,
                "gguf_file": spec.gguf_file,
                "dtype": str(next(self.lm.model.parameters()).dtype).removeprefix("torch."),
                "weights_sha256": self._original_weights_sha256(),
            },
            "directions": {"id": set_id, "sha256": sha256_hex(self._held_bytes(set_id)), "file": DIRECTIONS_FILE},
            "params": params.to_dict(),
            "scoring": scoring,
            "versions": package_versions(),
        }
        return {**caller, **manifest}, prompts

    def _scoring_record(
        self, spec: common_pb2.BaselineSpec | None
    ) -> tuple[dict[str, Any] | None, dict[str, list[str]]]:
        """How the trial was scored: the held baseline's settings and batch sizes, or ``spec``'s settings.

        A spec that is not the held baseline (the evaluator has since scored
        another job) gives its prompts and settings but no batch sizes: those
        it ran at are not known here. Neither: None (nothing to re-measure).
        """
        held = self.baseline
        if spec is None or (held is not None and self.baseline_id_of(spec, self.lm.spec.source) == held.baseline_id):
            if held is None or not self._scored_prompts:
                return None, {}
            engine, prompts = self.engine, self._scored_prompts
            scoring = {
                "baseline_id": held.baseline_id,
                "max_new_tokens": engine.baseline.max_new_tokens,
                "kl_tokens": engine.baseline.kl_tokens,
                "refusal_markers": list(engine.detector.markers),
                "system_prompt": engine.lm.spec.system_prompt,
                "chat_template_mode": engine.lm.spec.chat_template_mode,
                "batch_sizes": engine.batch_sizes(),
                "share_prefix": engine.share_prefix,
                "judge": self._held_judge_spec,
            }
        else:
            view = job_view(self.lm, spec.model if spec.HasField("model") else None)
            prompts = {
                "kl": load_prompt_set(spec.kl_prompts, "KL", file_root=self.prompt_root),
                "refusal": load_prompt_set(spec.refusal_prompts, "refusal", file_root=self.prompt_root),
            }
            markers = list(spec.refusal_markers)
            scoring = {
                "baseline_id": self.baseline_id_of(spec, self.lm.spec.source),
                "max_new_tokens": spec.max_new_tokens or DEFAULT_BASELINE_TOKENS,
                "kl_tokens": max(1, spec.kl_tokens),
                "refusal_markers": list(
                    RefusalDetector(tuple(markers)).markers if markers else RefusalDetector().markers
                ),
                "system_prompt": view.spec.system_prompt,
                "chat_template_mode": view.spec.chat_template_mode,
                "batch_sizes": {},
                "share_prefix": self.engine.share_prefix,
                "judge": asdict(judge_spec_from_pb(spec.judge if spec.HasField("judge") else None)),
            }
        for key, texts in prompts.items():
            scoring[f"{key}_prompts"] = {"count": len(texts), "sha256": prompts_sha256(texts)}
        return scoring, prompts

    def export(
        self,
        path: str,
        set_id: str,
        params: AblationParams,
        fmt: str = "merged",
        hub_repo: str | None = None,
        hub_private: bool = False,
        overwrite: bool = False,
        manifest_json: str = "",
        baseline: common_pb2.BaselineSpec | None = None,
    ) -> ExportResult:
        t_start = time.perf_counter()
        caller = _caller_manifest_fields(manifest_json)
        if not path or not path.strip():
            raise InvalidArgument("the export path is empty")
        if fmt not in ("merged", "lora"):
            raise InvalidArgument(f"unknown export format {fmt!r}")
        token = None
        if hub_repo is not None:
            if not hub_repo.strip() or hub_repo.count("/") != 1:
                raise InvalidArgument(f"hub_repo must look like 'user/name', got {hub_repo!r}")
            token = hub_token()
            if not token:
                raise FailedPrecondition(
                    "pushing to the Hugging Face Hub needs a token: set HF_TOKEN in the evaluator's environment"
                )
        path = resolve_export_path(self.export_root, path)
        set_id, ds = self._lookup(set_id)
        self._check_params(params)
        check_replaceable(path, overwrite)
        metadata = {
            "direction_set_id": set_id,
            "params": params.to_dict(),
            "model_source": self.lm.spec.source,
            "format": fmt,
        }
        timings: dict[str, float] = {}
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:  # read-only, permission denied, ...: the caller's path, not a server fault
            raise FailedPrecondition(
                f"cannot create the export folder {quoted(parent, QUOTED_PATH_CHARS)}: {exc.strerror or exc}"
            ) from None
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        with self.lock.hold("ExportModel", SERVICE):
            try:
                t0 = time.perf_counter()
                manifest, prompts = self._manifest(set_id, params, fmt, caller, baseline)  # unedited weights here
                timings["manifest"] = time.perf_counter() - t0
                if fmt == "merged":
                    t0 = time.perf_counter()
                    self.engine.set_directions(ds)
                    self.engine.apply(params)
                    timings["ablate"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    export_merged(self.lm, tmp, metadata)
                    timings["save"] = time.perf_counter() - t0
                else:
                    t0 = time.perf_counter()
                    factors = lora.lora_factors(
                        self.lm.model,
                        self.engine.ablator,
                        ds.refusal,
                        params,
                        protected_subspace(ds),
                        ds.subspace,
                        ds.calibration,
                    )
                    timings["ablate"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    os.makedirs(tmp)
                    lora.write_adapter(tmp, factors, self.lm.spec.source, metadata)
                    timings["save"] = time.perf_counter() - t0
                write_export_files(tmp, manifest, prompts, self._held_bytes(set_id))
                _swap_into_place(tmp, path)
            except OSError as exc:  # disk full, permissions: say so, never INTERNAL
                shutil.rmtree(tmp, ignore_errors=True)
                raise FailedPrecondition(
                    f"writing the export to {quoted(path, QUOTED_PATH_CHARS)} failed: {exc.strerror or exc}"
                ) from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                self.engine.reset()
        files, size = [], 0
        for root, _, names in os.walk(path):
            for name in names:
                full = os.path.join(root, name)
                files.append(os.path.relpath(full, path))
                size += os.path.getsize(full)
        hub_url = ""
        if hub_repo is not None:
            t0 = time.perf_counter()
            hub_url = _push(path, hub_repo, hub_private, token)
            timings["push"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        log.info("exported", extra={"path": path, "format": fmt, "bytes": size, "hub_url": hub_url})
        return ExportResult(path, sorted(files), size, hub_url, timings)


def _caller_manifest_fields(text: str) -> dict[str, Any]:
    """The caller's part of an export manifest: a JSON object whose keys are not the evaluator's own."""
    fields = parse_json_object(text, "manifest_json")
    clash = sorted(set(fields) & EVALUATOR_MANIFEST_KEYS)
    if clash:
        raise InvalidArgument(f"manifest_json sets {', '.join(clash)}, which the evaluator writes itself")
    return fields


def _swap_into_place(tmp: str, path: str) -> None:
    """Move the finished export ``tmp`` to ``path``, replacing what was there."""
    if os.path.isdir(path):
        old = f"{tmp}.old"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def _push(path: str, repo: str, private: bool, token: str) -> str:
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=path, repo_id=repo, commit_message="abliterate export")
    except Exception as exc:  # noqa: BLE001 - the export itself is on disk; say why the push failed
        raise FailedPrecondition(
            f"the export is at {path}, but pushing it to {repo} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return str(url)

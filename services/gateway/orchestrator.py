"""Drives jobs: one thread per running job, EXTRACTING -> OPTIMIZING -> a terminal phase.

- EXTRACTING: the extractor's ExtractDirections stream; progress becomes job
  events; the direction set (bytes and id), diagnostics and model info are
  stored with the job. Skipped when the job already has its direction set.
- OPTIMIZING: CreateStudy on the optimizer (load_if_exists, so a resumed job
  re-attaches to its own study) and RunStudy (with history: trials that
  completed while the gateway was away are announced too, once). Each
  finished trial becomes a trial_finished event followed by the Pareto front
  the optimizer sent with it (Optuna's; the gateway keeps no second one); the
  job's counts, ETA and auto-selected trial are updated.
  A broken optimizer stream (UNAVAILABLE) is retried with back-off.
- SUCCEEDED when the study is DONE; FAILED (with an error event) on an
  error; CANCELLED by :meth:`Orchestrator.cancel`.

Runner writes go through a guard: once a runner is detached (cancel,
shutdown) nothing it does afterwards reaches the store. No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.protobuf import json_format

from abliterate.caps import DEFAULT_MAX_SPEC_BYTES, check_spec_size, check_trial_timeout
from abliterate.database import DEFAULT_PATIENCE_S, retry_through_outage
from abliterate.errors import (
    AbliterateError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    quoted,
)
from abliterate.params import WINSORIZE_SCOPES
from abliterate.rpc.clients import EvaluatorClient, ExtractorClient, OptimizerClient, ServiceClient
from abliterate.rpc.convert import (
    check_direction_method,
    judge_spec_from_pb,
    model_spec_from_pb,
    params_from_pb,
    params_to_pb,
    prompt_set_from_pb,
)
from abliterate.rpc.errors import status_name
from abliterate.rpc.tls import ClientTLS
from abliterate.v1 import (
    common_pb2,
    evaluator_pb2,
    extractor_pb2,
    gateway_pb2,
    optimizer_pb2,
)
from abliterate.warm_start import check_profile, resolve_profile, starting_params
from abliterate_services.gateway import events as ev
from abliterate_services.gateway.jobs import RUNNING_PHASES, JobRecord, JobStore, phase_name

log = logging.getLogger(__name__)
P = gateway_pb2
T = TypeVar("T")
ClientT = TypeVar("ClientT", bound=ServiceClient)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval")


# ------------------------------------------------------------------ validation


def _check_prompt_set(msg: common_pb2.PromptSetSpec, what: str) -> None:
    try:
        prompt_set_from_pb(msg)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc}") from None


def _profile_warm_start(job: JobRecord) -> list[common_pb2.AblationParams]:
    """The starting trials of the model family's warm-start profile (abliterate.warm_start), for a job
    that gives none of its own; empty for a cold start or a model whose info is unknown."""
    options = job.spec.options
    if job.model is None or not job.model.n_layers:
        return []
    profile = resolve_profile(options.warm_start_profile, job.model.model_type)
    if profile is None:
        return []
    components = list(job.model.components)
    space = options.search_space
    if space.components:
        # A search space limited to some components: a starting trial may only edit those.
        components = [name for name in components if name in space.components]
    starts = starting_params(profile, job.model.n_layers, components)
    if space.direction_scopes:
        # ... and only in the scopes it allows (the study could not tell a trial of another scope).
        allowed = {
            params_from_pb(common_pb2.AblationParams(direction_scope=value)).direction_scope
            for value in space.direction_scopes
        }
        starts = [params for params in starts if params.direction_scope in allowed]
    return [params_to_pb(params) for params in starts]


def validate_spec(spec: gateway_pb2.JobSpec) -> None:
    """Raise InvalidArgument for a spec that cannot run (checks that need no other service)."""
    # fullmatch: "$" alone also matches before a trailing newline.
    if spec.name and not NAME_RE.fullmatch(spec.name):
        raise InvalidArgument(f"job name {quoted(spec.name)} must be 1-100 characters of [A-Za-z0-9._-]")
    try:
        model_spec_from_pb(spec.model).validate()
    except InvalidArgument as exc:
        raise InvalidArgument(f"model: {exc}") from None
    for what in _PROMPT_SETS:
        if not spec.HasField(what):
            raise InvalidArgument(f"{what}: the prompt set is missing")
        _check_prompt_set(getattr(spec, what), what)
    if spec.n_trials < 1:
        raise InvalidArgument(f"n_trials must be at least 1, got {spec.n_trials}")
    if not math.isfinite(spec.kl_cap) or spec.kl_cap < 0:
        raise InvalidArgument(f"kl_cap must be a finite number >= 0, got {spec.kl_cap}")
    extraction = spec.options.extraction
    q = extraction.winsorize_quantile
    if q != 0 and not (0.5 < q < 1):
        raise InvalidArgument(f"options.extraction.winsorize_quantile must be 0 or in (0.5, 1), got {q}")
    if extraction.winsorize_scope and extraction.winsorize_scope not in WINSORIZE_SCOPES:
        raise InvalidArgument(
            f"options.extraction.winsorize_scope must be one of {list(WINSORIZE_SCOPES)}, "
            f"got {extraction.winsorize_scope[:40]!r}"
        )
    if extraction.orthogonalize_against_sacred and not extraction.sacred:
        raise InvalidArgument("options.extraction.orthogonalize_against_sacred needs sacred directions")
    check_direction_method(extraction, "options.extraction")
    check_profile(spec.options.warm_start_profile)
    check_trial_timeout(spec.options.trial_timeout_s, "options.trial_timeout_s")
    if spec.options.HasField("judge"):
        try:
            judge_spec_from_pb(spec.options.judge)
        except InvalidArgument as exc:
            raise InvalidArgument(f"options.judge: {exc}") from None


def _spec_settings_json(spec: gateway_pb2.JobSpec) -> str:
    return json.dumps(
        {"job_name": spec.name, "job_spec": json_format.MessageToDict(spec, preserving_proto_field_name=True)}
    )


# ------------------------------------------------------------------ runner


class _Detached(Exception):
    """The runner was detached (cancel or shutdown): stop quietly."""


class _Runner:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.active = True
        self.guard = threading.Lock()
        self.call: Any = None
        self.thread: threading.Thread | None = None
        self.started = time.monotonic()

    def detach(self) -> None:
        with self.guard:
            self.active = False
            call = self.call
        if call is not None:
            try:
                call.cancel()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def check(self) -> None:
        if not self.active:
            raise _Detached()


class Orchestrator:
    """Runs jobs against the extractor, the optimizer and the evaluators."""

    def __init__(
        self,
        store: JobStore,
        bus: ev.EventBus,
        extractor_address: str,
        optimizer_address: str,
        evaluator_addresses: list[str],
        service_token: str | None = None,
        rpc_timeout_s: float = 120.0,
        retry_window_s: float = 600.0,
        retry_backoff_s: float = 1.0,
        database_patience_s: float = DEFAULT_PATIENCE_S,
        *,
        service_tls: ClientTLS | None = None,
        max_spec_bytes: int = DEFAULT_MAX_SPEC_BYTES,
    ) -> None:
        self.max_spec_bytes = max_spec_bytes
        self.store = store
        self.bus = bus
        self.extractor_address = extractor_address
        self.optimizer_address = optimizer_address
        self.evaluator_addresses = [a for a in evaluator_addresses if a]
        self.service_token = service_token or None
        self.service_tls = service_tls
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_window_s = retry_window_s
        self.retry_backoff_s = retry_backoff_s
        self.database_patience_s = database_patience_s
        self._lock = threading.RLock()
        self._runners: dict[str, _Runner] = {}
        self._clients: dict[tuple[type, str], ServiceClient] = {}
        self._closed = False

    # ------------------------------------------------------------- clients

    def _client(self, kind: type[ClientT], address: str) -> ClientT:
        """One client (one channel) per service address, reused by every job."""
        with self._lock:
            client = self._clients.get((kind, address))
            if client is None:
                client = self._clients[(kind, address)] = kind(address, token=self.service_token, tls=self.service_tls)
            return client  # type: ignore[return-value]

    def extractor(self) -> ExtractorClient:
        if not self.extractor_address:
            raise FailedPrecondition("the gateway has no extractor address configured")
        return self._client(ExtractorClient, self.extractor_address)

    def optimizer(self) -> OptimizerClient:
        if not self.optimizer_address:
            raise FailedPrecondition("the gateway has no optimizer address configured")
        return self._client(OptimizerClient, self.optimizer_address)

    def evaluator(self, address: str) -> EvaluatorClient:
        return self._client(EvaluatorClient, address)

    # ------------------------------------------------------------- job API

    def submit(self, spec: gateway_pb2.JobSpec) -> JobRecord:
        check_spec_size(spec.ByteSize(), self.max_spec_bytes)
        validate_spec(spec)
        self._check_served_model(spec.model)
        job = self.store.create_job(spec)
        self.bus.publish(job.id, ev.phase_event(P.JOB_PHASE_UNSPECIFIED, P.JOB_PHASE_QUEUED, "submitted"))
        self.start(job.id)
        return self.store.get(job.id)

    #: How long SubmitJob waits for a backend's ModelInfo before accepting the job unchecked.
    MODEL_CHECK_TIMEOUT_S = 5.0

    def _check_served_model(self, wanted_pb: common_pb2.ModelSpec) -> None:
        """Refuse at submission a job whose model the extractor or an evaluator does not serve (a
        FAILED job afterwards is a worse answer). A backend that does not answer is not asked again
        here: the job's run then reports it, as for any outage."""
        wanted = model_spec_from_pb(wanted_pb)
        backends: list[tuple[str, Callable[[], ServiceClient]]] = []
        if self.extractor_address:
            backends.append((f"the extractor at {self.extractor_address}", self.extractor))
        for address in self.evaluator_addresses:
            backends.append((f"the evaluator at {address}", lambda a=address: self.evaluator(a)))
        for name, client in backends:
            try:
                info = client().model_info(self.MODEL_CHECK_TIMEOUT_S)
            except AbliterateError as exc:  # unreachable, still loading, no model yet
                log.info("model check at submission skipped for %s: %s", name, exc)
                continue
            if not info.HasField("spec") or not info.spec.source:
                continue
            loaded = model_spec_from_pb(info.spec)
            if loaded.dtype == "auto" and info.dtype:
                loaded = dataclasses.replace(loaded, dtype=info.dtype)
            mismatch = wanted.load_mismatch(loaded)
            if mismatch:
                raise FailedPrecondition(f"{name} cannot serve this job's model: {mismatch}")

    def start(self, job_id: str) -> None:
        with self._lock:
            if self._closed:
                raise Unavailable("the gateway is shutting down")
            if job_id in self._runners:
                return
            runner = _Runner(job_id)
            self._runners[job_id] = runner
            runner.thread = threading.Thread(target=self._run, args=(runner,), name=f"job-{job_id[:8]}", daemon=True)
            runner.thread.start()

    def n_running(self) -> int:
        """Jobs this gateway drives now (one thread each)."""
        with self._lock:
            return len(self._runners)

    def is_running(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._runners

    def cancel(self, id_or_name: str) -> JobRecord:
        job = self.store.get(id_or_name)
        if job.terminal:
            raise FailedPrecondition(f"job {job.name} is already {phase_name(job.phase)}")
        with self._lock:
            runner = self._runners.pop(job.id, None)
        if runner is not None:
            runner.detach()
        if job.study_name:
            try:
                self.optimizer().stop_study(job.study_name, abandon_running=True, timeout_s=self.rpc_timeout_s)
            except AbliterateError as exc:
                log.warning("StopStudy %s failed: %s", job.study_name, exc)
        self._transition(job.id, P.JOB_PHASE_CANCELLED, "cancelled")
        return self.store.get(job.id)

    def resume(self, id_or_name: str, n_trials: int | None = None) -> JobRecord:
        job = self.store.get(id_or_name)
        if self.is_running(job.id):
            raise FailedPrecondition(f"job {job.name} is running ({phase_name(job.phase)})")
        if n_trials is not None and n_trials < job.spec.n_trials:
            raise InvalidArgument(f"n_trials {n_trials} is below the job's current target {job.spec.n_trials}")
        if job.phase == P.JOB_PHASE_SUCCEEDED and (n_trials is None or n_trials <= job.spec.n_trials):
            raise FailedPrecondition(f"job {job.name} already SUCCEEDED; pass a larger n_trials to run more")
        if n_trials is not None and n_trials != job.spec.n_trials:
            spec = gateway_pb2.JobSpec()
            spec.CopyFrom(job.spec)
            spec.n_trials = n_trials
            self.store.update(job.id, spec=spec)
        self._transition(job.id, P.JOB_PHASE_QUEUED, "resumed", error="")
        self.start(job.id)
        return self.store.get(job.id)

    def recover(self, resume: bool = True) -> list[str]:
        """At startup: resume jobs left in a running phase (or mark them INTERRUPTED)."""
        ids = []
        for job in self.store.jobs_in_phases(RUNNING_PHASES):
            if resume:
                self.bus.publish(
                    job.id,
                    ev.progress_event(common_pb2.Progress(phase="gateway", message="gateway restarted; job resumed")),
                )
                self.start(job.id)
            else:
                self._transition(job.id, P.JOB_PHASE_INTERRUPTED, "the gateway restarted while the job ran")
            ids.append(job.id)
        return ids

    def shutdown(self) -> None:
        """Detach every runner; jobs keep their phase (the next gateway resumes them)."""
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
            self._runners.clear()
        for runner in runners:
            runner.detach()
        for runner in runners:
            if runner.thread is not None:
                runner.thread.join(timeout=5)
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    # --------------------------------------------------------- store writes

    def _store_call(self, function: Callable[[], T], what: str) -> T:
        """A job-store call of a runner, retried through a database outage (so a blip does not strand
        or fail the job); UNAVAILABLE once ``database_patience_s`` runs out."""
        return retry_through_outage(function, what=what, patience_s=self.database_patience_s)

    def _transition(
        self, job_id: str, phase: int, message: str = "", runner: _Runner | None = None, **fields: Any
    ) -> None:
        def write() -> None:
            # The event first, then the phase: a watcher ends once the job is terminal and it has seen
            # every stored event, so the terminal event must be stored before the phase says so.
            job = self.store.get(job_id)
            if job.phase != phase:
                self.store.append_event(job_id, ev.phase_event(job.phase, phase, message))
            self.store.update(job_id, phase=phase, **fields)
            self.bus.notify(job_id)

        if runner is None:
            self._store_call(write, f"job {job_id}: phase change")
            return
        with runner.guard:
            runner.check()
            self._store_call(write, f"job {job_id}: phase change")

    def _write(self, runner: _Runner, event: gateway_pb2.JobEvent | None = None, **fields: Any) -> None:
        def write() -> None:
            if fields:
                self.store.update(runner.job_id, **fields)
            if event is not None:
                self.bus.publish(runner.job_id, event)

        with runner.guard:
            runner.check()
            self._store_call(write, f"job {runner.job_id}: update")

    def _set_call(self, runner: _Runner, call: Any) -> None:
        with runner.guard:
            runner.call = call
            if not runner.active:
                call.cancel()
                raise _Detached()

    # --------------------------------------------------------------- runner

    def _run(self, runner: _Runner) -> None:
        job_id = runner.job_id
        try:
            job = self._store_call(lambda: self.store.get(job_id), f"job {job_id}: reading it")
            blob = (
                self._store_call(lambda: self.store.get_artifact(job.direction_set_id), "reading directions")
                if job.direction_set_id
                else None
            )
            if blob is None:
                self._transition(job_id, P.JOB_PHASE_EXTRACTING, "extracting directions", runner=runner)
                blob = self._retrying(runner, "extractor", lambda: self._extract(runner, job))
                job = self._store_call(lambda: self.store.get(job_id), f"job {job_id}: reading it")
            self._transition(
                job_id,
                P.JOB_PHASE_OPTIMIZING,
                f"direction set {job.direction_set_id[:12]}; running the study to {job.spec.n_trials} trials",
                runner=runner,
            )
            self._optimize(runner, job, blob)
        except _Detached:
            log.info("job %s runner detached", job_id)
        except Exception as exc:  # noqa: BLE001 - any error fails the job, never the gateway
            if not runner.active:
                return
            if not isinstance(exc, AbliterateError):
                log.exception("job %s failed", job_id)
            code = status_name(exc)
            message = str(exc) or type(exc).__name__
            try:
                self._write(runner, ev.error_event(code, message, recoverable=False))
                self._transition(
                    job_id,
                    P.JOB_PHASE_FAILED,
                    f"{code}: {message}",
                    runner=runner,
                    error=f"{code}: {message}",
                    eta_s=None,
                )
            except _Detached:
                pass
        finally:
            with self._lock:
                if self._runners.get(job_id) is runner:
                    del self._runners[job_id]

    def _extract(self, runner: _Runner, job: JobRecord) -> bytes:
        spec = job.spec
        request = extractor_pb2.ExtractDirectionsRequest(
            harmful=spec.harmful_train, harmless=spec.harmless_train, options=spec.options.extraction, model=spec.model
        )
        if not request.options.label_markers:
            # Replies that label prompts (probe, compliance) are judged as the job's trials judge them.
            request.options.label_markers.extend(spec.options.refusal_markers)
        call = self.extractor().extract(request)
        self._set_call(runner, call)
        result = None
        try:
            for response in call:
                runner.check()
                kind = response.WhichOneof("event")
                if kind == "progress":
                    self._write(runner, ev.progress_event(response.progress))
                elif kind == "result":
                    result = response.result
        except AbliterateError:
            runner.check()
            raise
        runner.check()
        if result is None:
            raise Unavailable("the extractor stream ended without a direction set")
        data = result.directions.safetensors
        digest = hashlib.sha256(data).hexdigest()
        if result.direction_set_id and digest != result.direction_set_id:
            raise InvalidArgument("the extractor's direction set does not match its sha256")
        self._store_call(lambda: self.store.put_artifact(digest, data), "storing directions")
        model_info = None
        try:
            model_info = self.extractor().model_info(self.rpc_timeout_s)
        except AbliterateError as exc:
            log.warning("GetModelInfo on the extractor failed: %s", exc)
        fields: dict[str, Any] = dict(direction_set_id=digest, diagnostics=list(result.layers))
        if result.HasField("cones") or result.top_heads or result.HasField("labels"):
            fields["methods"] = extractor_pb2.MethodSummary(
                cones=result.cones if result.HasField("cones") else None,
                top_heads=list(result.top_heads),
                labels=result.labels if result.HasField("labels") else None,
            )
        if model_info is not None:
            fields["model"] = model_info
        self._write(
            runner,
            ev.progress_event(
                common_pb2.Progress(
                    phase="directions",
                    done=1,
                    total=1,
                    message=f"direction set {digest[:12]} from {result.n_harmful} harmful and "
                    f"{result.n_harmless} harmless prompts",
                )
            ),
            **fields,
        )
        return data

    def _create_study(self, job: JobRecord, blob: bytes) -> str:
        spec = job.spec
        study_name = job.study_name or job.id
        options = spec.options
        request = optimizer_pb2.CreateStudyRequest(
            study_name=study_name,
            direction_set_id=job.direction_set_id,
            directions=common_pb2.TensorBlob(safetensors=blob, sha256=job.direction_set_id),
            baseline=common_pb2.BaselineSpec(
                kl_prompts=spec.harmless_eval,
                refusal_prompts=spec.harmful_eval,
                max_new_tokens=spec.max_new_tokens,
                kl_tokens=options.kl_tokens,
                refusal_markers=list(options.refusal_markers),
                model=spec.model,
                judge=options.judge if options.HasField("judge") else None,
            ),
            n_trials=spec.n_trials,
            evaluator_addresses=self.evaluator_addresses,
            job_settings_json=_spec_settings_json(spec),
            warm_start=list(options.warm_start) or _profile_warm_start(job),
            trial_timeout_s=options.trial_timeout_s,
            max_trial_retries=options.max_trial_retries,
            disable_pruning=options.disable_pruning,
            load_if_exists=True,
        )
        if options.HasField("search_space"):
            request.search_space.CopyFrom(options.search_space)
        if spec.HasField("seed"):
            request.seed = spec.seed
        self.optimizer().create_study(request, self.rpc_timeout_s)
        return study_name

    def _announced_trials(self, job_id: str) -> set[int]:
        numbers: set[int] = set()
        after = 0
        while True:
            batch = self._store_call(lambda: self.store.events_after(job_id, after), "reading events")
            if not batch:
                return numbers
            for event in batch:
                if event.WhichOneof("event") == "trial_finished":
                    numbers.add(event.trial_finished.trial.number)
            after = batch[-1].sequence

    def _retrying(self, runner: _Runner, what: str, fn: Any) -> Any:
        """``fn()``, retried with back-off while it raises Unavailable (a service still loading, busy or
        restarting), for at most ``retry_window_s`` seconds; each retry is a recoverable error event."""
        deadline = time.monotonic() + self.retry_window_s
        attempt = 0
        while True:
            runner.check()
            try:
                return fn()
            except Unavailable as exc:
                runner.check()
                attempt += 1
                delay = min(15.0, self.retry_backoff_s * 2 ** min(attempt - 1, 10))
                if time.monotonic() + delay > deadline:
                    raise
                self._write(
                    runner, ev.error_event("UNAVAILABLE", f"{what}: {exc}; retrying in {delay:.0f}s", recoverable=True)
                )
                end = time.monotonic() + delay
                while time.monotonic() < end:
                    runner.check()
                    time.sleep(0.05)

    def _optimize(self, runner: _Runner, job: JobRecord, blob: bytes) -> None:
        announced = self._announced_trials(job.id)
        state = {"job": job}

        def attempt() -> None:
            current = state["job"]
            study_name = self._create_study(current, blob)
            if current.study_name != study_name:
                self._write(runner, study_name=study_name)
                state["job"] = current = self._store_call(lambda: self.store.get(current.id), "reading the job")
            if not self._follow_study(runner, current, announced):
                raise Unavailable("the optimizer's study stream ended before the study did")

        self._retrying(runner, "optimizer", attempt)

    def _follow_study(self, runner: _Runner, job: JobRecord, announced: set[int]) -> bool:
        """Follow RunStudy; True when the study ended (job in a terminal phase)."""
        kl_cap = ev.effective_kl_cap(job.spec)
        call = self.optimizer().run_study(job.study_name, include_history=True)
        self._set_call(runner, call)
        run_started = time.monotonic()
        completed_this_run = 0
        try:
            for response in call:
                runner.check()
                event = response.event
                kind = event.WhichOneof("event")
                if kind == "trial_finished":
                    tf = event.trial_finished
                    if tf.trial.number in announced:
                        continue
                    completed_this_run += 1
                    self._on_trial_finished(runner, job, tf, kl_cap, run_started, completed_this_run)
                    # Only once its event is stored: when the gateway's store fails during
                    # _on_trial_finished, the re-attached stream's history announces it.
                    announced.add(tf.trial.number)
                elif kind == "trial_failed":
                    tf = event.trial_failed
                    # The counts arrive with the next trial_finished or done event.
                    self._write(
                        runner,
                        gateway_pb2.JobEvent(
                            trial_failed=gateway_pb2.JobTrialFailed(
                                number=tf.number, evaluator=tf.evaluator, error=tf.error, will_retry=tf.will_retry
                            )
                        ),
                    )
                elif kind == "trial_retried":
                    tr = event.trial_retried
                    self._write(
                        runner,
                        ev.progress_event(
                            common_pb2.Progress(
                                phase="retry",
                                message=f"trial {tr.failed_number} re-enqueued as trial {tr.new_number} "
                                f"(attempt {tr.attempt})",
                            )
                        ),
                    )
                elif kind == "progress":
                    self._write(runner, ev.progress_event(event.progress))
                elif kind == "done":
                    self._on_done(runner, job, event.done, kl_cap)
                    return True
        except _Detached:
            raise
        except AbliterateError:
            runner.check()
            raise
        runner.check()
        return False

    def _list_trials(self, study_name: str, pareto_only: bool = False) -> list[common_pb2.Trial]:
        return self.optimizer().list_trials(study_name, pareto_only, self.rpc_timeout_s)

    def _on_trial_finished(
        self,
        runner: _Runner,
        job: JobRecord,
        tf: optimizer_pb2.TrialFinished,
        kl_cap: float,
        run_started: float,
        completed_this_run: int,
    ) -> None:
        """Store the trial and the front the optimizer sent with it (no call back to the optimizer)."""
        n_target = tf.n_trials or job.spec.n_trials  # the study's target is the one that counts
        eta = tf.eta_s if tf.HasField("eta_s") else None
        if eta is None and completed_this_run > 0:
            per_trial = (time.monotonic() - run_started) / completed_this_run
            eta = per_trial * max(0, n_target - tf.n_complete)
        finished = gateway_pb2.JobEvent(
            trial_finished=gateway_pb2.JobTrialFinished(trial=tf.trial, n_complete=tf.n_complete, n_trials=n_target)
        )
        if eta is not None:
            finished.eta_s = eta
        front = ev.front_message(tf.front_trials, kl_cap)
        front_event = gateway_pb2.JobEvent(pareto_front=front)
        if eta is not None:
            front_event.eta_s = eta
        auto = front.auto_selected_trial if front.HasField("auto_selected_trial") else None
        self._write(
            runner,
            finished,
            n_trials_complete=tf.n_complete,
            n_trials_failed=tf.n_failed,
            eta_s=eta,
            auto_selected_trial=auto,
        )
        self._write(runner, front_event)

    def _audit_after_study(self, runner: _Runner, job: JobRecord, kl_cap: float) -> dict[str, Any]:
        """The job's requested audit of its front; progress events around it, the new auto-selection."""
        options = job.spec.options
        self._write(
            runner,
            ev.progress_event(
                common_pb2.Progress(phase="audit", done=0, total=1, message="auditing the Pareto front on long replies")
            ),
        )
        try:
            audited = self.audit(
                gateway_pb2.AuditJobRequest(
                    job_id=job.id,
                    min_new_tokens=options.audit_min_new_tokens,
                    max_new_tokens=options.audit_max_new_tokens,
                )
            )
        except AbliterateError as exc:
            log.warning("audit of job %s failed: %s", job.name, exc)
            message = f"audit failed ({exc}); run AuditJob again"
            self._write(runner, ev.progress_event(common_pb2.Progress(phase="audit", done=0, total=1, message=message)))
            return {}
        message = f"{len(audited.trials)} Pareto trials audited"
        self._write(runner, ev.progress_event(common_pb2.Progress(phase="audit", done=1, total=1, message=message)))
        front = ev.front_message(self._job_trials(job, pareto_only=True), kl_cap)
        return {"auto_selected_trial": front.auto_selected_trial if front.HasField("auto_selected_trial") else None}

    def _on_done(self, runner: _Runner, job: JobRecord, done: optimizer_pb2.StudyDone, kl_cap: float) -> None:
        fields: dict[str, Any] = dict(n_trials_complete=done.n_complete, n_trials_failed=done.n_failed, eta_s=None)
        try:
            front = ev.front_message(self._list_trials(job.study_name, pareto_only=True), kl_cap)
            fields["auto_selected_trial"] = front.auto_selected_trial if front.HasField("auto_selected_trial") else None
        except AbliterateError as exc:
            log.warning("ListTrials after the study ended failed: %s", exc)
        state = done.state
        if state == optimizer_pb2.STUDY_STATE_DONE:
            if job.spec.options.audit_front:
                fields.update(self._audit_after_study(runner, job, kl_cap))
            self._transition(job.id, P.JOB_PHASE_SUCCEEDED, f"{done.n_complete} trials scored", runner=runner, **fields)
        elif state == optimizer_pb2.STUDY_STATE_STOPPED:
            # CancelJob detaches the runner before it stops the study, so a STOPPED seen here comes from
            # the optimizer itself (shutdown or restart): re-attach once it is back, as RunStudy resumes.
            raise Unavailable(f"the optimizer stopped the study ({done.message or 'shutdown'})")
        else:
            message = done.message or "the study failed"
            self._write(runner, ev.error_event("FAILED_PRECONDITION", message))
            self._transition(job.id, P.JOB_PHASE_FAILED, message, runner=runner, error=message, **fields)

    # ---------------------------------------------------- fronts, export, chat

    def pareto_front(self, id_or_name: str, kl_cap: float | None = None) -> gateway_pb2.ParetoFront:
        job = self.store.get(id_or_name)
        cap = ev.effective_kl_cap(job.spec, kl_cap)
        if not job.study_name:
            return ev.front_message([], cap)
        return ev.front_message(self._job_trials(job, pareto_only=True), cap)

    def _job_trials(self, job: JobRecord, pareto_only: bool = False) -> list[common_pb2.Trial]:
        """The study's trials with the audits this gateway stored for them."""
        trials = self._list_trials(job.study_name, pareto_only)
        audits = self._store_call(lambda: self.store.audits(job.id), "reading audits")
        for trial in trials:
            if trial.number in audits:
                trial.audit.CopyFrom(audits[trial.number])
        return trials

    def audit(self, request: gateway_pb2.AuditJobRequest) -> gateway_pb2.AuditJobResponse:
        """Audit the front (or one trial) on an evaluator, one trial after another; store each audit."""
        job = self.store.get(request.job_id)
        if request.HasField("trial_number"):
            trials = [self.resolve_trial(job, request.trial_number)]
        else:
            if not job.study_name:
                raise FailedPrecondition(f"job {job.name} has no study yet (phase {phase_name(job.phase)})")
            trials = self._job_trials(job, pareto_only=True)
            if not trials:
                raise FailedPrecondition(f"job {job.name} has no scored trial to audit yet")
        forward = evaluator_pb2.AuditTrialRequest(
            direction_set_id=job.direction_set_id,
            min_new_tokens=request.min_new_tokens,
            max_new_tokens=request.max_new_tokens,
            model=job.spec.model,
            prompts=request.prompts if request.HasField("prompts") else job.spec.harmful_eval,
        )
        judge = request.judge if request.HasField("judge") else job.spec.options.judge
        if request.HasField("judge") or job.spec.options.HasField("judge"):
            try:
                judge_spec_from_pb(judge)
            except InvalidArgument as exc:
                raise InvalidArgument(f"judge: {exc}") from None
            forward.judge.CopyFrom(judge)
        response, started = gateway_pb2.AuditJobResponse(), time.perf_counter()
        for trial in sorted(trials, key=lambda t: t.number):
            forward.params.CopyFrom(trial.params)

            def call(client: EvaluatorClient) -> Any:
                self._ensure_directions(client, job)
                return client.audit_trial(forward)

            result = self._on_evaluator(call)
            self._store_call(lambda: self.store.put_audit(job.id, trial.number, result.audit), "storing an audit")
            audited = response.trials.add()
            audited.CopyFrom(trial)
            audited.audit.CopyFrom(result.audit)
        response.timings_s["audit"] = response.timings_s["total"] = time.perf_counter() - started
        return response

    def resolve_trial(self, job: JobRecord, number: int | None) -> common_pb2.Trial:
        if not job.study_name:
            raise FailedPrecondition(f"job {job.name} has no study yet (phase {phase_name(job.phase)})")
        if number is None:
            chosen = ev.auto_select(self._job_trials(job, pareto_only=True), ev.effective_kl_cap(job.spec))
            if chosen is None:
                raise FailedPrecondition(f"job {job.name} has no COMPLETE trial yet")
            return chosen
        trials = self._job_trials(job)
        for trial in trials:
            if trial.number == number:
                # A PRUNED trial's parameters are whole: only its refusal count stopped at a bound.
                if trial.state not in (common_pb2.TRIAL_STATE_COMPLETE, common_pb2.TRIAL_STATE_PRUNED):
                    raise FailedPrecondition(
                        f"trial {number} of job {job.name} is {common_pb2.TrialState.Name(trial.state)}, "
                        "not COMPLETE (or PRUNED)"
                    )
                return trial
        raise NotFound(f"job {job.name} has no trial {number}")

    def _ensure_directions(self, client: EvaluatorClient, job: JobRecord) -> None:
        client.ensure_directions(job.direction_set_id, self.store.get_artifact, self.rpc_timeout_s)

    def _on_evaluator(self, fn: Any) -> Any:
        """Call ``fn(client)`` on the first evaluator that is not busy."""
        if not self.evaluator_addresses:
            raise FailedPrecondition("the gateway has no evaluator address configured")
        last: Exception | None = None
        for address in self.evaluator_addresses:
            try:
                return fn(self.evaluator(address))
            except Unavailable as exc:
                last = exc
        raise Unavailable(f"no evaluator is free ({last})")

    def export(
        self, request: gateway_pb2.GatewayServiceExportModelRequest
    ) -> gateway_pb2.GatewayServiceExportModelResponse:
        if not request.path:
            raise InvalidArgument("path is required")
        job = self.store.get(request.job_id)
        requested = request.trial_number if request.HasField("trial_number") else None
        trial = self.resolve_trial(job, requested)
        study = self.optimizer().get_study(job.study_name, self.rpc_timeout_s)
        forward = evaluator_pb2.EvaluatorServiceExportModelRequest(
            direction_set_id=job.direction_set_id,
            params=trial.params,
            path=request.path,
            format=request.format,
            hub_private=request.hub_private,
            overwrite=request.overwrite,
            manifest_json=json.dumps(_manifest_fields(job, trial, study, auto_selected=requested is None)),
            baseline=study.baseline,
        )
        if request.HasField("hub_repo"):
            forward.hub_repo = request.hub_repo

        def call(client: EvaluatorClient) -> Any:
            self._ensure_directions(client, job)
            return client.export_model(forward)

        result = self._on_evaluator(call)
        response = gateway_pb2.GatewayServiceExportModelResponse(
            trial_number=trial.number,
            path=result.path,
            files=list(result.files),
            bytes_written=result.bytes_written,
            hub_url=result.hub_url,
        )
        response.timings_s.update(result.timings_s)
        return response

    def chat(self, request: gateway_pb2.GatewayServiceChatRequest) -> Iterator[gateway_pb2.GatewayServiceChatResponse]:
        if not request.messages:
            raise InvalidArgument("messages is empty")
        job = self.store.get(request.job_id)
        forward = evaluator_pb2.EvaluatorServiceChatRequest(messages=list(request.messages), options=request.options)
        system_prompt = job.spec.model.system_prompt
        if system_prompt and request.messages[0].role != "system":
            del forward.messages[:]
            forward.messages.add(role="system", content=system_prompt)
            forward.messages.extend(request.messages)
        trial = None
        if not request.original_model:
            trial = self.resolve_trial(job, request.trial_number if request.HasField("trial_number") else None)
            forward.direction_set_id = job.direction_set_id
            forward.params.CopyFrom(trial.params)

        def start(client: EvaluatorClient) -> Any:
            if trial is not None:
                self._ensure_directions(client, job)
            stream = client.chat(forward)
            first = next(stream, None)  # surfaces UNAVAILABLE here, so the next evaluator is tried
            return first, stream

        first, stream = self._on_evaluator(start)
        for chunk in _chain([first] if first is not None else [], stream):
            out = gateway_pb2.GatewayServiceChatResponse(
                text=chunk.text, finish_reason=chunk.finish_reason, n_tokens=chunk.n_tokens
            )
            out.timings_s.update(chunk.timings_s)
            if trial is not None:
                out.trial_number = trial.number
            yield out


def _manifest_fields(
    job: JobRecord, trial: common_pb2.Trial, study: optimizer_pb2.StudyInfo, auto_selected: bool
) -> dict[str, Any]:
    """What the gateway adds to an export's manifest: the job, the trial's recorded scores, the seed."""
    scores = trial.scores
    return {
        "job": {
            "id": job.id,
            "name": job.name,
            "study_name": job.study_name,
            "spec": json_format.MessageToDict(job.spec, preserving_proto_field_name=True),
        },
        "trial": {
            "number": trial.number,
            "kl": scores.kl,
            "refusals": scores.refusals,
            "n_refusal_prompts": scores.n_refusal_prompts,
            "n_kl_prompts": scores.n_kl_prompts,
            "degenerate": scores.degenerate,
            "unjudged": scores.unjudged,
            "pruned": scores.pruned,  # then `refusals` is a lower bound
            "on_pareto_front": trial.on_pareto_front,
            "auto_selected": auto_selected,
        },
        "seed": study.seed,
        "audit": json_format.MessageToDict(trial.audit, preserving_proto_field_name=True)
        if trial.HasField("audit")
        else None,
    }


def _chain(first: list[Any], rest: Any) -> Iterator[Any]:
    yield from first
    yield from rest

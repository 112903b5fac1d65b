"""OptimizerService: thin RPC layer over ``study.py`` (storage) and ``dispatch.py`` (the loops)."""

from __future__ import annotations

import datetime as dt
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence

from optuna.trial import TrialState

from abliterate.blobs import open_blob_store
from abliterate.caps import check_trial_timeout
from abliterate.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    check_identifier,
)
from abliterate.rpc.clients import EvaluatorClient
from abliterate.rpc.convert import params_from_pb
from abliterate.rpc.metrics import Metrics
from abliterate.rpc.tensors import decode_tensors, sha256_hex
from abliterate.v1 import common_pb2, optimizer_pb2, optimizer_pb2_grpc
from abliterate_services.optimizer import study as st
from abliterate_services.optimizer.dispatch import DispatchOptions, StudyRunner
from abliterate_services.optimizer.search_space import SearchSpace

log = logging.getLogger(__name__)

#: A CreateStudy request's size apart from its direction set's tensors: job settings, baseline, search
#: space and warm starts (the gateway's job specs are at most 1 MiB).
MAX_STUDY_SETTINGS_BYTES = 2 << 20
#: Parameter sets a study may be warm-started with (each is validated and enqueued one by one).
MAX_WARM_START = 200

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
#: Evaluator states always shown by abliterate_optimizer_evaluators (0 when none is in them).
_WORKER_STATES = (
    "EVALUATOR_STATE_PREPARING",
    "EVALUATOR_STATE_IDLE",
    "EVALUATOR_STATE_BUSY",
    "EVALUATOR_STATE_UNREACHABLE",
)
#: Deadline of the health check and ModelInfo of RegisterEvaluator / CreateStudy.
_PROBE_TIMEOUT_S = 5.0


def check_address(address: str, what: str = "evaluator address") -> str:
    address = address.strip()
    if not _ADDRESS.match(address):
        raise InvalidArgument(f"{what} {address!r} is not host:port")
    return address


def method_dimensions_of(data: bytes) -> tuple[int, bool, int]:
    """What a direction set opens in the search space: directions per residual (k of its "subspace"
    tensor (L + 1, k, d), else 1), whether it holds "compliance" vectors, and how many heads its
    "head_scores" (L, n_heads) score (0: none)."""
    arrays, _ = decode_tensors(data)
    subspace = arrays.get("subspace")
    n_directions = 1 if subspace is None or subspace.ndim != 3 else int(subspace.shape[1])
    heads = arrays.get("head_scores")
    n_heads = 0 if heads is None or heads.ndim != 2 else int(heads.shape[0] * heads.shape[1])
    return n_directions, "compliance" in arrays, n_heads


def n_layers_of(data: bytes) -> int:
    """Depth L of a direction set: its "refusal" tensor has shape (L + 1, d)."""
    arrays, _ = decode_tensors(data)
    refusal = arrays.get("refusal")
    if refusal is None:
        raise InvalidArgument(f"the direction set has no 'refusal' tensor (it has {sorted(arrays)})")
    if refusal.ndim != 2 or refusal.shape[0] < 2:
        raise InvalidArgument(f"the 'refusal' tensor must have shape (L + 1, d), got {tuple(refusal.shape)}")
    return int(refusal.shape[0] - 1)


class OptimizerServicer(optimizer_pb2_grpc.OptimizerServiceServicer):
    """Owns the studies of one storage and their loops."""

    def __init__(
        self,
        storage_url: str,
        *,
        evaluator_addresses: Sequence[str] = (),
        blob_store: str | None = None,
        options: DispatchOptions | None = None,
    ) -> None:
        self.storage_url = storage_url
        self.options = options or DispatchOptions()
        # Direction-set bytes by sha256: the study database itself unless another store is named, so a
        # gateway (or a second optimizer) on the same database reads the same store.
        self.directions = open_blob_store(storage_url if blob_store is None else blob_store)
        self._global_evaluators: list[str] = [check_address(a) for a in evaluator_addresses if a.strip()]
        self._runners: dict[str, StudyRunner] = {}
        self._lock = threading.Lock()
        self._closed = False
        # Replaced by the server's own when build_server hands it over (register_metrics).
        self.metrics = Metrics()

    # ------------------------------------------------------------ metrics

    def register_metrics(self, metrics: Metrics) -> None:
        """Count trials into ``metrics`` and show the live loops' queue depth and evaluators in it."""
        self.metrics = metrics
        with self._lock:
            for runner in self._runners.values():
                runner.trial_metrics = metrics.trials
        metrics.add_gauges(
            "abliterate_optimizer_trials_queued",
            "Trials of a running study's target not yet dispatched to an evaluator "
            "(n_trials - scored (COMPLETE or PRUNED) - RUNNING)",
            ["study"],
            lambda: {(r.name,): r.n_queued for r in self._active_runners()},
        )
        metrics.add_gauges(
            "abliterate_optimizer_trials_in_flight",
            "Trials of a running study this optimizer has on an evaluator now",
            ["study"],
            lambda: {(r.name,): r.n_in_flight() for r in self._active_runners()},
        )
        metrics.add_gauges(
            "abliterate_optimizer_evaluators",
            "Evaluator threads of the running studies, by state (preparing, idle, busy, unreachable)",
            ["state"],
            self._evaluators_by_state,
        )

    def _active_runners(self) -> list[StudyRunner]:
        with self._lock:
            return [r for r in self._runners.values() if r.active]

    def _evaluators_by_state(self) -> dict[tuple[str, ...], float]:
        counts = {(name.removeprefix("EVALUATOR_STATE_").lower(),): 0.0 for name in _WORKER_STATES}
        for runner in self._active_runners():
            for state in runner.worker_states():
                key = (optimizer_pb2.EvaluatorState.Name(state).removeprefix("EVALUATOR_STATE_").lower(),)
                counts[key] = counts.get(key, 0.0) + 1
        return counts

    # ------------------------------------------------------------ helpers

    @property
    def storage(self):
        return st.open_storage(self.storage_url, self.options.heartbeat_interval_s, self.options.grace_period_s)

    def connect(self) -> None:
        """Open the storage and check it answers (raises Unavailable otherwise)."""
        try:
            st.ping_storage(self.storage)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"storage not reachable: {exc}") from exc

    def global_evaluators(self) -> list[str]:
        with self._lock:
            return list(self._global_evaluators)

    def runner(self, name: str) -> StudyRunner:
        if not name:
            raise InvalidArgument("study_name is required")
        check_identifier(name, "study_name")
        with self._lock:
            if self._closed:
                raise Unavailable("the optimizer is shutting down")
            runner = self._runners.get(name)
            if runner is None:
                runner = StudyRunner(
                    self.storage,
                    name,
                    self.directions,
                    self.options,
                    self.global_evaluators,
                    trial_metrics=self.metrics.trials,
                )
                self._runners[name] = runner
            return runner

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every loop; trials still in flight after ``grace_s`` stay RUNNING and are reclaimed on restart."""
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
        for runner in runners:
            runner.stop(abandon=False)
        deadline = time.monotonic() + grace_s
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))

    def _probe(self, address: str) -> common_pb2.ModelInfo:
        """Health SERVING and the ModelInfo of an evaluator (UNAVAILABLE when unreachable or not serving)."""
        with EvaluatorClient(
            address,
            token=self.options.token or None,
            max_message_bytes=self.options.max_message_bytes,
            tls=self.options.tls,
        ) as client:
            if not client.healthy(_PROBE_TIMEOUT_S):
                raise Unavailable(f"evaluator {address} is unreachable or not SERVING")
            return client.model_info(_PROBE_TIMEOUT_S)

    def _study_info(self, runner: StudyRunner) -> optimizer_pb2.StudyInfo:
        trials = runner.study.get_trials(deepcopy=False)
        settings = runner.settings
        c = st.counts(trials)
        front = st.pareto_front(runner.study)
        state = runner.current_state(st.n_scored(c))
        info = optimizer_pb2.StudyInfo(
            study_name=runner.name,
            state=state,
            direction_set_id=settings.direction_set_id,
            n_trials=settings.n_trials,
            n_complete=st.n_scored(c),
            n_pruned=c[TrialState.PRUNED],
            n_running=c[TrialState.RUNNING],
            n_failed=c[TrialState.FAIL],
            n_waiting=c[TrialState.WAITING],
            seed=settings.seed,
            search_space=settings.search_space.to_pb(),
            baseline=settings.baseline,
            evaluators=runner.evaluator_infos(trials),
            pareto_front=front,
            job_settings_json=settings.job_settings_json,
        )
        if settings.created_at:
            info.created_at.CopyFrom(st.timestamp(dt.datetime.fromisoformat(settings.created_at)))
        eta = st.eta_seconds(trials, settings.n_trials, runner.parallelism())
        if eta is not None:
            info.eta_s = eta
        return info

    # ------------------------------------------------------------ RPCs

    def CreateStudy(self, request, context):
        t0 = time.monotonic()
        # Everything but the direction set's tensors is settings kept in the study: a 10 MB system prompt
        # would be copied into every stored trial's job settings.
        settings_bytes = request.ByteSize() - len(request.directions.safetensors)
        if settings_bytes > MAX_STUDY_SETTINGS_BYTES:
            raise InvalidArgument(
                f"the study request is {settings_bytes} bytes without its direction set's tensors; "
                f"at most {MAX_STUDY_SETTINGS_BYTES}"
            )
        name = request.study_name.strip()
        if not name:
            raise InvalidArgument("study_name is required")
        check_identifier(name, "study_name")
        digest = request.direction_set_id.strip().lower()
        if not _SHA256.match(digest):
            raise InvalidArgument("direction_set_id must be a lower-case hex sha256 (64 characters)")
        if request.n_trials <= 0:
            raise InvalidArgument("n_trials must be > 0")
        job_settings = st.parse_job_settings(request.job_settings_json)
        timeout = check_trial_timeout(request.trial_timeout_s)
        if len(request.warm_start) > MAX_WARM_START:
            raise InvalidArgument(
                f"warm_start holds {len(request.warm_start)} parameter sets; at most {MAX_WARM_START}"
            )
        addresses = [check_address(a) for a in request.evaluator_addresses if a.strip()]
        blob = request.directions
        data = None
        if blob.safetensors:
            actual = sha256_hex(blob.safetensors)
            if actual != digest or (blob.sha256 and blob.sha256.lower() != actual):
                raise InvalidArgument(f"the directions hash to {actual}, not direction_set_id {digest}")
            data = bytes(blob.safetensors)
            n_layers = n_layers_of(data)  # validates before anything is stored
            self.directions.put(data)
        else:
            data = self.directions.get(digest)
        storage = self.storage
        t_storage = time.monotonic()
        exists = st.study_exists(storage, name)
        timings = {"storage": time.monotonic() - t_storage}
        if exists:
            if not request.load_if_exists:
                raise AlreadyExists(f"study {name!r} already exists")
            created = False
            runner = self._load_existing(name, digest, request, addresses)
        else:
            if data is None:
                raise NotFound(f"direction set {digest} is not held by this optimizer: send its bytes")
            n_layers = n_layers_of(data)
            if (
                not request.HasField("baseline")
                or not request.baseline.HasField("kl_prompts")
                or not request.baseline.HasField("refusal_prompts")
            ):
                raise InvalidArgument("baseline with kl_prompts and refusal_prompts is required")
            model = self._model_of(addresses)
            if model is not None and model.n_layers != n_layers:
                raise FailedPrecondition(
                    f"the direction set fits {n_layers} layers but the evaluators' model has {model.n_layers}"
                )
            space = SearchSpace.from_pb(
                request.search_space if request.HasField("search_space") else None,
                n_layers,
                list(model.components) if model is not None else None,
            ).with_methods(*method_dimensions_of(data))
            warm = []
            for i, msg in enumerate(request.warm_start):
                params = params_from_pb(msg)
                try:
                    params.validate(n_layers, list(space.components))
                except InvalidArgument as exc:
                    raise InvalidArgument(f"warm_start[{i}]: {exc}") from exc
                warm.append((params, space.to_optuna_params(params)))
            settings = st.StudySettings(
                direction_set_id=digest,
                n_trials=int(request.n_trials),
                seed=int(request.seed) if request.HasField("seed") else st.random_seed(),
                search_space=space,
                baseline=request.baseline,
                job_settings_json=request.job_settings_json if request.job_settings_json.strip() else "{}",
                trial_timeout_s=timeout or st.DEFAULT_TRIAL_TIMEOUT_S,
                max_trial_retries=int(request.max_trial_retries) or st.DEFAULT_MAX_TRIAL_RETRIES,
                prune_dominated=not request.disable_pruning,
                evaluator_addresses=addresses,
                model=(
                    {
                        "architecture": model.architecture,
                        "n_layers": model.n_layers,
                        "components": list(model.components),
                        "source": model.spec.source,
                    }
                    if model is not None
                    else None
                ),
            )
            t_storage = time.monotonic()
            try:
                study = st.create_study(storage, name, settings, job_settings)
            except AlreadyExists:
                if not request.load_if_exists:
                    raise
                created = False
                runner = self._load_existing(name, digest, request, addresses)
            else:
                for params, values in warm:
                    study.enqueue_trial(values, user_attrs={"params": params.to_dict(), "warm_start": True})
                created = True
                runner = self.runner(name)
            timings["storage"] += time.monotonic() - t_storage
        log.info("study %s %s", name, "created" if created else "loaded")
        timings["total"] = time.monotonic() - t0
        return optimizer_pb2.CreateStudyResponse(study=self._study_info(runner), created=created, timings_s=timings)

    def _load_existing(self, name: str, digest: str, request, addresses: list[str]) -> StudyRunner:
        runner = self.runner(name)
        with runner._lock:  # noqa: SLF001 - settings writes go through the study's lock
            study, settings = st.load_study(self.storage, name)
            if settings.direction_set_id != digest:
                raise FailedPrecondition(f"study {name!r} uses direction set {settings.direction_set_id}, not {digest}")
            changed = False
            if request.n_trials and request.n_trials != settings.n_trials:
                settings.n_trials = int(request.n_trials)
                changed = True
            for address in addresses:
                if address not in settings.evaluator_addresses:
                    settings.evaluator_addresses.append(address)
                    changed = True
            if changed:
                st.write_settings(study, settings)
            runner.settings = settings
        for address in addresses:
            runner.admit(address)
        return runner

    def _model_of(self, addresses: list[str]) -> common_pb2.ModelInfo | None:
        """The model of the first evaluator that answers (None when none does)."""
        for address in addresses:
            try:
                return self._probe(address)
            except Exception as exc:  # noqa: BLE001 - best effort
                log.info("evaluator %s did not answer ModelInfo at CreateStudy: %s", address, exc)
        return None

    def RunStudy(self, request, context) -> Iterator[optimizer_pb2.RunStudyResponse]:
        runner = self.runner(request.study_name)
        q = runner.subscribe()
        try:
            if request.include_history:
                trials = runner.storage_call(lambda: runner.study.get_trials(deepcopy=False), "reading history")
                front = st.pareto_front(runner.study)
                n_complete = 0
                for t in sorted(trials, key=lambda t: t.number):
                    if t.state not in st.SCORED_STATES:
                        continue
                    n_complete += 1
                    yield optimizer_pb2.RunStudyResponse(
                        event=optimizer_pb2.TrialEvent(
                            time=st.timestamp(t.datetime_complete),
                            trial_finished=st.trial_finished(t, trials, front, runner.settings, n_complete=n_complete),
                        )
                    )
            if not runner.start():
                trials = runner.storage_call(lambda: runner.study.get_trials(deepcopy=False), "counting trials")
                c = st.counts(trials)
                yield optimizer_pb2.RunStudyResponse(
                    event=optimizer_pb2.TrialEvent(
                        time=st.timestamp(),
                        done=optimizer_pb2.StudyDone(
                            state=optimizer_pb2.STUDY_STATE_DONE,
                            n_complete=st.n_scored(c),
                            n_failed=c[TrialState.FAIL],
                            pareto_front=st.pareto_front(runner.study),
                            timings_s={"total": 0.0},
                        ),
                    )
                )
                return
            run_id = runner.run_id
            while True:
                try:
                    event_run, event = q.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if event_run != run_id:
                    continue  # the end of an earlier run
                yield optimizer_pb2.RunStudyResponse(event=event)
                if event.HasField("done"):
                    return
        finally:
            runner.unsubscribe(q)

    def GetStudy(self, request, context):
        t0 = time.monotonic()
        runner = self.runner(request.study_name)
        info = self._study_info(runner)
        return optimizer_pb2.GetStudyResponse(study=info, timings_s={"total": time.monotonic() - t0})

    def ListTrials(self, request, context):
        t0 = time.monotonic()
        runner = self.runner(request.study_name)
        states = []
        for value in request.states:
            if value not in st.STATE_FROM_PB:
                raise InvalidArgument(f"states: bad value {value}")
            states.append(st.STATE_FROM_PB[value])
        trials = sorted(runner.study.get_trials(deepcopy=False), key=lambda t: t.number)
        front = st.pareto_front(runner.study)
        front_set = set(front)
        selected = [
            t
            for t in trials
            if (not states or t.state in states) and (not request.pareto_only or t.number in front_set)
        ]
        total = len(selected)
        selected = selected[request.offset :]
        if request.limit:
            selected = selected[: request.limit]
        space = runner.settings.search_space
        return optimizer_pb2.ListTrialsResponse(
            trials=[st.trial_to_pb(t, space, front_set) for t in selected],
            pareto_front=front,
            total=total,
            timings_s={"total": time.monotonic() - t0},
        )

    def StopStudy(self, request, context):
        t0 = time.monotonic()
        runner = self.runner(request.study_name)
        runner.stop(abandon=request.abandon_running)
        info = self._study_info(runner)
        if info.state in (optimizer_pb2.STUDY_STATE_CREATED, optimizer_pb2.STUDY_STATE_FAILED):
            info.state = optimizer_pb2.STUDY_STATE_STOPPED
        return optimizer_pb2.StopStudyResponse(study=info, timings_s={"total": time.monotonic() - t0})

    def RegisterEvaluator(self, request, context):
        t0 = time.monotonic()
        address = check_address(request.address)
        runner = self.runner(request.study_name) if request.study_name else None
        model = self._probe(address)
        timings = {"health": time.monotonic() - t0}
        if runner is not None:
            problem = runner.check_model(model)
            if problem:
                raise FailedPrecondition(f"evaluator {address}: {problem}")
            added = runner.add_evaluator(address)
            runners = [runner]
        else:
            with self._lock:
                added = address not in self._global_evaluators
                if added:
                    self._global_evaluators.append(address)
                runners = list(self._runners.values())
            for r in runners:
                r.admit(address)
        info = optimizer_pb2.EvaluatorInfo(address=address, state=optimizer_pb2.EVALUATOR_STATE_PREPARING)
        for r in runners:
            for e in r.evaluator_infos(r.study.get_trials(deepcopy=False)):
                if e.address == address and e.state != optimizer_pb2.EVALUATOR_STATE_UNSPECIFIED:
                    info = e
        timings["total"] = time.monotonic() - t0
        return optimizer_pb2.RegisterEvaluatorResponse(evaluator=info, model=model, added=added, timings_s=timings)

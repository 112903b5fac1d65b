"""Ask/tell dispatch: one trial in flight per evaluator, leases, retries, resume.

A :class:`StudyRunner` drives one study. It keeps a thread per evaluator of
the pool (:class:`EvaluatorWorker`); each thread

1. waits until its evaluator is healthy, checks its model (depth and
   components), loads the direction set (by id first; the bytes only when the
   evaluator lacks it) and prepares the baseline;
2. asks a trial (under the runner's lock, so the seeded sampler draws in
   trial order), unless the scored (COMPLETE or PRUNED) plus RUNNING trials
   in storage already reach ``n_trials``;
3. runs it under a *lease*: the EvaluateTrial call carries the trial timeout as
   its deadline, and while it waits the thread health-checks the evaluator.
   Optuna's own heartbeat only runs inside ``study.optimize()``, so this is
   the heartbeat of an ask/tell trial.

Outcomes of a trial:

- an answer: ``tell`` COMPLETE with (kl, refusals); or, when the request's
  Pareto front (``prune_against``, unless the study disables pruning) let the
  evaluator stop the refusal probes because the trial is certainly dominated,
  ``tell`` PRUNED with the exact KL and the refusal lower bound in the
  ``pruned`` user attr (it counts toward ``n_trials``);
- UNAVAILABLE (or CANCELLED) while the evaluator's health is SERVING: it is
  busy; the same trial is sent again after a short wait, not a failure;
- the evaluator lost (connection gone and health failing), the lease expired
  (DEADLINE_EXCEEDED) or another error: ``tell`` FAIL with the ``error`` user
  attr, and the same parameters are enqueued again (``study.enqueue_trial``,
  user attrs ``retry_of``/``attempt``) up to ``max_trial_retries`` times
  (INVALID_ARGUMENT is not retried: the same parameters would fail again);
  any evaluator asks it next, the same one once it is back;
- NOT_FOUND / FAILED_PRECONDITION (the evaluator restarted and lost the
  directions or the baseline): prepare it again and resend the same trial once.

A lost evaluator is UNREACHABLE: its thread health-checks it periodically with
a fresh channel and re-admits it (preparing it again) once it is SERVING.

When a loop starts on an existing study, RUNNING trials that no live loop of
this process owns (left by a killed optimizer) are marked FAIL and their
parameters enqueued again. One optimizer per study is assumed.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import optuna
from optuna.trial import TrialState

from abliterate.blobs import BlobStore
from abliterate.database import DEFAULT_PATIENCE_S, StudyLock, retry_through_outage
from abliterate.errors import (
    AbliterateError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from abliterate.params import AblationParams
from abliterate.rpc.clients import EvaluatorClient, PendingCall
from abliterate.rpc.convert import params_to_pb
from abliterate.rpc.errors import Cancelled, DeadlineExceeded
from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.metrics import Metrics, TrialMetrics
from abliterate.rpc.tls import ClientTLS
from abliterate.v1 import common_pb2, evaluator_pb2, optimizer_pb2
from abliterate_services.optimizer import study as st

log = logging.getLogger(__name__)

# The heartbeat is driven here (ask/tell), not by Study.optimize; both warnings say only that.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings(
    "ignore", message=r".*fail_stale_trials is experimental", category=optuna.exceptions.ExperimentalWarning
)

S = optimizer_pb2  # enum namespace
T = TypeVar("T")


@dataclass
class DispatchOptions:
    """Timing knobs of the dispatch loop (seconds)."""

    #: Health-check period while a trial runs, and while an evaluator is unreachable.
    health_interval_s: float = 5.0
    #: Deadline of one health check.
    health_timeout_s: float = 3.0
    #: Consecutive failed health checks during a trial before its lease is lost.
    health_failures_to_lose: int = 2
    #: Wait before resending to a busy evaluator.
    busy_retry_s: float = 2.0
    #: Deadline of GetModelInfo / LoadDirections.
    rpc_timeout_s: float = 120.0
    #: Deadline of PrepareBaseline (it generates on every refusal prompt).
    prepare_timeout_s: float = 3600.0
    #: With no usable evaluator for this long the loop gives up (FAILED).
    give_up_s: float = 900.0
    #: Idle poll period of the loop.
    poll_s: float = 0.2
    #: gRPC message limit of the channels to evaluators.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Bearer token sent to evaluators (empty: none).
    token: str = ""
    #: TLS of the channels to evaluators (None: plaintext).
    tls: ClientTLS | None = None
    #: Seconds between heartbeats of the trials in flight (Optuna's RDB heartbeat, whole seconds).
    heartbeat_interval_s: int = st.DEFAULT_HEARTBEAT_INTERVAL_S
    #: Seconds without a heartbeat before any optimizer of the study fails a trial and re-enqueues it.
    grace_period_s: int = st.DEFAULT_GRACE_PERIOD_S
    #: Seconds a storage call is retried through a database outage before the caller sees UNAVAILABLE.
    database_patience_s: float = DEFAULT_PATIENCE_S


def _now_event(**kwargs) -> optimizer_pb2.TrialEvent:
    return optimizer_pb2.TrialEvent(time=st.timestamp(), **kwargs)


def _seconds_since(start: dt.datetime | None) -> float | None:
    """Seconds since a trial's start (Optuna stores naive local times), None when it has none."""
    return None if start is None else (dt.datetime.now() - start).total_seconds()


def _error_text(exc: BaseException) -> str:
    """``CODE: details`` of a failed call (the status name the client recorded), else the message."""
    code = getattr(exc, "code", None)
    name = getattr(code, "name", "")
    details = getattr(exc, "details", None) or str(exc)
    return f"{name}: {details}" if name else details


class EvaluatorWorker(threading.Thread):
    """Keeps one trial in flight on one evaluator."""

    def __init__(self, runner: "StudyRunner", address: str) -> None:
        super().__init__(name=f"evaluator-{address}", daemon=True)
        self.runner = runner
        self.address = address
        self.options = runner.options
        self.state = S.EVALUATOR_STATE_PREPARING
        self.current_trial: int | None = None
        self.last_error = ""
        self.prepared = False
        self.disabled = False
        self.baseline_id = ""
        self._client: EvaluatorClient | None = None
        #: A trial asked for this evaluator whose labelling failed; the next ask_next resumes it.
        self.asked: list[optuna.Trial] = []

    # ------------------------------------------------------------ channel

    @property
    def client(self) -> EvaluatorClient:
        if self._client is None:
            self._client = EvaluatorClient(
                self.address,
                token=self.options.token or None,
                max_message_bytes=self.options.max_message_bytes,
                tls=self.options.tls,
            )
        return self._client

    def _reset_channel(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def healthy(self) -> bool:
        return self.client.healthy(self.options.health_timeout_s)

    def _mark_unreachable(self, why: str) -> None:
        if self.state != S.EVALUATOR_STATE_UNREACHABLE:
            log.warning("evaluator %s unreachable: %s", self.address, why)
            self.runner.emit_progress("evaluator_unreachable", f"{self.address}: {why}")
        self.state = S.EVALUATOR_STATE_UNREACHABLE
        self.last_error = why
        self.prepared = False
        self._reset_channel()

    def _sleep(self, seconds: float) -> None:
        """Sleep, cut short when the loop ends (but never spin)."""
        if self.runner.wake.wait(seconds):
            time.sleep(min(seconds, self.options.poll_s))

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        try:
            while not self.runner.worker_should_exit(self):
                if not self._ensure_ready():
                    continue
                try:
                    item = self.runner.ask_next(self)
                except Exception as exc:  # noqa: BLE001 - e.g. the database stayed away: try again later
                    log.warning("evaluator %s: no trial asked: %r", self.address, exc)
                    self.last_error = f"cannot ask a trial: {exc}"
                    self._sleep(self.options.busy_retry_s)
                    continue
                if item is None:
                    self._sleep(self.options.poll_s)
                    continue
                trial, params = item
                try:
                    self._run_trial(trial, params)
                except Exception as exc:  # noqa: BLE001 - a bug must not leak a RUNNING trial
                    log.exception("trial %s on %s crashed", trial.number, self.address)
                    self.runner.fail_trial(self, trial.number, f"internal error: {exc!r}", retry=True)
                finally:
                    self.current_trial = None
                    if self.state == S.EVALUATOR_STATE_BUSY:
                        self.state = S.EVALUATOR_STATE_IDLE
        except Exception:  # noqa: BLE001
            log.exception("evaluator thread %s crashed", self.address)
            self.disabled = True
            self.last_error = "evaluator thread crashed (see the optimizer log)"
        finally:
            if self.asked:  # asked but never sent: its parameters wait for the next run
                try:
                    self.runner.fail_trial(self, self.asked[0].number, "interrupted before it ran", retry=True)
                except Exception as exc:  # noqa: BLE001 - the heartbeat check re-enqueues it later anyway
                    log.warning("evaluator %s: trial %d left RUNNING: %r", self.address, self.asked[0].number, exc)
                self.asked.clear()
            self._reset_channel()
            self.runner.worker_exited(self)

    def _ensure_ready(self) -> bool:
        if self.prepared:
            return True
        if not self.healthy():
            self._mark_unreachable("health check failed (not SERVING or no answer)")
            self._sleep(self.options.health_interval_s)
            return False
        return self._prepare()

    def _reject(self, why: str) -> bool:
        """This evaluator cannot serve the study: its thread ends (False, for the callers' convenience)."""
        self.disabled = True
        self.last_error = why
        self.runner.emit_progress("evaluator_rejected", f"{self.address}: {why}")
        return False

    def _prepare(self) -> bool:
        """Model check, direction set, baseline. False (after a pause) when not ready."""
        runner = self.runner
        settings = runner.settings
        self.state = S.EVALUATOR_STATE_PREPARING
        runner.emit_progress("prepare_evaluator", self.address)
        client = self.client
        try:
            problem = runner.check_model(client.model_info(self.options.rpc_timeout_s))
            if problem:
                return self._reject(problem)
            client.ensure_directions(settings.direction_set_id, runner.direction_bytes, self.options.rpc_timeout_s)
            # The unedited model's refusal count is not used here: skipping it saves a full probe run.
            self.baseline_id = client.prepare_baseline(
                settings.baseline, self.options.prepare_timeout_s, count_refusals=False
            )
        except (Unavailable, Cancelled) as exc:  # busy, restarting or gone (DeadlineExceeded is Unavailable)
            if self.healthy():
                self.last_error = f"busy: {_error_text(exc)}"
                self._sleep(self.options.busy_retry_s)
            else:
                self._mark_unreachable(_error_text(exc))
                self._sleep(self.options.health_interval_s)
            return False
        except AbliterateError as exc:
            return self._reject(f"cannot prepare: {_error_text(exc)}")
        self.prepared = True
        self.state = S.EVALUATOR_STATE_IDLE
        self.last_error = ""
        runner.emit_progress("evaluator_ready", self.address)
        return True

    def _run_trial(self, trial: optuna.Trial, params: AblationParams) -> None:
        runner = self.runner
        number = trial.number
        self.state = S.EVALUATOR_STATE_BUSY
        self.current_trial = number
        request = evaluator_pb2.EvaluateTrialRequest(
            direction_set_id=runner.settings.direction_set_id,
            params=params_to_pb(params),
            baseline_id=self.baseline_id,
            trial_number=number,
        )
        if runner.settings.prune_dominated:
            front = runner.storage_call(lambda: st.front_points(runner.study), "reading the Pareto front")
            request.prune_against.extend(
                evaluator_pb2.ScorePoint(kl=p.kl, refusals=p.refusals, trial_number=p.trial_number) for p in front
            )
        started = time.monotonic()
        lease_deadline = started + runner.settings.trial_timeout_s
        reprepared = False
        while True:
            remaining = lease_deadline - time.monotonic()
            if remaining <= 0:
                runner.fail_trial(
                    self, number, f"lease expired after {runner.settings.trial_timeout_s:.0f}s", retry=True
                )
                return
            call_started = time.monotonic()
            try:
                response = self._await_trial(self.client.start_trial(request, remaining), number)
            except (DeadlineExceeded, Unavailable, Cancelled) as exc:
                if runner.is_abandoned(number):
                    return
                if isinstance(exc, DeadlineExceeded):
                    runner.fail_trial(self, number, f"lease expired: {_error_text(exc)}", retry=True)
                    return
                if self.healthy():
                    # Busy (or a blip): send the same trial again, not a failure.
                    self.last_error = f"busy: {_error_text(exc)}"
                    self._sleep(self.options.busy_retry_s)
                    continue
                self._mark_unreachable(_error_text(exc))
                runner.fail_trial(self, number, f"evaluator lost: {_error_text(exc)}", retry=True)
                return
            except (NotFound, FailedPrecondition) as exc:
                if runner.is_abandoned(number):
                    return
                if reprepared:
                    runner.fail_trial(self, number, _error_text(exc), retry=True)
                    return
                # The evaluator restarted and lost the directions or the baseline: prepare it again.
                reprepared = True
                self.prepared = False
                if not self._prepare():
                    runner.fail_trial(
                        self, number, f"evaluator could not be prepared again: {_error_text(exc)}", retry=True
                    )
                    return
                request.baseline_id = self.baseline_id
                self.state = S.EVALUATOR_STATE_BUSY
                continue
            except AbliterateError as exc:
                if runner.is_abandoned(number):
                    return
                self.last_error = _error_text(exc)
                # The same parameters would fail the same way on bad input.
                runner.fail_trial(self, number, self.last_error, retry=not isinstance(exc, InvalidArgument))
                return
            if response is None:  # abandoned, or the evaluator was lost (already handled)
                return
            runner.complete_trial(
                self, trial, response, rpc_s=time.monotonic() - call_started, lease_s=time.monotonic() - started
            )
            return

    def _await_trial(self, call: PendingCall, number: int) -> evaluator_pb2.EvaluateTrialResponse | None:
        """The trial's answer, health-checking the evaluator while it runs. None when the trial was
        abandoned (StopStudy) or the evaluator stopped answering health checks (then failed here)."""
        failures = 0
        while True:
            response = call.wait(self.options.health_interval_s)
            if response is not None:
                return response
            if self.runner.is_abandoned(number):
                call.cancel()
                return None
            if self.healthy():
                failures = 0
                continue
            failures += 1
            if failures >= self.options.health_failures_to_lose:
                call.cancel()
                why = "evaluator lost during the trial (health checks failed)"
                self._mark_unreachable(why)
                self.runner.fail_trial(self, number, why, retry=True)
                return None

    def info(self, n_done: int) -> optimizer_pb2.EvaluatorInfo:
        msg = optimizer_pb2.EvaluatorInfo(
            address=self.address, state=self.state, n_trials_done=n_done, last_error=self.last_error
        )
        current = self.current_trial
        if current is not None:
            msg.current_trial = current
        return msg


class StudyRunner:
    """The loop of one study in this process; several runs may follow each other.

    Several processes may run the same study (each with its own evaluators):
    asks are serialised across them by :class:`~abliterate.database.StudyLock`
    and never let COMPLETE plus RUNNING trials exceed ``n_trials``, and each
    process heartbeats its own trials in flight, so a trial of a killed
    optimizer is failed (and its parameters re-enqueued) by whichever
    optimizer notices its stale heartbeat first.
    """

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        name: str,
        directions: BlobStore,
        options: DispatchOptions,
        global_evaluators: Callable[[], list[str]] = list,
        trial_metrics: TrialMetrics | None = None,
    ) -> None:
        self.storage = storage
        self.trial_metrics = trial_metrics or Metrics().trials
        self.name = name
        self.directions = directions
        self.options = options
        self._global_evaluators = global_evaluators
        self.study, self.settings = self.storage_call(lambda: st.load_study(storage, name), "loading the study")
        self._lock = threading.RLock()  # this process's storage writes of the study (ask/tell/enqueue)
        self._study_lock = StudyLock(storage.engine, name)  # asks across processes
        self._state_lock = threading.Condition()
        self.state = S.STUDY_STATE_CREATED
        self.message = ""
        self.wake = threading.Event()  # set to cut sleeps short when the loop ends
        self._stop = threading.Event()
        self._abandon = False
        self._abandoned: set[int] = set()
        self._target_reached = False
        self._workers: dict[str, EvaluatorWorker] = {}
        self._in_flight: dict[int, optuna.Trial] = {}  # trial number -> the trial this process runs
        self._adopted: set[int] = set()  # trial ids of other runs given one heartbeat (see beat_and_reclaim)
        self._flight_lock = threading.Lock()
        self._tell_lock = threading.Lock()
        self._subscribers: list[queue.Queue] = []
        self._sub_lock = threading.Lock()  # never held while taking another lock
        self._supervisor: threading.Thread | None = None
        self._run_over = threading.Event()  # ends the heartbeat thread of a run
        self.run_id = ""
        self.last_done: optimizer_pb2.TrialEvent | None = None
        #: Trials of the target not yet dispatched (n_trials - COMPLETE - RUNNING), as last seen: queue depth.
        self.n_queued = 0
        st.stale_trial_handlers[name] = self._requeue_stale_trial

    def direction_bytes(self, digest: str) -> bytes | None:
        """A direction set's bytes from the blob store (retried through a database outage)."""
        return self.storage_call(lambda: self.directions.get(digest), "reading a direction set")

    def storage_call(self, function: Callable[[], T], what: str, stop: threading.Event | None = None) -> T:
        """``function()`` retried through a database outage (UNAVAILABLE once the patience runs out)."""
        return retry_through_outage(
            function, what=f"study {self.name}: {what}", patience_s=self.options.database_patience_s, stop=stop
        )

    # ------------------------------------------------------------ lifecycle

    @property
    def active(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    def start(self) -> bool:
        """Start a run unless one is active; False when the study is already DONE."""
        while True:
            with self._state_lock:
                previous = self._supervisor
                if previous is not None and previous.is_alive():
                    if not self._stop.is_set():
                        return True
                else:
                    return self._start_locked()
            previous.join()  # a stopping run: let it end, then start anew

    def _start_locked(self) -> bool:
        # Settings may have changed (n_trials, evaluator pool) through another runner or process.
        self.study, self.settings = self.storage_call(
            lambda: st.load_study(self.storage, self.name), "loading the study"
        )
        n_complete = self.storage_call(lambda: self._count(*st.SCORED_STATES), "counting trials")
        if n_complete >= self.settings.n_trials:
            self.state = S.STUDY_STATE_DONE
            return False
        run_index = self.storage_call(self._claim_run_index, "starting a run")
        self.study, self.settings = self.storage_call(
            lambda: st.load_study(self.storage, self.name, run_index), "loading the study"
        )
        self.run_id = uuid.uuid4().hex
        self._stop.clear()
        self.wake.clear()
        self._run_over = threading.Event()
        self._abandon = False
        self._abandoned = set()
        self._target_reached = False
        self.message = ""
        self.last_done = None
        self.state = S.STUDY_STATE_RUNNING
        self._workers = {}
        for address in self.pool():
            self._spawn(address)
        threading.Thread(
            target=self._keep_heartbeats, args=(self._run_over,), name=f"heartbeat-{self.name}", daemon=True
        ).start()
        self._supervisor = threading.Thread(target=self._supervise, name=f"study-{self.name}", daemon=True)
        self._supervisor.start()
        return True

    def _claim_run_index(self) -> int:
        """This run's index among the study's runs in every process (0 for the first ever)."""
        with self._study_lock.held():
            study = optuna.load_study(study_name=self.name, storage=self.storage)
            index = int(study.user_attrs.get("n_runs", 0))
            study.set_user_attr("n_runs", index + 1)
            return index

    def pool(self) -> list[str]:
        out: list[str] = []
        for address in [*self.settings.evaluator_addresses, *self._global_evaluators()]:
            if address and address not in out:
                out.append(address)
        return out

    def _spawn(self, address: str) -> None:
        worker = EvaluatorWorker(self, address)
        self._workers[address] = worker
        worker.start()

    def add_evaluator(self, address: str) -> bool:
        """Add to the stored pool (and to the active run); False when it was there."""

        def add() -> bool:
            self.settings = st.StudySettings.from_attrs(self.study.user_attrs)
            if address in self.settings.evaluator_addresses:
                return False
            self.settings.evaluator_addresses.append(address)
            st.write_settings(self.study, self.settings)
            return True

        with self._lock:
            added = self.storage_call(add, "adding an evaluator")
        self.admit(address)
        return added

    def admit(self, address: str) -> None:
        """Give the active run a worker for ``address`` (no-op when it has a live one)."""
        with self._state_lock:
            if not self.active or self._stop.is_set():
                return
            worker = self._workers.get(address)
            if worker is not None and worker.is_alive():
                return
            self._spawn(address)

    def stop(self, abandon: bool) -> None:
        with self._state_lock:
            if not self.active:
                return
            if self.state == S.STUDY_STATE_RUNNING:
                self.state = S.STUDY_STATE_STOPPING
            self._stop.set()
            self.message = "stopped by StopStudy"
        if abandon:
            with self._lock:
                self._abandon = True
                with self._flight_lock:
                    numbers = sorted(self._in_flight)
                    self._abandoned.update(numbers)
                for number in numbers:
                    self._fail_locked(None, number, "abandoned by StopStudy", retry=False)
        self.wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the run and wait for it (server shutdown); trials in flight finish or are failed."""
        self.stop(abandon=False)
        if self._supervisor is not None:
            self._supervisor.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._supervisor is not None:
            self._supervisor.join(timeout)

    def _supervise(self) -> None:
        """Watch the workers until the target is reached, the run is stopped or no evaluator is usable;
        then announce the end. Never dies silently: RunStudy callers wait for its "done"."""
        started = time.monotonic()
        failed = ""
        try:
            failed = self._watch_workers()
        except Exception as exc:  # noqa: BLE001 - the "done" event below must still go out
            log.exception("study %s supervisor failed", self.name)
            failed = f"internal error in the study loop: {exc!r}"
            self._stop.set()
            self.wake.set()
        try:
            trials = self.storage_call(lambda: self.study.get_trials(deepcopy=False), "counting trials at the end")
            front = self.storage_call(lambda: st.pareto_front(self.study), "reading the Pareto front")
        except Exception as exc:  # noqa: BLE001 - the database stayed away: report what this process knows
            log.warning("study %s: final counts unavailable: %s", self.name, exc)
            trials, front = None, []
        with self._state_lock:
            counted = st.counts(trials or [])
            if trials is not None and st.n_scored(counted) >= self.settings.n_trials:
                self.state, self.message = S.STUDY_STATE_DONE, ""
            elif failed:
                self.state, self.message = S.STUDY_STATE_FAILED, failed
            elif trials is None:
                self.state, self.message = S.STUDY_STATE_STOPPED, "stopped: the database is unreachable"
            else:
                self.state = S.STUDY_STATE_STOPPED
                self.message = self.message or "stopped"
            done = _now_event(
                done=optimizer_pb2.StudyDone(
                    state=self.state,
                    n_complete=st.n_scored(counted),
                    n_failed=counted[TrialState.FAIL],
                    pareto_front=front,
                    message=self.message,
                    timings_s={"total": time.monotonic() - started},
                )
            )
            self.last_done = done
            self._run_over.set()
        log.info("study %s loop ended: %s %s", self.name, optimizer_pb2.StudyState.Name(self.state), self.message)
        self._emit(done)

    def _watch_workers(self) -> str:
        """Poll the workers until the run ends; why it failed ("" when it did not)."""
        unusable_since = time.monotonic()
        failed = ""
        while True:
            with self._state_lock:
                workers = list(self._workers.values())
                alive = [w for w in workers if w.is_alive()]
                if self._target_reached or self._stop.is_set():
                    if not alive:
                        return failed
                usable = [w for w in alive if not w.disabled and w.state != S.EVALUATOR_STATE_UNREACHABLE]
                if usable or self._in_flight:
                    unusable_since = time.monotonic()
                elif workers and not alive and not failed:
                    failed = "no evaluator could be prepared: " + "; ".join(
                        f"{w.address}: {w.last_error}" for w in workers
                    )
                elif time.monotonic() - unusable_since > self.options.give_up_s and not failed:
                    failed = f"no usable evaluator for {self.options.give_up_s:.0f}s" + (
                        ": " + "; ".join(f"{w.address}: {w.last_error}" for w in workers)
                        if workers
                        else " (the pool is empty)"
                    )
                if failed and not self._stop.is_set():
                    self._stop.set()
                    self.wake.set()
            if not alive and (self._stop.is_set() or self._target_reached):
                return failed
            time.sleep(self.options.poll_s)

    # ------------------------------------------------------------ heartbeats

    def _keep_heartbeats(self, run_over: threading.Event) -> None:
        """Every heartbeat interval: heartbeat this process's trials in flight, then let Optuna fail the
        study's stale ones (their optimizer died); :meth:`_requeue_stale_trial` re-enqueues those."""
        while True:
            try:
                self.beat_and_reclaim()
            except Exception as exc:  # noqa: BLE001 - a database blip: the next beat tries again
                log.warning("study %s: heartbeat failed: %s", self.name, exc)
            if run_over.wait(self.options.heartbeat_interval_s):
                return

    def beat_and_reclaim(self) -> None:
        # Own trials first: after a long outage they are refreshed before anything is judged stale.
        with self._flight_lock:
            in_flight = list(self._in_flight.values())
        for trial in in_flight:
            try:
                self.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - the id Optuna's loop uses too
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # told between the snapshot and the beat
        with self._lock:
            optuna.storages.fail_stale_trials(self.study)
        self._adopt_silent_trials({trial.number for trial in in_flight})

    def _adopt_silent_trials(self, mine: set[int]) -> None:
        """Give one heartbeat to every RUNNING trial of another run that started over a grace period ago.

        Optuna never judges a trial without any heartbeat stale, and a process killed between ``ask``
        and its first heartbeat leaves exactly that: a RUNNING trial that would count against
        ``n_trials`` for good. One beat makes it stale one grace period later unless its owner is
        alive (an owner beats it anyway; a live trial only gets one grace period more, once).
        """
        grace = dt.timedelta(seconds=self.options.grace_period_s)
        now = dt.datetime.now()  # Optuna stores naive local start times
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = trial._trial_id  # noqa: SLF001 - the id Optuna's heartbeat is keyed by
            if trial.number in mine or trial_id in self._adopted or trial.datetime_start is None:
                continue
            if now - trial.datetime_start > grace:
                self._adopted.add(trial_id)
                try:
                    self.storage.record_heartbeat(trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # finished meanwhile

    def _requeue_stale_trial(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        """Optuna failed ``frozen`` for a stale heartbeat: record why and run its parameters again."""
        error = st.STALE_TRIAL_ERROR  # a finished trial takes no attribute: trial_to_pb says this for it
        log.warning("study %s: trial %d has no heartbeat; failed and re-enqueued", self.name, frozen.number)
        self.trial_metrics.trial_finished(self.name, "fail", _seconds_since(frozen.datetime_start))
        address = frozen.user_attrs.get("evaluator", "")
        self._emit(
            _now_event(
                trial_failed=optimizer_pb2.TrialFailed(
                    number=frozen.number, evaluator=address, error=error, will_retry=True
                )
            )
        )
        attempt = int(frozen.user_attrs.get("attempt", 0)) + 1
        new_number = self._enqueue_retry(frozen, attempt)
        self._emit(
            _now_event(
                trial_retried=optimizer_pb2.TrialRetried(
                    failed_number=frozen.number, new_number=new_number, attempt=attempt
                )
            )
        )

    # ------------------------------------------------------------ workers' calls

    def worker_should_exit(self, worker: EvaluatorWorker) -> bool:
        return worker.disabled or self._stop.is_set() or self._target_reached

    def worker_exited(self, worker: EvaluatorWorker) -> None:
        log.debug("study %s: evaluator thread %s exited", self.name, worker.address)

    def is_abandoned(self, number: int) -> bool:
        return number in self._abandoned

    def check_model(self, info: common_pb2.ModelInfo) -> str:
        """Why an evaluator's model does not fit the study ("" when it does)."""
        space = self.settings.search_space
        if info.n_layers != space.n_layers:
            return f"model has {info.n_layers} layers, the study's direction set fits {space.n_layers}"
        missing = sorted(set(space.components) - set(info.components))
        if missing:
            return f"model lacks components {missing} of the search space (it has {sorted(info.components)})"
        model = self.settings.model
        if model and model.get("source") and info.spec.source and model["source"] != info.spec.source:
            return f"model {info.spec.source!r} differs from the study's {model['source']!r}"
        return ""

    def _count(self, *states: TrialState) -> int:
        return len(self.study.get_trials(deepcopy=False, states=states))

    def ask_next(self, worker: EvaluatorWorker) -> tuple[optuna.Trial, AblationParams] | None:
        """The next trial for ``worker`` and its parameters, or None (target reached or all in flight).

        Asked under the study lock, so two optimizers cannot both take the last slot, and sampled
        under this process's lock, so the seeded sampler draws in trial order. A retry after a
        database blip continues with the trial already asked (never asks a second one).
        """
        if self._stop.is_set():
            return None
        # The trial asked but not yet labelled, kept across calls: a failure after the ask (the
        # database dropping us, even while the study lock is released) resumes it, never asks another.
        asked = worker.asked

        def ask() -> tuple[optuna.Trial, AblationParams] | None:
            with self._lock:
                if not asked:
                    with self._study_lock.held():
                        trials = self.study.get_trials(deepcopy=False, states=(*st.SCORED_STATES, TrialState.RUNNING))
                        n_complete = sum(1 for t in trials if t.state in st.SCORED_STATES)
                        if n_complete >= self.settings.n_trials:
                            self._target_reached = True
                            self.n_queued = 0
                            self.wake.set()
                            return None
                        if len(trials) >= self.settings.n_trials:
                            self.n_queued = 0
                            return None  # the rest is in flight (here or elsewhere); wait in case one fails
                        asked.append(self.study.ask())
                        self.n_queued = self.settings.n_trials - len(trials) - 1
                        # Heartbeaten by this process from now on, whatever happens next.
                        with self._flight_lock:
                            self._in_flight[asked[0].number] = asked[0]
                trial = asked[0]
                # At once: a trial without any heartbeat is never judged stale.
                self.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - the id Optuna's loop uses too
                sampled = self.settings.search_space.suggest(trial)
                stored = trial.user_attrs.get("params")
                params = AblationParams.from_dict(stored) if stored else sampled
                trial.set_user_attr("params", params.to_dict())
                trial.set_user_attr("evaluator", worker.address)
                trial.set_user_attr("run_id", self.run_id)
                return trial, params

        item = self.storage_call(ask, "asking a trial", stop=self._stop)
        asked.clear()
        if item is not None:
            log.info("trial %d -> %s", item[0].number, worker.address)
        return item

    def complete_trial(
        self,
        worker: EvaluatorWorker,
        trial: optuna.Trial,
        response: evaluator_pb2.EvaluateTrialResponse,
        *,
        rpc_s: float,
        lease_s: float,
    ) -> None:
        scores = response.scores
        timings = {k: float(v) for k, v in scores.timings_s.items()}
        timings.update({f"call_{k}": float(v) for k, v in response.timings_s.items()})
        timings["rpc"] = rpc_s
        timings["lease"] = lease_s
        if trial.number in self._abandoned:
            with self._flight_lock:
                self._in_flight.pop(trial.number, None)
            return

        def tell() -> bool:
            try:
                trial.set_user_attr("timings", timings)
                trial.set_user_attr("n_refusal_prompts", int(scores.n_refusal_prompts))
                trial.set_user_attr("n_kl_prompts", int(scores.n_kl_prompts))
                trial.set_user_attr("degenerate", int(scores.degenerate))
                trial.set_user_attr("unjudged", int(scores.unjudged))
                if scores.pruned:
                    # Certainly dominated: PRUNED, with what was proven. TPE puts pruned trials with
                    # the worse ("above") group; the front is what it would be without pruning.
                    dominated_by = scores.dominated_by if scores.HasField("dominated_by") else None
                    st.record_pruned(trial, float(scores.kl), int(scores.refusals), dominated_by)
                    self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
                else:
                    self.study.tell(trial, [float(scores.kl), float(scores.refusals)], skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                return False
            return True

        # Not under the study lock: a tell need not wait for another evaluator's ask.
        with self._tell_lock:  # tells in order, so the events count up
            # Retried through an outage, heartbeats still going: a scored trial is not thrown away.
            told = self.storage_call(tell, f"telling trial {trial.number}")
            with self._flight_lock:
                self._in_flight.pop(trial.number, None)
            trials = self.storage_call(lambda: self.study.get_trials(deepcopy=False), "reading trials")
            front = self.storage_call(lambda: st.pareto_front(self.study), "reading the Pareto front")
            frozen = next(t for t in trials if t.number == trial.number)
            if not told or frozen.state not in st.SCORED_STATES:
                log.warning(
                    "trial %d was failed elsewhere (stale heartbeat) before its score arrived; "
                    "its re-enqueued copy runs instead",
                    trial.number,
                )
                return
            self.trial_metrics.trial_finished(self.name, "pruned" if scores.pruned else "complete", lease_s)
            n_complete = sum(1 for t in trials if t.state in st.SCORED_STATES)
            n_running = sum(1 for t in trials if t.state == TrialState.RUNNING)
            self.n_queued = max(0, self.settings.n_trials - n_complete - n_running)
            if n_complete >= self.settings.n_trials:
                self._target_reached = True
                self.wake.set()
            event = _now_event(trial_finished=st.trial_finished(frozen, trials, front, self.settings))
            eta = st.eta_seconds(trials, self.settings.n_trials, self.parallelism())
            if eta is not None:
                event.trial_finished.eta_s = eta
            log.info(
                "trial %d %s on %s: kl=%.4g refusals=%s%d",
                trial.number,
                "pruned" if scores.pruned else "complete",
                worker.address,
                scores.kl,
                ">=" if scores.pruned else "",
                scores.refusals,
            )
            self._emit(event)

    def fail_trial(self, worker: EvaluatorWorker | None, number: int, error: str, *, retry: bool) -> None:
        with self._lock:
            self._fail_locked(worker, number, error, retry=retry)

    def _fail_locked(self, worker: EvaluatorWorker | None, number: int, error: str, *, retry: bool) -> None:
        with self._flight_lock:
            trial = self._in_flight.pop(number, None)

        def fail() -> optuna.trial.FrozenTrial | None:
            frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)
            if frozen is None or frozen.state.is_finished():
                return None
            st.set_trial_attr(self.study, frozen, "error", error)
            self.study.tell(trial if trial is not None else number, state=TrialState.FAIL, skip_if_finished=True)
            return frozen

        frozen = self.storage_call(fail, f"failing trial {number}")
        if frozen is None:
            return
        self.trial_metrics.trial_finished(self.name, "fail", _seconds_since(frozen.datetime_start))
        self.n_queued = min(self.settings.n_trials, self.n_queued + 1)  # its slot is free again
        attempt = int(frozen.user_attrs.get("attempt", 0))
        # Also while stopping: the WAITING trial waits for the next run.
        will_retry = retry and attempt < self.settings.max_trial_retries
        address = worker.address if worker else frozen.user_attrs.get("evaluator", "")
        log.warning("trial %d failed on %s: %s%s", number, address, error, " (re-enqueued)" if will_retry else "")
        self._emit(
            _now_event(
                trial_failed=optimizer_pb2.TrialFailed(
                    number=number, evaluator=address, error=error, will_retry=will_retry
                )
            )
        )
        if will_retry:
            new_number = self._enqueue_retry(frozen, attempt + 1)
            self._emit(
                _now_event(
                    trial_retried=optimizer_pb2.TrialRetried(
                        failed_number=number, new_number=new_number, attempt=attempt + 1
                    )
                )
            )

    def _enqueue_retry(self, frozen: optuna.trial.FrozenTrial, attempt: int) -> int:
        attrs = {
            "retry_of": frozen.number,
            "attempt": attempt,
            "warm_start": bool(frozen.user_attrs.get("warm_start", False)),
        }
        if frozen.user_attrs.get("params"):
            attrs["params"] = frozen.user_attrs["params"]
        self.storage_call(
            lambda: self.study.enqueue_trial(dict(frozen.params), user_attrs=attrs),
            f"re-enqueueing trial {frozen.number}",
        )
        waiting = [
            t
            for t in self.storage_call(
                lambda: self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), "reading trials"
            )
            if t.user_attrs.get("retry_of") == frozen.number
        ]
        return max(t.number for t in waiting) if waiting else 0

    # ------------------------------------------------------------ events and views

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._sub_lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._sub_lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def _emit(self, event: optimizer_pb2.TrialEvent) -> None:
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            q.put((self.run_id, event))

    def emit_progress(self, phase: str, message: str) -> None:
        self._emit(_now_event(progress=common_pb2.Progress(phase=phase, message=message)))

    def n_in_flight(self) -> int:
        with self._flight_lock:
            return len(self._in_flight)

    def worker_states(self) -> list[int]:
        """States of this run's live evaluator threads (lock-free snapshot, for the metrics)."""
        return [w.state for w in list(self._workers.values()) if w.is_alive() and not w.disabled]

    def parallelism(self) -> int:
        """Evaluators ready or busy now (at least 1). Lock-free: called under the study lock."""
        workers = list(self._workers.values())
        return max(
            1, sum(1 for w in workers if w.is_alive() and w.state in (S.EVALUATOR_STATE_IDLE, S.EVALUATOR_STATE_BUSY))
        )

    def evaluator_infos(self, trials: list[optuna.trial.FrozenTrial]) -> list[optimizer_pb2.EvaluatorInfo]:
        done: dict[str, int] = {}
        for t in trials:
            if t.state in st.SCORED_STATES:
                address = t.user_attrs.get("evaluator", "")
                done[address] = done.get(address, 0) + 1
        out = []
        with self._state_lock:
            workers = dict(self._workers) if self.active else {}
        for address in self.pool():
            worker = workers.get(address)
            if worker is not None and worker.is_alive():
                out.append(worker.info(done.get(address, 0)))
            else:
                out.append(
                    optimizer_pb2.EvaluatorInfo(
                        address=address,
                        n_trials_done=done.get(address, 0),
                        state=S.EVALUATOR_STATE_UNSPECIFIED,
                        last_error=worker.last_error if worker is not None else "",
                    )
                )
        return out

    def current_state(self, n_complete: int) -> int:
        with self._state_lock:
            if self.active:
                return self.state
            if n_complete >= self.settings.n_trials:
                return S.STUDY_STATE_DONE
            if self.state in (S.STUDY_STATE_STOPPED, S.STUDY_STATE_FAILED):
                return self.state
            return S.STUDY_STATE_STOPPED if self.study.user_attrs.get("n_runs") else S.STUDY_STATE_CREATED

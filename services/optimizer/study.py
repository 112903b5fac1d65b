"""The Optuna side of the optimizer: storage, study settings, trial bookkeeping.

A study is an Optuna multi-objective study (minimize KL, minimize refusals)
sampled by ``TPESampler(multivariate=True, constant_liar=True, seed,
n_startup_trials, n_ei_candidates)`` on RDB storage (Postgres, or SQLite embedded). Everything
needed to resume it lives in the storage:

- study user attrs: ``direction_set_id``, ``job_settings`` (the JSON object),
  ``job_settings_json`` (the string as given) and ``settings`` (n_trials, seed,
  resolved search space, baseline spec, lease and retry settings, evaluator
  pool, model summary, creation time), ``n_runs`` (runs started, by every
  process: the index of a run seeds its sampler);
- trial user attrs: ``params`` (``AblationParams.to_dict()``), ``evaluator``,
  ``timings`` (seconds), ``n_refusal_prompts``/``n_kl_prompts``, ``degenerate``
  (replies that repeat themselves, beside the refusals), ``unjudged`` (replies the judge could
  not tell), ``error``
  (FAIL), ``retry_of``/``attempt`` (retries), ``warm_start``, ``run_id`` (the
  optimizer loop that asked it, to recognise trials orphaned by a killed one).

Torch-free; no gRPC server code here.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from optuna.trial import FrozenTrial, TrialState

from abliterate import database
from abliterate.database import ensure_sqlite_folder
from abliterate.dominance import ScorePoint
from abliterate.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from abliterate.params import AblationParams
from abliterate.rpc.convert import params_to_pb, parse_json_object
from abliterate.v1 import common_pb2, optimizer_pb2
from abliterate_services.optimizer.search_space import SearchSpace

log = logging.getLogger(__name__)

optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_TRIAL_TIMEOUT_S = 1800.0
DEFAULT_MAX_TRIAL_RETRIES = 2
#: Seeds beyond numpy's RandomState range are folded into it (the given seed is still reported).
_SEED_MODULUS = 2**32

STATE_TO_PB = {
    TrialState.WAITING: common_pb2.TRIAL_STATE_WAITING,
    TrialState.RUNNING: common_pb2.TRIAL_STATE_RUNNING,
    TrialState.COMPLETE: common_pb2.TRIAL_STATE_COMPLETE,
    TrialState.FAIL: common_pb2.TRIAL_STATE_FAIL,
    TrialState.PRUNED: common_pb2.TRIAL_STATE_PRUNED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}

#: Trials that count toward ``n_trials``: COMPLETE, and PRUNED (scored until certainly dominated).
SCORED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


# ---------------------------------------------------------------- storage

_storages: dict[tuple[str, int, int], optuna.storages.RDBStorage] = {}
_storages_lock = threading.Lock()

#: Seconds between heartbeats of a trial in flight, and without one before any optimizer fails it.
DEFAULT_HEARTBEAT_INTERVAL_S = 10
DEFAULT_GRACE_PERIOD_S = 60

#: Why a trial Optuna failed for a stale heartbeat failed.
STALE_TRIAL_ERROR = "interrupted: the optimizer running it stopped (no heartbeat within the grace period)"

#: study name -> what to do with a trial Optuna failed for a stale heartbeat (set by the study's runner).
stale_trial_handlers: dict[str, Callable[[optuna.Study, FrozenTrial], None]] = {}


def _on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat-stale callback: the trial's optimizer died; its runner here re-enqueues it."""
    handler = stale_trial_handlers.get(study.study_name)
    if handler is not None:
        handler(study, trial)
    else:  # no runner of this study in this process (cannot happen: only runners fail stale trials)
        log.warning("stale trial %d of study %s has no handler", trial.number, study.study_name)


def open_storage(
    url: str, heartbeat_interval_s: int = DEFAULT_HEARTBEAT_INTERVAL_S, grace_period_s: int = DEFAULT_GRACE_PERIOD_S
) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url`` (``postgresql+psycopg://...`` or ``sqlite:///path``), one per URL.

    Optuna's heartbeat is on: a trial in flight is heartbeaten by the optimizer
    running it, and any optimizer fails (and re-enqueues) a trial whose last
    heartbeat is older than ``grace_period_s``. Creates the tables when missing;
    UNAVAILABLE when the database cannot be reached.
    """
    if not url:
        raise InvalidArgument("no storage URL configured")
    key = (url, int(heartbeat_interval_s), int(grace_period_s))
    with _storages_lock:
        storage = _storages.get(key)
        if storage is not None:
            return storage
        if url.startswith("sqlite"):
            ensure_sqlite_folder(url)
            engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            # pre-ping: a connection the database dropped (restart, outage) is replaced, not used.
            engine_kwargs = {
                "pool_pre_ping": True,
                "pool_size": 10,
                "max_overflow": 20,
                "connect_args": {"connect_timeout": 10},
            }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=int(heartbeat_interval_s),
                    grace_period=int(grace_period_s),
                    heartbeat_stale_trial_callback=_on_stale_trial,
                )
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors vary
            raise Unavailable(f"storage {_redact(url)} is not reachable: {exc}") from exc
        _storages[key] = storage
        return storage


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


def ping_storage(storage: optuna.storages.RDBStorage) -> None:
    """Raise when the database does not answer."""
    database.ping(storage.engine)


# ---------------------------------------------------------------- settings


@dataclass
class StudySettings:
    """What a study was created with (stored in its user attrs)."""

    direction_set_id: str
    n_trials: int
    seed: int
    search_space: SearchSpace
    baseline: common_pb2.BaselineSpec
    job_settings_json: str = "{}"
    trial_timeout_s: float = DEFAULT_TRIAL_TIMEOUT_S
    max_trial_retries: int = DEFAULT_MAX_TRIAL_RETRIES
    #: Stop a trial's refusal probes once a completed trial certainly dominates it (the trial is then PRUNED).
    prune_dominated: bool = True
    evaluator_addresses: list[str] = field(default_factory=list)
    model: dict | None = None
    created_at: str = ""

    def to_dict(self) -> dict:
        return {
            "direction_set_id": self.direction_set_id,
            "n_trials": self.n_trials,
            "seed": self.seed,
            "search_space": self.search_space.to_dict(),
            "baseline": json_format.MessageToDict(self.baseline),
            "trial_timeout_s": self.trial_timeout_s,
            "max_trial_retries": self.max_trial_retries,
            "prune_dominated": self.prune_dominated,
            "evaluator_addresses": list(self.evaluator_addresses),
            "model": self.model,
            "created_at": self.created_at,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> "StudySettings":
        data = attrs["settings"]
        baseline = common_pb2.BaselineSpec()
        json_format.ParseDict(data.get("baseline") or {}, baseline)
        return cls(
            direction_set_id=data["direction_set_id"],
            n_trials=int(data["n_trials"]),
            seed=int(data["seed"]),
            search_space=SearchSpace.from_dict(data["search_space"]),
            baseline=baseline,
            job_settings_json=attrs.get("job_settings_json", "{}"),
            trial_timeout_s=float(data.get("trial_timeout_s", DEFAULT_TRIAL_TIMEOUT_S)),
            max_trial_retries=int(data.get("max_trial_retries", DEFAULT_MAX_TRIAL_RETRIES)),
            prune_dominated=bool(data.get("prune_dominated", True)),
            evaluator_addresses=list(data.get("evaluator_addresses", [])),
            model=data.get("model"),
            created_at=data.get("created_at", ""),
        )


def parse_job_settings(text: str) -> dict:
    """The job settings JSON object (empty text = {}); INVALID_ARGUMENT otherwise."""
    return parse_json_object(text, "job_settings_json")


def random_seed() -> int:
    return random.SystemRandom().randrange(_SEED_MODULUS)


def sampler_seed(seed: int, run_index: int) -> int:
    """The sampler's seed of the ``run_index``-th run of a study (counted over every process).

    The first run samples with ``seed`` itself (reproducible); any later one
    (a resume, or a second optimizer on the same study) mixes in its index,
    else its random start-up trials would replay another run's parameters.
    """
    if run_index == 0:
        return int(seed) % _SEED_MODULUS
    return (int(seed) * 1_000_003 + run_index * 7_919 + 1) % _SEED_MODULUS


def make_sampler(seed: int, search_space) -> optuna.samplers.TPESampler:
    """The study's sampler: multivariate TPE with the space's start-up and candidate counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            multivariate=True,
            constant_liar=True,
            seed=int(seed) % _SEED_MODULUS,
            n_startup_trials=int(search_space.n_startup_trials),
            n_ei_candidates=int(search_space.n_ei_candidates),
        )


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def create_study(
    storage: optuna.storages.RDBStorage, name: str, settings: StudySettings, job_settings: dict
) -> optuna.Study:
    """A new study with its settings in the user attrs (ALREADY_EXISTS when the name is taken)."""
    if not settings.created_at:
        settings.created_at = dt.datetime.now(dt.timezone.utc).isoformat()
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=["minimize", "minimize"],
            sampler=make_sampler(settings.seed, settings.search_space),
        )
    except optuna.exceptions.DuplicatedStudyError as exc:
        raise AlreadyExists(f"study {name!r} already exists") from exc
    write_settings(study, settings, job_settings)
    return study


def write_settings(study: optuna.Study, settings: StudySettings, job_settings: dict | None = None) -> None:
    study.set_user_attr("direction_set_id", settings.direction_set_id)
    if job_settings is not None:
        study.set_user_attr("job_settings", job_settings)
        study.set_user_attr("job_settings_json", settings.job_settings_json)
    # Written last: a study without it was never fully created.
    study.set_user_attr("settings", settings.to_dict())


def load_study(
    storage: optuna.storages.RDBStorage, name: str, run_index: int = 0
) -> tuple[optuna.Study, StudySettings]:
    """The stored study and its settings (NOT_FOUND when unknown), sampling as run ``run_index``."""
    if not name:
        raise InvalidArgument("study_name is required")
    if not study_exists(storage, name):
        raise NotFound(f"no study named {name!r}")
    probe = optuna.load_study(study_name=name, storage=storage)
    attrs = probe.user_attrs
    if "settings" not in attrs:
        raise FailedPrecondition(f"study {name!r} was not created by this optimizer (no settings attribute)")
    settings = StudySettings.from_attrs(attrs)
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(sampler_seed(settings.seed, run_index), settings.search_space),
    )
    return study, settings


# ---------------------------------------------------------------- trials


def set_trial_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(trial._trial_id, key, value)  # noqa: SLF001 - no public API for a FrozenTrial


def counts(trials: list[FrozenTrial]) -> dict[TrialState, int]:
    out = {state: 0 for state in TrialState}
    for t in trials:
        out[t.state] += 1
    return out


def n_scored(counted: dict[TrialState, int]) -> int:
    """Trials that count toward ``n_trials`` (COMPLETE plus PRUNED), from :func:`counts`."""
    return sum(counted[state] for state in SCORED_STATES)


def front_points(study: optuna.Study) -> list[ScorePoint]:
    """The Pareto front's scores, sent with each trial so an evaluator can stop a dominated one early."""
    return [ScorePoint(float(t.values[0]), int(round(t.values[1])), t.number) for t in study.best_trials]


def record_pruned(trial: optuna.Trial, kl: float, refusals_at_least: int, dominated_by: int | None) -> None:
    """What a PRUNED trial proved, in its user attrs (Optuna stores no values for a pruned trial)."""
    trial.set_user_attr("pruned", {"kl": kl, "refusals_at_least": refusals_at_least, "dominated_by": dominated_by})


def pareto_front(study: optuna.Study) -> list[int]:
    """Numbers of the trials on the study's Pareto front (Optuna's ``best_trials``; both objectives minimized)."""
    return sorted(t.number for t in study.best_trials)


def eta_seconds(trials: list[FrozenTrial], n_trials: int, parallel: int) -> float | None:
    """Remaining trials times the mean duration of the last ten scored ones, over ``parallel``."""
    done = [t for t in trials if t.state in SCORED_STATES and t.datetime_start and t.datetime_complete]
    remaining = n_trials - len(done)
    if remaining <= 0:
        return 0.0
    if not done:
        return None
    recent = sorted(done, key=lambda t: t.datetime_complete)[-10:]
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in recent) / len(recent)
    return remaining * mean / max(1, parallel)


def timestamp(when: dt.datetime | None = None) -> Timestamp:
    ts = Timestamp()
    when = when or dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        when = when.astimezone()  # Optuna stores naive local times
    ts.FromDatetime(when.astimezone(dt.timezone.utc))
    return ts


def trial_params(trial: FrozenTrial, space: SearchSpace) -> AblationParams | None:
    """The trial's AblationParams: from its ``params`` attribute, else from its Optuna values."""
    stored = trial.user_attrs.get("params")
    if stored:
        return AblationParams.from_dict(stored)
    if trial.params:
        return space.params_from_optuna(trial.params)
    return None


def trial_to_pb(trial: FrozenTrial, space: SearchSpace, front: set[int]) -> common_pb2.Trial:
    attrs = trial.user_attrs
    msg = common_pb2.Trial(
        number=trial.number,
        state=STATE_TO_PB.get(trial.state, common_pb2.TRIAL_STATE_UNSPECIFIED),
        evaluator=attrs.get("evaluator", "") if trial.state != TrialState.WAITING else "",
        on_pareto_front=trial.number in front,
        # Our own failures record why; a FAIL without a reason was failed by Optuna's heartbeat check.
        error=attrs.get("error", STALE_TRIAL_ERROR) if trial.state == TrialState.FAIL else "",
        warm_start=bool(attrs.get("warm_start", False)),
    )
    params = trial_params(trial, space)
    if params is not None:
        msg.params.CopyFrom(params_to_pb(params))
    if attrs.get("retry_of") is not None:
        msg.retry_of = int(attrs["retry_of"])
    if trial.datetime_start is not None:
        msg.started_at.CopyFrom(timestamp(trial.datetime_start))
    if trial.datetime_complete is not None:
        msg.finished_at.CopyFrom(timestamp(trial.datetime_complete))
    pruned = attrs.get("pruned")
    if trial.state == TrialState.COMPLETE and trial.values:
        msg.scores.CopyFrom(_scores(attrs, kl=trial.values[0], refusals=trial.values[1]))
    elif trial.state == TrialState.PRUNED and pruned:
        # KL is exact; refusals is the bound at which ``dominated_by`` was proven to dominate.
        msg.scores.CopyFrom(_scores(attrs, kl=pruned["kl"], refusals=pruned["refusals_at_least"], pruned=True))
        if pruned.get("dominated_by") is not None:
            msg.scores.dominated_by = int(pruned["dominated_by"])
    return msg


def _scores(attrs: dict, kl: float, refusals: float, pruned: bool = False) -> common_pb2.TrialScores:
    return common_pb2.TrialScores(
        kl=float(kl),
        refusals=int(round(refusals)),
        n_refusal_prompts=int(attrs.get("n_refusal_prompts", 0)),
        n_kl_prompts=int(attrs.get("n_kl_prompts", 0)),
        degenerate=int(attrs.get("degenerate", 0)),
        unjudged=int(attrs.get("unjudged", 0)),
        timings_s={k: float(v) for k, v in (attrs.get("timings") or {}).items()},
        pruned=pruned,
    )


def trial_finished(
    trial: FrozenTrial,
    trials: list[FrozenTrial],
    front: list[int],
    settings: StudySettings,
    n_complete: int | None = None,
) -> optimizer_pb2.TrialFinished:
    """The event of a scored (COMPLETE or PRUNED) ``trial`` given every trial of the study and the front's numbers: the
    front's trials, the counts (``n_complete`` overrides the count, for replayed history) and no ETA."""
    on_front = set(front)
    by_number = {t.number: t for t in trials}
    space = settings.search_space
    counted = counts(trials)
    return optimizer_pb2.TrialFinished(
        trial=trial_to_pb(trial, space, on_front),
        pareto_front=front,
        front_trials=[trial_to_pb(by_number[number], space, on_front) for number in front],
        n_complete=n_scored(counted) if n_complete is None else n_complete,
        n_trials=settings.n_trials,
        n_failed=counted[TrialState.FAIL],
        n_pruned=counted[TrialState.PRUNED],
    )

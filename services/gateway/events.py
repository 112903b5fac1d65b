"""Job events: building them, publishing them, following them; Pareto-front selection.

The store is the source of truth (every event is persisted with its sequence
number before anyone sees it); :class:`EventBus` only wakes watchers up, so a
watcher that reconnects, or a gateway that restarted, replays from the store.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

from abliterate.v1 import common_pb2, gateway_pb2
from abliterate_services.gateway.jobs import TERMINAL_PHASES, JobStore

DEFAULT_KL_CAP = 1.0


def selection_rule(kl_cap: float, audited: bool = False) -> str:
    counted = "audited refusals (long replies)" if audited else "refusals"
    return (
        f"fewest {counted} among Pareto trials with KL <= {kl_cap:g}, ties by lower KL; "
        f"if none is under the cap: lowest KL"
    )


def all_audited(trials: Sequence[common_pb2.Trial]) -> bool:
    """Whether every scored trial carries an audit (then the auto-selection counts audited refusals)."""
    scored = [t for t in trials if t.HasField("scores")]
    return bool(scored) and all(t.HasField("audit") for t in scored)


def effective_kl_cap(spec: gateway_pb2.JobSpec, override: float | None = None) -> float:
    if override is not None and override > 0:
        return float(override)
    return float(spec.kl_cap) if spec.kl_cap > 0 else DEFAULT_KL_CAP


def auto_select(trials: Sequence[common_pb2.Trial], kl_cap: float) -> common_pb2.Trial | None:
    """The rule: fewest refusals among trials with KL <= kl_cap (then lowest KL); none under the cap:
    lowest KL. Non-finite KLs are never preferred. When every trial carries an audit, its refusal
    rate on long replies is what counts."""
    scored = [t for t in trials if t.HasField("scores")]
    if not scored:
        return None

    def kl(t: common_pb2.Trial) -> float:
        return t.scores.kl if math.isfinite(t.scores.kl) else math.inf

    audited = all_audited(scored)  # the audit's counts on one prompt set, or the search's: never mixed

    def refusals(t: common_pb2.Trial) -> float:
        return t.audit.refusals / max(1, t.audit.n_prompts) if audited else t.scores.refusals

    under = [t for t in scored if kl(t) <= kl_cap]
    if under:
        return min(under, key=lambda t: (refusals(t), kl(t), t.number))
    return min(scored, key=lambda t: (kl(t), refusals(t), t.number))


def front_message(front: Sequence[common_pb2.Trial], kl_cap: float) -> gateway_pb2.ParetoFront:
    """The ParetoFront message of the optimizer's front (its trials, listed by refusals, then KL, then
    number) with the auto-selected trial."""
    front = sorted(front, key=lambda t: (t.scores.refusals, t.scores.kl, t.number))
    msg = gateway_pb2.ParetoFront(selection_rule=selection_rule(kl_cap, all_audited(front)), kl_cap=kl_cap)
    for t in front:
        copy = msg.trials.add()
        copy.CopyFrom(t)
        copy.on_pareto_front = True
    chosen = auto_select(front, kl_cap)
    if chosen is not None:
        msg.auto_selected_trial = chosen.number
    return msg


# ------------------------------------------------------------------ builders


def phase_event(previous: int, current: int, message: str = "") -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(
        phase_changed=gateway_pb2.PhaseChanged(previous=previous, current=current, message=message)
    )


def progress_event(progress: common_pb2.Progress, eta_s: float | None = None) -> gateway_pb2.JobEvent:
    event = gateway_pb2.JobEvent(progress=progress)
    if eta_s is not None:
        event.eta_s = eta_s
    return event


def error_event(code: str, message: str, recoverable: bool = False) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(error=gateway_pb2.JobError(code=code, message=message, recoverable=recoverable))


def is_terminal_event(event: gateway_pb2.JobEvent) -> bool:
    return event.WhichOneof("event") == "phase_changed" and event.phase_changed.current in TERMINAL_PHASES


# ------------------------------------------------------------------ the bus


class EventBus:
    """Persists events and wakes up the watchers of a job."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._version: dict[str, int] = {}
        self._closed = False

    def publish(self, job_id: str, event: gateway_pb2.JobEvent) -> gateway_pb2.JobEvent:
        stored = self.store.append_event(job_id, event)
        self.notify(job_id)
        return stored

    def notify(self, job_id: str) -> None:
        with self._cond:
            self._version[job_id] = self._version.get(job_id, 0) + 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def version(self, job_id: str) -> int:
        with self._cond:
            return self._version.get(job_id, 0)

    def wait(self, job_id: str, seen_version: int, timeout_s: float) -> int:
        """Block until the job's version moves past ``seen_version`` (or timeout/close); return it."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._version.get(job_id, 0) != seen_version, timeout=timeout_s)
            return self._version.get(job_id, 0)

    @property
    def closed(self) -> bool:
        return self._closed

    def follow(
        self, job_id: str, after_sequence: int, is_active: Callable[[], bool], poll_s: float = 1.0
    ) -> Iterator[gateway_pb2.JobEvent]:
        """Stored events with sequence > after_sequence, then live ones; stops once the job is in a
        terminal phase and every stored event has been yielded (or the caller goes away)."""
        last = after_sequence
        while is_active() and not self._closed:
            version = self.version(job_id)
            batch = self.store.events_after(job_id, last)
            for event in batch:
                last = event.sequence
                yield event
            if batch:
                continue
            if self.store.get(job_id).terminal and not self.store.events_after(job_id, last, limit=1):
                return
            self.wait(job_id, version, poll_s)

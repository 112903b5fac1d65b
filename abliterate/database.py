"""Riding out a database outage: which errors are one, retrying through them, a lock across processes.

The optimizer (Optuna's RDB storage) and the gateway (its job store) share
these rules, so a Postgres restart or a network blip of seconds to minutes
delays a job instead of failing it:

- :func:`is_outage` says whether an exception means "the database did not
  answer" (connection refused or dropped, pool exhausted), also when Optuna
  wrapped it in a ``StorageInternalError``;
- :func:`retry_through_outage` calls a function again with exponential
  back-off (tenacity) while it fails that way, for at most ``patience_s``
  seconds, then raises :class:`~abliterate.errors.Unavailable`;
- :func:`watch_database` keeps a service's health in step with its database;
- :class:`StudyLock` serialises a critical section across every process that
  works on one study (a Postgres advisory lock; a process lock on SQLite,
  which serves one process).

No grpc, no torch; ``abliterate.rpc.errors`` maps an outage to UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import sqlalchemy as sa
import tenacity

from abliterate.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Default seconds to keep retrying a database call before the caller sees UNAVAILABLE.
DEFAULT_PATIENCE_S = 600.0
#: Back-off: first wait, and the cap of the doubling waits (seconds).
_FIRST_WAIT_S = 0.2
_MAX_WAIT_S = 5.0


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the chain of exceptions it was raised from (bounded, cycle-safe)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says the database could not be reached or dropped us."""
    for cause in _causes(exc):
        # PendingRollbackError: a session whose connection the database dropped mid-transaction.
        if isinstance(
            cause,
            (
                sa.exc.OperationalError,
                sa.exc.InterfaceError,
                sa.exc.TimeoutError,
                sa.exc.DisconnectionError,
                sa.exc.PendingRollbackError,
            ),
        ):
            return True
        if isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated:
            return True
        # psycopg's own classes, raised outside a SQLAlchemy call (no import: the driver is optional).
        module = type(cause).__module__ or ""
        if module.startswith("psycopg") and type(cause).__name__ in ("OperationalError", "InterfaceError"):
            return True
    return False


def describe_outage(exc: BaseException) -> str:
    """One line on why the database did not answer (the driver's first line, no SQL)."""
    for cause in _causes(exc):
        if isinstance(cause, sa.exc.DBAPIError) and cause.orig is not None:
            return str(cause.orig).strip().splitlines()[0] if str(cause.orig).strip() else type(cause.orig).__name__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def retry_through_outage(
    function: Callable[[], T], *, what: str, patience_s: float = DEFAULT_PATIENCE_S, stop: threading.Event | None = None
) -> T:
    """``function()``, called again with back-off while the database is unreachable.

    Other errors pass through at once. After ``patience_s`` seconds of outage
    (or once ``stop`` is set) the last outage becomes :class:`Unavailable`.
    """

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "database unreachable during %s (attempt %d): %s; retrying",
            what,
            state.attempt_number,
            describe_outage(error) if error else "?",
        )

    stop_rule = tenacity.stop_after_delay(patience_s)
    if stop is not None:
        stop_rule = stop_rule | (lambda _state: stop.is_set())
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_outage),
        wait=tenacity.wait_exponential(multiplier=_FIRST_WAIT_S, max=_MAX_WAIT_S),
        stop=stop_rule,
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(function)
    except Exception as exc:
        if is_outage(exc):
            raise Unavailable(f"the database is unreachable ({what}): {describe_outage(exc)}") from exc
        raise


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a ``sqlite:///path`` database file (SQLite creates the file, not its folder)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + ":memory:"):
        folder = os.path.dirname(url[len(prefix) :].split("?", 1)[0])
        if folder:
            os.makedirs(folder, exist_ok=True)


def ping(engine: sa.engine.Engine) -> None:
    """Raise when the database does not answer a trivial query."""
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))


def watch_database(
    check: Callable[[], None],
    set_serving: Callable[[bool], None],
    stop: threading.Event,
    period_s: float = 5.0,
    name: str = "database",
) -> None:
    """Until ``stop``: call ``check()`` every ``period_s`` seconds (every 1 s while it fails) and report
    ``set_serving(True)`` while it answers, ``set_serving(False)`` while it raises."""
    serving: bool | None = None
    while not stop.is_set():
        try:
            check()
            reachable = True
        except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
            reachable = False
            log.warning("%s not reachable: %s", name, describe_outage(exc))
        if reachable != serving:
            set_serving(reachable)
            log.info(
                "%s %s: health %s",
                name,
                "reachable" if reachable else "unreachable",
                "SERVING" if reachable else "NOT_SERVING",
            )
            serving = reachable
        stop.wait(period_s if reachable else min(period_s, 1.0))


class StudyLock:
    """Mutual exclusion for one study across threads and, on Postgres, across processes.

    Postgres: a transaction-scoped advisory lock keyed by the study name, so
    a killed holder's lock goes with its connection. SQLite: a lock of this
    process (an embedded run is one process).
    """

    _process_locks: dict[str, threading.Lock] = {}
    _registry_lock = threading.Lock()

    def __init__(self, engine: sa.engine.Engine, study_name: str) -> None:
        self.engine = engine
        self.study_name = study_name
        # Signed 64-bit key, as pg_advisory_xact_lock takes.
        self.key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        with self._registry_lock:
            self._local = self._process_locks.setdefault(f"{engine.url}|{study_name}", threading.Lock())

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._local:
            if self.engine.dialect.name != "postgresql":
                yield
                return
            with self.engine.begin() as connection:
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.key})
                yield

"""The gateway's job store: jobs, their events and the direction-set bytes, in SQL.

SQLAlchemy Core over PostgreSQL (``postgresql+psycopg://...``) or SQLite
(``sqlite:///path.db``). Everything a job needs survives a gateway restart:
its spec, phase, direction-set id (and bytes, so a study can be re-created
on an optimizer that lost them), study name, counts, error, the auto-selected
trial and every event in order (WatchJob replays them).

Tables carry a ``gateway_`` prefix so they can share a database with Optuna's.
No torch, no grpc.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format

from abliterate import database
from abliterate.blobs import BlobStore
from abliterate.database import ensure_sqlite_folder
from abliterate.errors import AlreadyExists, InvalidArgument, NotFound, check_identifier, quoted
from abliterate.v1 import common_pb2, extractor_pb2, gateway_pb2

metadata = sa.MetaData()

jobs_table = sa.Table(
    "gateway_jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("phase", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("direction_set_id", sa.String(64), nullable=False, default=""),
    sa.Column("study_name", sa.String(200), nullable=False, default=""),
    sa.Column("model_json", sa.Text, nullable=False, default=""),
    sa.Column("diagnostics_json", sa.Text, nullable=False, default=""),
    sa.Column("n_trials_complete", sa.Integer, nullable=False, default=0),
    sa.Column("n_trials_failed", sa.Integer, nullable=False, default=0),
    sa.Column("eta_s", sa.Float, nullable=True),
    sa.Column("auto_selected_trial", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
)

events_table = sa.Table(
    "gateway_job_events",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("gateway_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("sequence", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("event_json", sa.Text, nullable=False),
)

# The latest long-reply audit of each audited trial (GatewayService.AuditJob).
audits_table = sa.Table(
    "gateway_trial_audits",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("gateway_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("trial_number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("audit_json", sa.Text, nullable=False),
    sa.Column("audited_at", sa.Float, nullable=False),
)

# Direction-set bytes of earlier versions (now in abliterate_blobs; read once and moved over).
artifacts_table = sa.Table(
    "gateway_artifacts",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

P = gateway_pb2
RUNNING_PHASES = frozenset({P.JOB_PHASE_QUEUED, P.JOB_PHASE_EXTRACTING, P.JOB_PHASE_OPTIMIZING})
TERMINAL_PHASES = frozenset({P.JOB_PHASE_SUCCEEDED, P.JOB_PHASE_FAILED, P.JOB_PHASE_CANCELLED, P.JOB_PHASE_INTERRUPTED})


def phase_name(phase: int) -> str:
    return P.JobPhase.Name(phase).removeprefix("JOB_PHASE_")


@dataclasses.dataclass
class JobRecord:
    """One row of ``gateway_jobs``, decoded."""

    id: str
    name: str
    spec: gateway_pb2.JobSpec
    phase: int
    error: str = ""
    direction_set_id: str = ""
    study_name: str = ""
    model: common_pb2.ModelInfo | None = None
    diagnostics: list[extractor_pb2.LayerDiagnostics] = dataclasses.field(default_factory=list)
    methods: extractor_pb2.MethodSummary | None = None
    n_trials_complete: int = 0
    n_trials_failed: int = 0
    eta_s: float | None = None
    auto_selected_trial: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def to_pb(self) -> gateway_pb2.Job:
        job = gateway_pb2.Job(
            id=self.id,
            name=self.name,
            spec=self.spec,
            phase=self.phase,
            error=self.error,
            direction_set_id=self.direction_set_id,
            study_name=self.study_name,
            n_trials_complete=self.n_trials_complete,
            n_trials_failed=self.n_trials_failed,
        )
        job.created_at.FromNanoseconds(int(self.created_at * 1e9))
        job.updated_at.FromNanoseconds(int(self.updated_at * 1e9))
        if self.finished_at is not None:
            job.finished_at.FromNanoseconds(int(self.finished_at * 1e9))
        if self.model is not None:
            job.model.CopyFrom(self.model)
        job.diagnostics.extend(self.diagnostics)
        if self.methods is not None:
            job.methods.CopyFrom(self.methods)
        if self.eta_s is not None:
            job.eta_s = self.eta_s
        if self.auto_selected_trial is not None:
            job.auto_selected_trial = self.auto_selected_trial
        return job

    def to_summary_pb(self) -> gateway_pb2.Job:
        """The job as ListJobs shows it: no diagnostics or model info, and of the spec only the name, the
        model's source and n_trials, so a page stays small whatever the specs hold."""
        job = self.to_pb()
        job.ClearField("diagnostics")
        job.ClearField("methods")
        job.ClearField("model")
        job.spec.CopyFrom(
            gateway_pb2.JobSpec(
                name=self.spec.name,
                model=common_pb2.ModelSpec(source=self.spec.model.source),
                n_trials=self.spec.n_trials,
            )
        )
        return job


def _to_json(msg: Any) -> str:
    return json_format.MessageToJson(msg, indent=None, preserving_proto_field_name=True)


def _from_json(text: str, cls: Any) -> Any:
    msg = cls()
    json_format.Parse(text, msg, ignore_unknown_fields=True)
    return msg


def _row_to_record(row: Any) -> JobRecord:
    diagnostics: list[extractor_pb2.LayerDiagnostics] = []
    methods = None
    if row.diagnostics_json:
        stored = json.loads(row.diagnostics_json)
        if isinstance(stored, dict):  # {"layers": [...], "methods": {...}}: a set with method reports
            methods = json_format.ParseDict(
                stored["methods"], extractor_pb2.MethodSummary(), ignore_unknown_fields=True
            )
            stored = stored["layers"]
        diagnostics = [
            json_format.ParseDict(d, extractor_pb2.LayerDiagnostics(), ignore_unknown_fields=True) for d in stored
        ]
    return JobRecord(
        id=row.id,
        name=row.name,
        spec=_from_json(row.spec_json, gateway_pb2.JobSpec),
        phase=row.phase,
        error=row.error or "",
        direction_set_id=row.direction_set_id or "",
        study_name=row.study_name or "",
        model=_from_json(row.model_json, common_pb2.ModelInfo) if row.model_json else None,
        diagnostics=diagnostics,
        methods=methods,
        n_trials_complete=row.n_trials_complete or 0,
        n_trials_failed=row.n_trials_failed or 0,
        eta_s=row.eta_s,
        auto_selected_trial=row.auto_selected_trial,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
    )


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        ensure_sqlite_folder(url)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class JobStore:
    """Jobs, events and artifacts in one SQL database (thread-safe)."""

    def __init__(self, url: str) -> None:
        if not url:
            raise InvalidArgument("the gateway storage URL is empty")
        self.url = url
        self.engine = _engine(url)
        # One writer at a time in this process: event sequence numbers are
        # allocated as max + 1, and SQLite dislikes concurrent writers.
        self._lock = threading.RLock()
        metadata.create_all(self.engine)
        # Direction-set bytes: the blob store every service on this database reads (abliterate.blobs).
        self.blobs = BlobStore(engine=self.engine)

    def ping(self) -> None:
        """Raise when the database does not answer."""
        database.ping(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ jobs

    def create_job(self, spec: gateway_pb2.JobSpec, phase: int = P.JOB_PHASE_QUEUED) -> JobRecord:
        now = time.time()
        job_id = uuid.uuid4().hex
        spec = gateway_pb2.JobSpec.FromString(spec.SerializeToString())
        if not spec.name:
            spec.name = f"job-{job_id[:12]}"
        with self._lock, self.engine.begin() as conn:
            taken = conn.execute(sa.select(jobs_table.c.id).where(jobs_table.c.name == spec.name)).first()
            if taken is not None:
                raise AlreadyExists(f"a job named {spec.name!r} already exists (id {taken.id})")
            try:
                conn.execute(
                    jobs_table.insert().values(
                        id=job_id,
                        name=spec.name,
                        spec_json=_to_json(spec),
                        phase=phase,
                        error="",
                        direction_set_id="",
                        study_name="",
                        model_json="",
                        diagnostics_json="",
                        n_trials_complete=0,
                        n_trials_failed=0,
                        eta_s=None,
                        auto_selected_trial=None,
                        created_at=now,
                        updated_at=now,
                        finished_at=None,
                    )
                )
            except sa.exc.IntegrityError as exc:
                raise AlreadyExists(f"a job named {spec.name!r} already exists") from exc
        return self.get(job_id)

    def get(self, id_or_name: str) -> JobRecord:
        """A job by id or by name (NotFound otherwise)."""
        if not id_or_name:
            raise InvalidArgument("job_id is empty")
        check_identifier(id_or_name, "job_id")
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(jobs_table).where(sa.or_(jobs_table.c.id == id_or_name, jobs_table.c.name == id_or_name))
            ).first()
        if row is None:
            raise NotFound(f"no job with id or name {quoted(id_or_name)}")
        return _row_to_record(row)

    def list(self, phases: Sequence[int] = (), offset: int = 0, limit: int = 0) -> tuple[list[JobRecord], int]:
        """Jobs newest first, filtered by phase; also the count before offset/limit."""
        query = sa.select(jobs_table)
        count = sa.select(sa.func.count()).select_from(jobs_table)
        if phases:
            query = query.where(jobs_table.c.phase.in_(list(phases)))
            count = count.where(jobs_table.c.phase.in_(list(phases)))
        query = query.order_by(jobs_table.c.created_at.desc(), jobs_table.c.id).offset(offset)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            total = conn.execute(count).scalar_one()
        return [_row_to_record(r) for r in rows], int(total)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set columns of a job (``spec``, ``model`` and ``diagnostics`` are encoded here)."""
        values: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "spec":
                values["spec_json"] = _to_json(value)
            elif key == "model":
                values["model_json"] = _to_json(value) if value is not None else ""
            elif key == "diagnostics":
                layers = [json_format.MessageToDict(d, preserving_proto_field_name=True) for d in value]
                summary = fields.get("methods")
                # The method reports travel in the same column (no schema change for existing databases):
                # a plain list as before, or an object with the layers and the reports.
                stored = (
                    {"layers": layers, "methods": json_format.MessageToDict(summary, preserving_proto_field_name=True)}
                    if summary is not None
                    else layers
                )
                values["diagnostics_json"] = json.dumps(stored)
            elif key == "methods":
                if "diagnostics" not in fields:
                    raise ValueError("methods are stored with the diagnostics: update both at once")
            else:
                values[key] = value
        values["updated_at"] = time.time()
        if "phase" in fields:
            values["finished_at"] = values["updated_at"] if fields["phase"] in TERMINAL_PHASES else None
        with self._lock, self.engine.begin() as conn:
            result = conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(**values))
            if result.rowcount == 0:
                raise NotFound(f"no job with id {job_id!r}")
        return self.get(job_id)

    def count_by_phase(self) -> dict[int, int]:
        """How many jobs are in each phase (every phase, 0 included): one GROUP BY, no job decoded."""
        counts = {phase: 0 for phase in P.JobPhase.values() if phase != P.JOB_PHASE_UNSPECIFIED}
        query = sa.select(jobs_table.c.phase, sa.func.count()).group_by(jobs_table.c.phase)
        with self.engine.connect() as conn:
            for phase, n in conn.execute(query):
                counts[int(phase)] = int(n)
        return counts

    def jobs_in_phases(self, phases: Iterable[int]) -> list[JobRecord]:
        return self.list(phases=list(phases))[0]

    # ---------------------------------------------------------------- events

    def append_event(self, job_id: str, event: gateway_pb2.JobEvent) -> gateway_pb2.JobEvent:
        """Store ``event`` with the job's next sequence number and the current time; returns it."""
        event = gateway_pb2.JobEvent.FromString(event.SerializeToString())
        now = time.time()
        with self._lock, self.engine.begin() as conn:
            last = conn.execute(
                sa.select(sa.func.max(events_table.c.sequence)).where(events_table.c.job_id == job_id)
            ).scalar()
            event.sequence = int(last or 0) + 1
            event.job_id = job_id
            if not event.HasField("time"):
                event.time.FromNanoseconds(int(now * 1e9))
            conn.execute(
                events_table.insert().values(
                    job_id=job_id, sequence=event.sequence, time=now, event_json=_to_json(event)
                )
            )
        return event

    def events_after(self, job_id: str, after_sequence: int = 0, limit: int = 1000) -> list[gateway_pb2.JobEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events_table.c.event_json)
                .where(events_table.c.job_id == job_id, events_table.c.sequence > after_sequence)
                .order_by(events_table.c.sequence)
                .limit(limit)
            ).all()
        return [_from_json(r.event_json, gateway_pb2.JobEvent) for r in rows]

    def last_sequence(self, job_id: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.max(events_table.c.sequence)).where(events_table.c.job_id == job_id)
                ).scalar()
                or 0
            )

    # ---------------------------------------------------------------- audits

    def put_audit(self, job_id: str, trial_number: int, audit: common_pb2.TrialAudit) -> None:
        """Keep ``audit`` as the trial's latest (an earlier one is replaced)."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(
                audits_table.delete().where(
                    audits_table.c.job_id == job_id, audits_table.c.trial_number == trial_number
                )
            )
            conn.execute(
                audits_table.insert().values(
                    job_id=job_id, trial_number=trial_number, audit_json=_to_json(audit), audited_at=time.time()
                )
            )

    def audits(self, job_id: str) -> dict[int, common_pb2.TrialAudit]:
        """The latest audit of each audited trial of the job, by trial number."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audits_table.c.trial_number, audits_table.c.audit_json).where(audits_table.c.job_id == job_id)
            ).all()
        return {int(row.trial_number): _from_json(row.audit_json, common_pb2.TrialAudit) for row in rows}

    # ------------------------------------------------------------- artifacts

    def put_artifact(self, sha256: str, data: bytes) -> None:
        """Store direction-set bytes in the shared blob store (``abliterate_blobs`` of this database)."""
        stored = self.blobs.put(data)
        if stored != sha256:
            raise InvalidArgument(f"the bytes hash to {stored}, not {sha256}")

    def get_artifact(self, sha256: str) -> bytes | None:
        data = self.blobs.get(sha256)
        if data is not None:
            return data
        # Written by an earlier version into the gateway's own table: read it, move it over.
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(artifacts_table.c.data).where(artifacts_table.c.sha256 == sha256)).first()
        if row is None:
            return None
        self.blobs.put(bytes(row.data))
        return self.blobs.get(sha256)

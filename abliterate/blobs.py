"""Content-addressed bytes (direction sets): one store, named by sha256, that every service can read.

``open_blob_store(location)``:

- a database URL (``postgresql+psycopg://...``, ``sqlite:///path``): the table ``abliterate_blobs``
  of that database. The optimizer and the gateway given the same database share one store, so a
  direction set stored by either is there for both (and for a second optimizer of the study);
- a folder path: one ``<sha256>.safetensors`` file per blob (written atomically);
- ``""``: this process's memory only.

Reads are checked against the name (a blob whose bytes do not hash to its name is ignored) and
cached in memory. No torch, no grpc.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import sqlalchemy as sa

log = logging.getLogger(__name__)

_metadata = sa.MetaData()
blobs_table = sa.Table(
    "abliterate_blobs",
    _metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Bytes by sha256 in memory, backed by a folder or a database table (or nothing)."""

    def __init__(self, folder: str | os.PathLike | None = None, engine: sa.Engine | None = None) -> None:
        if folder and engine is not None:
            raise ValueError("a blob store is a folder or a database, not both")
        self.folder = Path(folder) if folder else None
        self.engine = engine
        self._memory: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._table_ready = False  # created on first use: the database may not answer yet at start-up

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent); its sha256."""
        data = bytes(data)
        digest = sha256_of(data)
        with self._lock:
            self._memory[digest] = data
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{digest}.safetensors"
            if not path.exists():
                partial = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
                partial.write_bytes(data)
                partial.replace(path)
        elif self.engine is not None:
            self._ensure_table()
            with self.engine.begin() as connection:
                exists = connection.execute(
                    sa.select(blobs_table.c.sha256).where(blobs_table.c.sha256 == digest)
                ).first()
                if exists is None:
                    connection.execute(blobs_table.insert().values(sha256=digest, data=data, created_at=time.time()))
        return digest

    def get(self, digest: str) -> bytes | None:
        """The bytes named ``digest``, or None when this store does not hold them."""
        with self._lock:
            cached = self._memory.get(digest)
        if cached is not None:
            return cached
        data = self._read(digest)
        if data is None:
            return None
        if sha256_of(data) != digest:
            log.warning("blob %s does not hash to its name; ignored", digest)
            return None
        with self._lock:
            self._memory[digest] = data
        return data

    def _read(self, digest: str) -> bytes | None:
        if self.folder is not None:
            path = self.folder / f"{digest}.safetensors"
            return path.read_bytes() if path.exists() else None
        if self.engine is not None:
            self._ensure_table()
            with self.engine.connect() as connection:
                row = connection.execute(sa.select(blobs_table.c.data).where(blobs_table.c.sha256 == digest)).first()
            return bytes(row.data) if row is not None else None
        return None

    def _ensure_table(self) -> None:
        if not self._table_ready:
            _metadata.create_all(self.engine, tables=[blobs_table])
            self._table_ready = True


def open_blob_store(location: str, engine: sa.Engine | None = None) -> BlobStore:
    """The store at ``location`` (a database URL, a folder, or "" for memory); ``engine`` reuses an
    engine already open on that database."""
    location = (location or "").strip()
    if not location:
        return BlobStore()
    if "://" in location:
        if engine is None:
            if location.startswith("sqlite"):
                from abliterate.database import ensure_sqlite_folder

                ensure_sqlite_folder(location)
                engine = sa.create_engine(location, connect_args={"timeout": 60})
            else:
                engine = sa.create_engine(location, pool_pre_ping=True)
        return BlobStore(engine=engine)
    return BlobStore(folder=Path(location).expanduser())

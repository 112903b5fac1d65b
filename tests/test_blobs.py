"""The content-addressed blob store: one store per database, whoever opens it."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from abliterate.blobs import BlobStore, blobs_table, open_blob_store

DATA = b"direction-set bytes \x00\x01\x02"
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("kind", ["folder", "sqlite"])
def test_two_stores_on_one_location_share_their_blobs(tmp_path, kind):
    location = str(tmp_path / "blobs") if kind == "folder" else f"sqlite:///{tmp_path / 'shared' / 'db.sqlite'}"
    writer, reader = open_blob_store(location), open_blob_store(location)
    assert reader.get(DIGEST) is None
    assert writer.put(DATA) == DIGEST
    assert writer.put(DATA) == DIGEST  # idempotent
    assert reader.get(DIGEST) == DATA  # another process's store on the same location sees it


def test_memory_store_is_private(tmp_path):
    first, second = open_blob_store(""), open_blob_store("")
    first.put(DATA)
    assert first.get(DIGEST) == DATA and second.get(DIGEST) is None


def test_bytes_that_do_not_match_their_name_are_ignored(tmp_path):
    folder = tmp_path / "blobs"
    folder.mkdir()
    (folder / f"{DIGEST}.safetensors").write_bytes(b"tampered")
    assert open_blob_store(str(folder)).get(DIGEST) is None

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = open_blob_store(url)
    store.get("0" * 64)  # creates the table
    with store.engine.begin() as connection:
        connection.execute(blobs_table.insert().values(sha256=DIGEST, data=b"tampered", created_at=0.0))
    assert open_blob_store(url).get(DIGEST) is None


def test_a_folder_and_a_database_at_once_is_refused(tmp_path):
    with pytest.raises(ValueError):
        BlobStore(folder=tmp_path, engine=sa.create_engine("sqlite://"))


def test_gateway_and_optimizer_on_one_database_read_one_store(tmp_path):
    """The gateway's job store and the optimizer's default store (its study database) are the same table."""
    from abliterate_services.gateway.jobs import JobStore, artifacts_table

    url = f"sqlite:///{tmp_path / 'one.db'}"
    jobs = JobStore(url)
    jobs.put_artifact(DIGEST, DATA)
    assert open_blob_store(url).get(DIGEST) == DATA

    # Bytes an earlier gateway kept in its own table are still found (and moved to the shared store).
    legacy = b"older direction set"
    legacy_digest = hashlib.sha256(legacy).hexdigest()
    with jobs.engine.begin() as connection:
        connection.execute(artifacts_table.insert().values(sha256=legacy_digest, data=legacy, created_at=0.0))
    assert jobs.get_artifact(legacy_digest) == legacy
    assert open_blob_store(url).get(legacy_digest) == legacy
    jobs.close()

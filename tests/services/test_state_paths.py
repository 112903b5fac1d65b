"""Standalone services keep their state inside a data folder, never loose in the current directory."""

from abliterate.database import ensure_sqlite_folder
from abliterate_services.config import DEFAULT_DATA_DIR
from abliterate_services.gateway.config import GatewayConfig
from abliterate_services.optimizer.config import OptimizerConfig


def test_default_state_paths_are_inside_the_data_folder():
    for path in (OptimizerConfig().storage_url, GatewayConfig().storage_url):
        assert f"{DEFAULT_DATA_DIR}/" in path, path


def test_sqlite_folder_is_created(tmp_path):
    target = tmp_path / "deep" / "er" / "state.db"
    ensure_sqlite_folder(f"sqlite:///{target}")
    assert target.parent.is_dir()
    ensure_sqlite_folder("sqlite:///:memory:")  # nothing to create
    ensure_sqlite_folder("postgresql+psycopg://u@127.0.0.1/test")


def test_gateway_store_opens_in_a_missing_folder(tmp_path):
    from abliterate_services.gateway.jobs import JobStore

    JobStore(f"sqlite:///{tmp_path / 'new' / 'gateway.db'}")
    assert (tmp_path / "new" / "gateway.db").exists()

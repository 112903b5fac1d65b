"""JSON-lines logging."""

from __future__ import annotations

import io
import json
import logging

import pytest

from abliterate.rpc import configure_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_with_service_extras_and_exception(restore_root):
    stream = io.StringIO()
    configure_logging("evaluator", "DEBUG", stream=stream)
    log = logging.getLogger("abliterate.test")
    log.debug("loaded %s", "model", extra={"trial": 7, "timings_s": {"total": 1.5}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("trial failed")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["service"] == "evaluator" and first["level"] == "DEBUG" and first["logger"] == "abliterate.test"
    assert first["msg"] == "loaded model" and first["trial"] == 7 and first["timings_s"] == {"total": 1.5}
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"] and "Traceback" in second["exc"]


def test_idempotent_and_level(restore_root):
    stream = io.StringIO()
    configure_logging("a", "INFO", stream=io.StringIO())
    configure_logging("b", logging.WARNING, stream=stream)
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_JsonHandler"]
    assert len(ours) == 1
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["service"], e["msg"]) for e in lines] == [("b", "shown")]
    with pytest.raises(ValueError):
        configure_logging("c", "LOUD")

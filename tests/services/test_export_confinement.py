"""Exports confined to the evaluator's export root, overwrite only of previous exports, and prompt files
only from the prompt root: a real EvaluatorService on a tiny model over loopback gRPC."""

from __future__ import annotations

import os

import grpc
import pytest

from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc, extractor_pb2
from abliterate_services.evaluator.paths import EXPORT_MARKER
from abliterate_services.evaluator.servicer import EvaluatorServicer
from abliterate_services.extractor.extraction import Extractor
from tests.services.helpers import BAD, GOOD, details_of, kernel_params, prompts, serve
from tests.tiny import make_lm

ADD = evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server
E = evaluator_pb2


@pytest.fixture(scope="module")
def lm():
    return make_lm("llama", layers=3, hidden=32)


@pytest.fixture(scope="module")
def blob(lm) -> common_pb2.TensorBlob:
    req = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(BAD), harmless=prompts(GOOD), options=common_pb2.ExtractionOptions(batch_size=4)
    )
    return list(Extractor(lm).extract(req))[-1].result.directions


@pytest.fixture
def roots(tmp_path):
    export_root, prompt_root = tmp_path / "exports", tmp_path / "prompts"
    prompt_root.mkdir()
    (prompt_root / "kl.txt").write_text("Say hi.\nCount to 3.\n")
    return export_root, prompt_root


@pytest.fixture
def stub(lm, blob, roots):
    export_root, prompt_root = roots
    servicer = EvaluatorServicer(lm, batch_size=4, export_root=str(export_root), prompt_root=str(prompt_root))
    with serve([(ADD, servicer)]) as served:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(served.channel)
        stub.LoadDirections(E.LoadDirectionsRequest(directions=blob))
        yield stub


def export(stub, blob, path: str, overwrite: bool = False):
    return E.EvaluatorServiceExportModelRequest(
        direction_set_id=blob.sha256, params=kernel_params(), path=path, overwrite=overwrite
    )


def test_a_relative_path_lands_under_the_export_root(stub, blob, roots):
    export_root, _ = roots
    reply = stub.ExportModel(export(stub, blob, "jobs/first"))
    assert reply.path == str((export_root / "jobs" / "first").resolve())
    assert (export_root / "jobs" / "first" / EXPORT_MARKER).is_file()
    absolute_inside = stub.ExportModel(export(stub, blob, str(export_root / "second")))
    assert absolute_inside.path == str((export_root / "second").resolve())


def test_paths_that_leave_the_root_or_reach_no_file_are_invalid_argument(stub, blob, roots, tmp_path):
    export_root, _ = roots
    export_root.mkdir(exist_ok=True)
    os.symlink(tmp_path, export_root / "link")
    cases = {
        "absolute outside": str(tmp_path / "elsewhere"),
        "dotdot escape": "../../outside",
        "symlink escape": "link/escaped",
        "NUL": "a\x00b",
        "300-character component": "x" * 300,
        "under /dev/null": "/dev/null/x",
        "under /proc": "/proc/x",
    }
    for what, path in cases.items():
        code, details = details_of(stub.ExportModel, export(stub, blob, path))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, details)
        assert len(details) < 300, (what, details)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path.parent / "outside").exists()


def test_overwrite_replaces_only_a_previous_export(stub, blob, roots):
    export_root, _ = roots
    precious = export_root / "precious"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    code, details = details_of(stub.ExportModel, export(stub, blob, "precious", overwrite=True))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and EXPORT_MARKER in details
    assert (precious / "thesis.tex").read_text() == "years of work"
    code, _ = details_of(stub.ExportModel, export(stub, blob, "precious"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    stub.ExportModel(export(stub, blob, "model"))
    (export_root / "model" / "stale.bin").write_text("old")
    reply = stub.ExportModel(export(stub, blob, "model", overwrite=True))
    assert "stale.bin" not in reply.files and EXPORT_MARKER in reply.files


def _baseline(kl_source: str) -> E.PrepareBaselineRequest:
    return E.PrepareBaselineRequest(
        baseline=common_pb2.BaselineSpec(
            kl_prompts=common_pb2.PromptSetSpec(source=kl_source), refusal_prompts=prompts(BAD), max_new_tokens=2
        )
    )


def test_prompt_files_are_read_only_under_the_prompt_root(stub):
    for source in ("text:/etc/passwd", "/etc/passwd", "../exports", "p" * 300):
        code, details = details_of(stub.PrepareBaseline, _baseline(source))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (source, code, details)
        assert "root:" not in details and len(details) < 400
    reply = stub.PrepareBaseline(_baseline("kl.txt"))
    assert reply.n_kl_prompts == 2


def test_unconfined_exports_still_refuse_device_and_kernel_trees(lm, blob, tmp_path):
    with serve([(ADD, EvaluatorServicer(lm, batch_size=4))]) as served:  # export_root None: the local run
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(served.channel)
        stub.LoadDirections(E.LoadDirectionsRequest(directions=blob))
        for path in ("/dev/null/x", "/proc/x", "/sys/x"):
            code, _ = details_of(stub.ExportModel, export(stub, blob, path))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, path
        assert stub.ExportModel(export(stub, blob, str(tmp_path / "anywhere"))).bytes_written > 0

"""``abliterate serve all --auth-token``: every port the embedded stack opens wants the token (health
exempt), its internal clients send it, a job still runs, and exports stay under the export root."""

from __future__ import annotations

import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from abliterate import cli
from abliterate.rpc import make_channel
from abliterate.specs import ModelSpec
from abliterate.v1 import (
    common_pb2,
    evaluator_pb2,
    evaluator_pb2_grpc,
    extractor_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
)
from abliterate_services.embedded import Embedded
from tests.e2e.test_embedded import _spec

TOKEN = "embedded-secret"
pytestmark = pytest.mark.timeout(300)


def _calls(embedded: Embedded):
    """One call to each service of each port the stack opened: ``(address, name, call(channel))``."""
    return [
        (embedded.gateway_address, "gateway", lambda ch: gateway_pb2_grpc.GatewayServiceStub(ch).ListJobs(
            gateway_pb2.ListJobsRequest(), timeout=10)),
        (embedded.torch_address, "extractor", lambda ch: extractor_pb2_grpc.ExtractorServiceStub(ch).GetModelInfo(
            common_pb2.GetModelInfoRequest(), timeout=10)),
        (embedded.torch_address, "evaluator", lambda ch: evaluator_pb2_grpc.EvaluatorServiceStub(ch).ExportModel(
            evaluator_pb2.EvaluatorServiceExportModelRequest(path="x"), timeout=10)),
        (embedded.optimizer_address, "optimizer", lambda ch: optimizer_pb2_grpc.OptimizerServiceStub(ch)
            .RegisterEvaluator(optimizer_pb2.RegisterEvaluatorRequest(address=embedded.torch_address), timeout=10)),
    ]  # fmt: skip


def test_every_port_wants_the_token_and_a_job_still_runs(tmp_path):
    from rich.console import Console

    from tests.tiny import make_lm

    exports = tmp_path / "exports"
    embedded = Embedded(
        ModelSpec(source="<tiny llama>"),
        tmp_path / "data",
        lm=make_lm("llama", layers=2, hidden=64),
        auth_token=TOKEN,
        export_root=exports,
        prompt_root=tmp_path,
    ).start()
    try:
        assert len({embedded.gateway_address, embedded.torch_address, embedded.optimizer_address}) == 3
        for address, name, call in _calls(embedded):
            with make_channel(address) as channel:
                with pytest.raises(grpc.RpcError) as raw:
                    call(channel)
                assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.SERVING, name
            with make_channel(address, token="wrong") as channel:
                with pytest.raises(grpc.RpcError) as raw:
                    call(channel)
                assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED, name

        console = Console(file=sys.stdout, width=140)
        with cli.gateway_client(embedded.gateway_address, TOKEN) as client:
            job = cli.submit_or_resume(client, _spec("tiny-auth", n_trials=2), console)
            job = cli.watch(client, job.id, console)
            assert job.phase == gateway_pb2.JOB_PHASE_SUCCEEDED, job.error
            reply = cli.export_trial(client, job.id, "tiny-auth-export", None)
            assert reply.path == str((exports / "tiny-auth-export").resolve())
            assert (exports / "tiny-auth-export" / "config.json").is_file()
            with pytest.raises(Exception) as refused:
                cli.export_trial(client, job.id, str(tmp_path / "outside"), None)
            assert type(refused.value).__name__ == "InvalidArgument" and "export root" in str(refused.value)
            assert "RemoteError" not in str(refused.value)
    finally:
        embedded.stop()

"""Server builder: free ports, health transitions, reflection, several servicers, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from abliterate.errors import Unavailable
from abliterate.rpc import build_server, make_channel, serve_until_signal, wait_for_serving
from abliterate.rpc.channels import health_status
from abliterate.v1 import evaluator_pb2_grpc, extractor_pb2_grpc
from tests.rpc.rpc_fakes import FakeEvaluator, start_fake

ROOT = Path(__file__).resolve().parents[2]
EVALUATOR = "abliterate.v1.EvaluatorService"
EXTRACTOR = "abliterate.v1.ExtractorService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_port_zero_binds_a_free_port():
    a, b = start_fake(), start_fake()
    try:
        assert a.port > 0 and b.port > 0 and a.port != b.port
    finally:
        a.server.stop(None)
        b.server.stop(None)


def test_binding_a_taken_port_fails():
    a = start_fake()
    try:
        with pytest.raises(OSError):
            build_server([(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, FakeEvaluator())], a.address)
    finally:
        a.server.stop(None)


def test_health_not_serving_until_set():
    running = start_fake()
    try:
        with make_channel(running.address) as channel:
            assert running.health.service_names == [EVALUATOR]
            assert health_status(channel, EVALUATOR) == NOT_SERVING
            assert health_status(channel, "") == NOT_SERVING
            with pytest.raises(Unavailable, match="NOT_SERVING"):
                wait_for_serving(channel, EVALUATOR, timeout_s=0.5)

            # a watcher sees the transition
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=EVALUATOR), timeout=10
            )
            assert next(watch).status == NOT_SERVING
            threading.Timer(0.3, running.health.set_serving).start()
            wait_for_serving(channel, EVALUATOR, timeout_s=10)
            assert next(watch).status == SERVING
            watch.cancel()
            assert health_status(channel, "") == SERVING

            running.health.set_serving(False)
            assert health_status(channel, EVALUATOR) == NOT_SERVING
            running.health.set_serving(True, services=[EVALUATOR])
            assert health_status(channel, EVALUATOR) == SERVING
            assert health_status(channel, "") == NOT_SERVING

            # an unknown service name is NOT_FOUND (and waited out, then Unavailable)
            with pytest.raises(grpc.RpcError) as raw:
                health_status(channel, "abliterate.v1.Nope")
            assert raw.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(Unavailable, match="NOT_FOUND"):
                wait_for_serving(channel, "abliterate.v1.Nope", timeout_s=0.3)
    finally:
        running.server.stop(None)


def test_wait_for_serving_waits_for_a_server_that_starts_later():
    running = start_fake()
    address = running.address
    running.server.stop(None).wait()
    with make_channel(address) as channel:
        with pytest.raises(Unavailable, match="UNAVAILABLE"):
            wait_for_serving(channel, EVALUATOR, timeout_s=0.5)


def list_services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    )
    return {s.name for s in replies[0].list_services_response.service}


def test_reflection_lists_every_service_of_a_shared_server():
    server, port, health = build_server(
        [
            (extractor_pb2_grpc.add_ExtractorServiceServicer_to_server, extractor_pb2_grpc.ExtractorServiceServicer()),
            (evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, FakeEvaluator()),
        ],
        "127.0.0.1:0",
    )
    server.start()
    try:
        assert health.service_names == [EXTRACTOR, EVALUATOR]
        with make_channel(f"127.0.0.1:{port}") as channel:
            names = list_services(channel)
            assert {EXTRACTOR, EVALUATOR, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
            # the descriptors are resolvable by symbol
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(
                iter(
                    stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=EVALUATOR)]), timeout=10
                    )
                )
            )
            assert reply.file_descriptor_response.file_descriptor_proto
    finally:
        server.stop(None)


SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    from abliterate.rpc import build_server, configure_logging, serve_until_signal
    from abliterate.v1 import evaluator_pb2_grpc

    configure_logging("test-service", "INFO")
    server, port, health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, evaluator_pb2_grpc.EvaluatorServiceServicer())],
        "127.0.0.1:0",
    )
    server.start()
    health.set_serving()
    print(port, flush=True)
    signum = serve_until_signal(server, grace_s=2.0, health=health)
    print("exited", signum, flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_until_signal_stops_gracefully(sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        port = int(proc.stdout.readline())
        with make_channel(f"127.0.0.1:{port}") as channel:
            wait_for_serving(channel, EVALUATOR, timeout_s=10)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == f"exited {int(sig)}"
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "server stopped" and entry["service"] == "test-service" for entry in lines), err


def test_serve_until_signal_returns_when_server_stops_elsewhere():
    running = start_fake()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(serve_until_signal(running.server)))
    thread.start()
    time.sleep(0.2)
    running.server.stop(None)
    thread.join(timeout=10)
    assert not thread.is_alive() and result == [None]

"""A real service pair over mutual TLS: an optimizer registers a real evaluator (tiny model) and reads its
ModelInfo through certificates generated in the test; settings reach build_server and the clients."""

from __future__ import annotations

import pytest

from abliterate.errors import Unavailable
from abliterate.rpc import build_server
from abliterate.rpc.clients import OptimizerClient
from abliterate.v1 import evaluator_pb2_grpc, optimizer_pb2, optimizer_pb2_grpc
from abliterate_services.evaluator.config import EvaluatorConfig
from abliterate_services.evaluator.servicer import EvaluatorServicer
from abliterate_services.optimizer.__main__ import make_servicer
from abliterate_services.optimizer.config import OptimizerConfig
from tests.certs import TestCA
from tests.tiny import make_lm

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def evaluator(ca):
    """A real evaluator on a tiny model, serving mutual TLS only (its settings build the credentials)."""
    pem = ca.server("evaluator")
    config = EvaluatorConfig(tls_cert_file=pem.cert_file, tls_key_file=pem.key_file, tls_client_ca_file=ca.ca_file)
    servicer = EvaluatorServicer(make_lm())
    server, port, health = build_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, servicer)],
        "127.0.0.1:0",
        tls=config.server_tls(),
    )
    server.start()
    health.set_serving()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _optimizer(ca, tmp_path, client_cert: bool):
    server_pem, client_pem = ca.server("optimizer"), ca.client("optimizer-client")
    config = OptimizerConfig(
        storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
        tls_cert_file=server_pem.cert_file,
        tls_key_file=server_pem.key_file,
        tls_client_ca_file=ca.ca_file,
        service_tls_ca_file=ca.ca_file,
        service_tls_cert_file=client_pem.cert_file if client_cert else "",
        service_tls_key_file=client_pem.key_file if client_cert else "",
    )
    servicer = make_servicer(config)
    server, port, health = build_server(
        [(optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server, servicer)],
        "127.0.0.1:0",
        tls=config.server_tls(),
    )
    server.start()
    health.set_serving()
    return servicer, server, f"127.0.0.1:{port}"


def test_optimizer_reaches_a_real_evaluator_over_mutual_tls(ca, evaluator, tmp_path):
    servicer, server, address = _optimizer(ca, tmp_path, client_cert=True)
    me = ca.client("caller")
    tls = OptimizerConfig(
        service_tls_ca_file=ca.ca_file, service_tls_cert_file=me.cert_file, service_tls_key_file=me.key_file
    ).client_tls()
    try:
        with OptimizerClient(address, tls=tls) as client:
            assert client.healthy()
            reply = client.stub.RegisterEvaluator(optimizer_pb2.RegisterEvaluatorRequest(address=evaluator), timeout=30)
        assert reply.added
        assert reply.model.n_layers == make_lm().n_layers
        assert reply.model.architecture == "LlamaForCausalLM"
        # The optimizer's own port is mutual TLS too: a plaintext caller and a caller without a certificate fail.
        with OptimizerClient(address) as plain:
            assert not plain.healthy()
        no_cert = OptimizerConfig(service_tls_ca_file=ca.ca_file).client_tls()
        with OptimizerClient(address, tls=no_cert) as anonymous:
            with pytest.raises(Unavailable):
                anonymous.stub.RegisterEvaluator(optimizer_pb2.RegisterEvaluatorRequest(address=evaluator), timeout=10)
    finally:
        servicer.shutdown(0)
        server.stop(None)


def test_optimizer_without_a_client_certificate_cannot_reach_the_evaluator(ca, evaluator, tmp_path):
    servicer, server, address = _optimizer(ca, tmp_path, client_cert=False)
    me = ca.client("caller")
    tls = OptimizerConfig(
        service_tls_ca_file=ca.ca_file, service_tls_cert_file=me.cert_file, service_tls_key_file=me.key_file
    ).client_tls()
    try:
        with OptimizerClient(address, tls=tls) as client:
            with pytest.raises(Unavailable, match="unreachable or not SERVING"):
                client.stub.RegisterEvaluator(optimizer_pb2.RegisterEvaluatorRequest(address=evaluator), timeout=30)
    finally:
        servicer.shutdown(0)
        server.stop(None)

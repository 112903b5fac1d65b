"""TLS and mutual TLS on real loopback servers, with a CA generated in the test."""

from __future__ import annotations

import logging

import grpc
import pytest

from abliterate.errors import InvalidArgument
from abliterate.rpc import build_server, make_channel
from abliterate.rpc.healthcheck import main as healthcheck_main
from abliterate.rpc.server import is_loopback_address, warn_if_open
from abliterate.rpc.tls import ClientTLS, ServerTLS
from abliterate.v1 import common_pb2, evaluator_pb2_grpc
from tests.certs import TestCA
from tests.rpc.rpc_fakes import FakeEvaluator, start_fake


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("other-ca"), name="someone else")


def _serve(tls: ServerTLS):
    running = start_fake(tls=tls)
    running.health.set_serving()
    return running


@pytest.fixture
def tls_server(ca):
    pem = ca.server()
    running = _serve(ServerTLS(pem.cert_file, pem.key_file))
    yield running
    running.server.stop(None)


@pytest.fixture
def mtls_server(ca):
    pem = ca.server()
    running = _serve(ServerTLS(pem.cert_file, pem.key_file, client_ca_file=ca.ca_file))
    yield running
    running.server.stop(None)


def info(channel) -> common_pb2.GetModelInfoResponse:
    return evaluator_pb2_grpc.EvaluatorServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10)


def refused(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raw:
        info(channel)
    return raw.value.code()


def test_tls_server_answers_a_tls_client(tls_server, ca):
    with make_channel(tls_server.address, tls=ClientTLS(ca_file=ca.ca_file)) as channel:
        assert info(channel).model.n_layers == 2


def test_tls_server_refuses_a_plaintext_client(tls_server):
    with make_channel(tls_server.address) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_trusts_another_ca_refuses_the_server(tls_server, other_ca):
    with make_channel(tls_server.address, tls=ClientTLS(ca_file=other_ca.ca_file)) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_server_name_override_checks_the_name_in_the_certificate(ca):
    pem = ca.server("evaluator-cert", "evaluator")
    running = _serve(ServerTLS(pem.cert_file, pem.key_file))
    try:
        with make_channel(running.address, tls=ClientTLS(ca_file=ca.ca_file, server_name="evaluator")) as channel:
            assert info(channel).model.n_layers == 2
        with make_channel(running.address, tls=ClientTLS(ca_file=ca.ca_file, server_name="not-it")) as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.server.stop(None)


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, ca):
    with make_channel(mtls_server.address, tls=ClientTLS(ca_file=ca.ca_file)) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_of_another_ca(mtls_server, ca, other_ca):
    stranger = other_ca.client("stranger")
    tls = ClientTLS(ca_file=ca.ca_file, cert_file=stranger.cert_file, key_file=stranger.key_file)
    with make_channel(mtls_server.address, tls=tls) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_answers_a_client_with_a_certificate(mtls_server, ca):
    me = ca.client()
    tls = ClientTLS(ca_file=ca.ca_file, cert_file=me.cert_file, key_file=me.key_file)
    with make_channel(mtls_server.address, tls=tls, token=None) as channel:
        assert info(channel).model.n_layers == 2


def test_healthcheck_command_speaks_tls(mtls_server, ca, monkeypatch):
    me = ca.client()
    assert healthcheck_main([mtls_server.address, "--quiet"]) == 1  # plaintext: refused
    monkeypatch.setenv("ABLITERATE_HEALTH_TLS_CA", ca.ca_file)
    monkeypatch.setenv("ABLITERATE_HEALTH_TLS_CERT", me.cert_file)
    monkeypatch.setenv("ABLITERATE_HEALTH_TLS_KEY", me.key_file)
    assert healthcheck_main([mtls_server.address, "--quiet"]) == 0


def test_bad_tls_settings_are_clear_errors(tmp_path, ca):
    with pytest.raises(InvalidArgument, match="both a certificate file and a key file"):
        ServerTLS.from_files(cert_file=ca.ca_file)
    with pytest.raises(InvalidArgument, match="client CA"):
        ServerTLS.from_files(client_ca_file=ca.ca_file)
    assert ServerTLS.from_files() is None
    with pytest.raises(InvalidArgument, match="its key file"):
        ClientTLS.from_files(True, cert_file=ca.ca_file)
    assert ClientTLS.from_files(False) is None
    assert ClientTLS.from_files(False, ca_file=ca.ca_file) == ClientTLS(ca_file=ca.ca_file)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(InvalidArgument, match="cannot read the TLS key .*No such file"):
        build_server([], "127.0.0.1:0", tls=ServerTLS(missing, missing))
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello")
    with pytest.raises(InvalidArgument, match="not a PEM file"):
        ClientTLS(ca_file=str(not_pem)).credentials()


def test_an_open_port_without_token_is_a_loud_warning(caplog):
    assert is_loopback_address("127.0.0.1:50051") and is_loopback_address("[::1]:1")
    assert is_loopback_address("localhost:1")
    assert not is_loopback_address("0.0.0.0:50051") and not is_loopback_address("[::]:1")
    with caplog.at_level(logging.WARNING, logger="abliterate.rpc.server"):
        assert warn_if_open("0.0.0.0:50052", None, ["abliterate.v1.EvaluatorService"])
        assert not warn_if_open("0.0.0.0:50052", "token")
        assert not warn_if_open("127.0.0.1:50052", None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "NO AUTH TOKEN" in warnings[0].getMessage() and "EvaluatorService" in warnings[0].getMessage()
    assert "ANYONE" in warnings[0].getMessage()


def test_build_server_warns_when_it_binds_every_interface_without_token(caplog):
    with caplog.at_level(logging.WARNING, logger="abliterate.rpc.server"):
        server, _, _ = build_server(
            [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, FakeEvaluator())], "0.0.0.0:0"
        )
        server.stop(None)
        quiet, _, _ = build_server(
            [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, FakeEvaluator())],
            "0.0.0.0:0",
            auth_token="t",
        )
        quiet.stop(None)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "EvaluatorService on 0.0.0.0:0" in messages[0]

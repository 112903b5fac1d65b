"""The CLI's client commands over TLS: --tls-ca (and --tls-cert/--tls-key for mutual TLS) reach a real gateway
serving TLS; a plaintext client does not."""

from __future__ import annotations

import pytest

from abliterate import cli
from abliterate.rpc.tls import ServerTLS
from abliterate_services.gateway import Gateway
from tests.certs import TestCA


@pytest.fixture
def tls_gateway(tmp_path):
    ca = TestCA(tmp_path / "ca")
    pem = ca.server("gateway")
    gateway = Gateway(
        f"sqlite:///{tmp_path / 'gateway.db'}",
        "127.0.0.1:1",
        "127.0.0.1:1",
        ["127.0.0.1:1"],
        tls=ServerTLS(pem.cert_file, pem.key_file, client_ca_file=ca.ca_file),
    ).start()
    yield gateway, ca
    gateway.stop(0)


def test_client_commands_speak_mutual_tls(tls_gateway, capsys, monkeypatch):
    gateway, ca = tls_gateway
    me = ca.client()
    for name in ("ABLITERATE_TLS", "ABLITERATE_TLS_CA", "ABLITERATE_TLS_CERT", "ABLITERATE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--gateway", gateway.address, "--tls-ca", ca.ca_file]
    assert cli.main(["jobs", *flags, "--tls-cert", me.cert_file, "--tls-key", me.key_file]) == 0
    capsys.readouterr()
    assert cli.main(["jobs", *flags]) == 1  # no client certificate: the handshake fails
    assert cli.main(["jobs", "--gateway", gateway.address]) == 1  # plaintext
    captured = capsys.readouterr()
    assert "error: no gateway answers" in captured.out + captured.err
    assert cli.main(["jobs", *flags, "--tls-cert", me.cert_file]) == 2  # a certificate without its key

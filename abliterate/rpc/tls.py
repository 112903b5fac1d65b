"""TLS for servers and channels: PEM files in, gRPC credentials out.

A server with :class:`ServerTLS` serves TLS only (a plaintext client fails its
handshake); with ``client_ca_file`` it also requires and verifies a client
certificate signed by that CA (mutual TLS). A channel with :class:`ClientTLS`
verifies the server against ``ca_file`` (empty: the system roots) and, for
mutual TLS, presents ``cert_file``/``key_file``.

Unreadable files are :class:`InvalidArgument` naming the setting, so a service
with a bad path exits 2 at start-up instead of failing every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from abliterate.errors import InvalidArgument


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"the {what} {path!r} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key; ``client_ca_file`` turns on mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @classmethod
    def from_files(cls, cert_file: str = "", key_file: str = "", client_ca_file: str = "") -> ServerTLS | None:
        """None when no certificate is configured (plaintext); a half-configured pair is an error."""
        if not cert_file and not key_file:
            if client_ca_file:
                raise InvalidArgument("a client CA (mutual TLS) needs a server certificate and key too")
            return None
        if not (cert_file and key_file):
            raise InvalidArgument("TLS needs both a certificate file and a key file")
        return cls(cert_file, key_file, client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read_pem(self.key_file, "TLS key"), _read_pem(self.cert_file, "TLS certificate"))
        client_ca = _read_pem(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """How a channel verifies its server (``ca_file``; empty: system roots) and, for mTLS, who it is."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    #: Name checked against the server's certificate when it differs from the dialled host.
    server_name: str = ""

    @classmethod
    def from_files(
        cls, enabled: bool, ca_file: str = "", cert_file: str = "", key_file: str = "", server_name: str = ""
    ) -> ClientTLS | None:
        """None for a plaintext channel (``enabled`` false and no file given)."""
        if bool(cert_file) != bool(key_file):
            raise InvalidArgument("a TLS client certificate needs its key file too (and the other way round)")
        if not (enabled or ca_file or cert_file):
            return None
        return cls(ca_file, cert_file, key_file, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_file, "TLS CA bundle") if self.ca_file else None,
            private_key=_read_pem(self.key_file, "TLS client key") if self.key_file else None,
            certificate_chain=_read_pem(self.cert_file, "TLS client certificate") if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

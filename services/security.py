"""Settings every service shares for TLS: mixed into each service's settings class.

- :class:`ServerTlsSettings`: the certificate a server presents (``tls_cert_file``,
  ``tls_key_file``) and, for mutual TLS, the CA its clients' certificates must
  chain to (``tls_client_ca_file``). No certificate: plaintext.
- :class:`ClientTlsSettings`: how a service that calls others (gateway,
  optimizer) verifies them (``service_tls``, ``service_tls_ca_file``) and the
  client certificate it presents to mTLS servers.
"""

from __future__ import annotations

from pydantic import Field

from abliterate.rpc.tls import ClientTLS, ServerTLS
from abliterate_services.config import ServiceSettings


class ServerTlsSettings(ServiceSettings):
    tls_cert_file: str = Field("", description="PEM certificate chain this server presents (empty = plaintext)")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)"
    )

    def server_tls(self) -> ServerTLS | None:
        return ServerTLS.from_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)


class ClientTlsSettings(ServiceSettings):
    service_tls: bool = Field(False, description="call the internal services over TLS (system roots unless a CA)")
    service_tls_ca_file: str = Field("", description="PEM CA bundle that signed the internal services' certificates")
    service_tls_cert_file: str = Field("", description="PEM client certificate for mutual TLS")
    service_tls_key_file: str = Field("", description="PEM private key of service_tls_cert_file")
    service_tls_server_name: str = Field(
        "", description="name checked in the services' certificates instead of the dialled host"
    )

    def client_tls(self) -> ClientTLS | None:
        return ClientTLS.from_files(
            self.service_tls,
            self.service_tls_ca_file,
            self.service_tls_cert_file,
            self.service_tls_key_file,
            self.service_tls_server_name,
        )

"""``python -m abliterate.rpc.healthcheck [ADDRESS] [--service NAME] [--timeout S]``.

One gRPC health check (grpc.health.v1): exit 0 when the server answers
SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable, timeout).
Used by the container healthchecks; imports grpc, never torch.

ADDRESS defaults to ``$ABLITERATE_HEALTH_ADDRESS`` or ``127.0.0.1:50050``. A
bind address like ``0.0.0.0:50051`` is checked on ``127.0.0.1:50051``.
A bearer token, if the server wants one for health (it should not), comes from
``$ABLITERATE_HEALTH_TOKEN``. A TLS server is checked over TLS when
``$ABLITERATE_HEALTH_TLS_CA`` names the CA bundle (with
``$ABLITERATE_HEALTH_TLS_CERT``/``_KEY`` for mutual TLS and
``$ABLITERATE_HEALTH_TLS_SERVER_NAME`` for the name in the server's certificate,
since the check dials 127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DEFAULT_ADDRESS = "127.0.0.1:50050"


def local_address(address: str) -> str:
    """A listen address turned into one a local client can dial."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return f"127.0.0.1:{address}"
    if host in ("", "0.0.0.0", "[::]", "::", "*"):
        return f"127.0.0.1:{port}"
    return address


def check(
    address: str, service: str = "", timeout_s: float = 3.0, token: str | None = None, tls=None
) -> tuple[bool, str]:
    """``(serving, what)`` of one health check (``tls``: a ``ClientTLS``, None for plaintext)."""
    import grpc
    from grpc_health.v1 import health_pb2

    from abliterate.rpc.channels import health_status, make_channel

    channel = make_channel(local_address(address), token=token or None, tls=tls)
    try:
        status = health_status(channel, service, timeout_s=timeout_s)
    except grpc.RpcError as err:
        return False, f"{err.code().name}: {err.details()}"
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abliterate.rpc.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("address", nargs="?", default=os.environ.get("ABLITERATE_HEALTH_ADDRESS", DEFAULT_ADDRESS))
    p.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--quiet", "-q", action="store_true")
    args = p.parse_args(argv)
    from abliterate.errors import AbliterateError
    from abliterate.rpc.tls import ClientTLS

    try:
        tls = ClientTLS.from_files(
            False,
            os.environ.get("ABLITERATE_HEALTH_TLS_CA", ""),
            os.environ.get("ABLITERATE_HEALTH_TLS_CERT", ""),
            os.environ.get("ABLITERATE_HEALTH_TLS_KEY", ""),
            os.environ.get("ABLITERATE_HEALTH_TLS_SERVER_NAME", ""),
        )
        ok, what = check(args.address, args.service, args.timeout, os.environ.get("ABLITERATE_HEALTH_TOKEN"), tls)
    except AbliterateError as exc:
        ok, what = False, str(exc)
    if not args.quiet:
        print(
            f"{local_address(args.address)} {args.service or '(server)'}: {what}", file=sys.stdout if ok else sys.stderr
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

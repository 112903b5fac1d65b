"""gRPC plumbing shared by the services: server builder, channels, tensor codec,
error <-> status table, health, auth, structured logging.

Imports grpc, never torch. The generated stubs live in ``abliterate.v1``.
"""

from abliterate.rpc.channels import make_channel, wait_for_serving
from abliterate.rpc.errors import (
    STATUS_BY_ERROR,
    RemoteError,
    Unauthenticated,
    from_rpc_error,
    mapped_stub,
    translate_rpc_errors,
)
from abliterate.rpc.limits import DEFAULT_MAX_MESSAGE_BYTES
from abliterate.rpc.logging import configure_logging
from abliterate.rpc.server import Health, build_server, serve_until_signal
from abliterate.rpc.tensors import (
    check_message_size,
    check_payload_size,
    decode_tensors,
    encode_tensors,
    sha256_hex,
    tensors_from_blob,
    tensors_to_blob,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "STATUS_BY_ERROR",
    "Health",
    "RemoteError",
    "Unauthenticated",
    "build_server",
    "check_message_size",
    "check_payload_size",
    "configure_logging",
    "decode_tensors",
    "encode_tensors",
    "from_rpc_error",
    "make_channel",
    "mapped_stub",
    "serve_until_signal",
    "sha256_hex",
    "tensors_from_blob",
    "tensors_to_blob",
    "translate_rpc_errors",
    "wait_for_serving",
]

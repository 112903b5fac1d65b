"""Server reflection that carries the proto comments.

grpc_reflection serves the file descriptors of the process's descriptor pool,
which the generated ``*_pb2`` modules fill without source info, so a
reflection client (``grpcurl describe``) would see no documentation. Here the
project's own files are answered with the FileDescriptorProtos of
``abliterate/v1/descriptors.binpb`` (``scripts/gen_protos.py``, protoc
``--include_source_info``), which hold every comment; lookups and dependency
walking stay grpc_reflection's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

log = logging.getLogger(__name__)

DESCRIPTOR_SET_RESOURCE = ("abliterate.v1", "descriptors.binpb")


@functools.cache
def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProto (with source info) of each project proto, by file name."""
    package, name = DESCRIPTOR_SET_RESOURCE
    try:
        data = (resources.files(package) / name).read_bytes()
    except (FileNotFoundError, OSError):  # an install without the file: reflection still works, undocumented
        log.warning("%s/%s missing: reflection serves the protos without comments", package, name)
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflectionServicer(reflection.ReflectionServicer):
    """grpc_reflection's servicer, answering the project's files with their documented descriptors."""

    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes] | None = None) -> None:
        super().__init__(list(service_names))
        self._documented = documented_files() if documented is None else documented

    def _swap(self, response: reflection_pb2.ServerReflectionResponse) -> reflection_pb2.ServerReflectionResponse:
        if not response.HasField("file_descriptor_response"):
            return response
        protos = response.file_descriptor_response.file_descriptor_proto
        for index, serialized in enumerate(protos):
            name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
            if name in self._documented:
                protos[index] = self._documented[name]
        return response

    def ServerReflectionInfo(self, request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for response in super().ServerReflectionInfo(request_iterator, context):
            yield self._swap(response)


def enable_documented_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(DocumentedReflectionServicer(service_names), server)

"""Server reflection carries the proto comments: a reflection client sees the documented constraints."""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from abliterate.rpc import make_channel
from abliterate.rpc.reflection import documented_files
from abliterate.v1 import optimizer_pb2

ROOT = Path(__file__).resolve().parents[2]
EVALUATOR = "abliterate.v1.EvaluatorService"


def _comments(file_proto: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(loc.leading_comments for loc in file_proto.source_code_info.location)


def test_reflection_returns_the_comments_of_an_rpc(fake_server):
    with make_channel(fake_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        file_proto = database.FindFileContainingSymbol(EVALUATOR)
        assert file_proto.name == "abliterate/v1/evaluator.proto"
        assert file_proto.source_code_info.location, "no source info served"
        # The comment above `rpc RegisterEvaluator` in optimizer.proto, seen through the evaluator's import-free
        # server too: every project file is documented, found by name.
        optimizer_file = database.FindFileByName("abliterate/v1/optimizer.proto")
        assert "checks its health and" in _comments(optimizer_file)
        service = next(s for s in file_proto.service if s.name == "EvaluatorService")
        method_index = [m.name for m in service.method].index("EvaluateTrial")
        service_index = list(file_proto.service).index(service)
        path = [6, service_index, 2, method_index]  # FileDescriptorProto.service[i].method[j]
        located = [loc for loc in file_proto.source_code_info.location if list(loc.path) == path]
        assert located and located[0].leading_comments.strip(), "the EvaluateTrial rpc has no comment"
        source = (ROOT / "protos" / "abliterate" / "v1" / "evaluator.proto").read_text()
        assert located[0].leading_comments.strip().splitlines()[0] in source


def test_raw_reflection_request_keeps_the_dependencies_undocumented_ones_included(fake_server):
    with make_channel(fake_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=EVALUATOR)]), timeout=10
            )
        )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in reply.file_descriptor_response.file_descriptor_proto
    ]
    names = {f.name for f in files}
    assert {"abliterate/v1/evaluator.proto", "abliterate/v1/common.proto", "google/protobuf/timestamp.proto"} <= names
    assert all(f.source_code_info.location for f in files if f.name.startswith("abliterate/"))


def _without_json_names(file_proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc fills json_name in a descriptor set, not in the stubs' embedded descriptors."""

    def strip(messages) -> None:
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)

    strip(file_proto.message_type)
    return file_proto


def test_the_documented_descriptors_match_the_generated_stubs():
    """The served descriptors are those of the stubs, plus comments (make protos writes both)."""
    documented = documented_files()
    assert set(documented) == {
        f"abliterate/v1/{n}.proto" for n in ("common", "evaluator", "extractor", "gateway", "optimizer")
    }
    served = descriptor_pb2.FileDescriptorProto.FromString(documented["abliterate/v1/optimizer.proto"])
    served.ClearField("source_code_info")
    compiled = descriptor_pb2.FileDescriptorProto()
    optimizer_pb2.DESCRIPTOR.CopyToProto(compiled)
    assert _without_json_names(served) == compiled


def test_gen_protos_check_reports_a_stale_descriptor_set(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    fake_root = tmp_path / "repo"
    pkg = fake_root / "abliterate" / "v1"
    pkg.mkdir(parents=True)
    for path in (ROOT / "abliterate" / "v1").iterdir():
        if path.is_file():
            (pkg / path.name).write_bytes(path.read_bytes())
    (pkg / "descriptors.binpb").write_bytes(b"")
    monkeypatch.setattr(gen_protos, "ROOT", fake_root)
    assert gen_protos.check() == ["differs: abliterate/v1/descriptors.binpb"]

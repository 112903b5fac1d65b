"""Rules of the contract (ARCHITECTURE.md section 4), checked on the protos themselves."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from abliterate import params
from abliterate.v1 import common_pb2, evaluator_pb2, extractor_pb2, gateway_pb2, optimizer_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
MODULES = [common_pb2, extractor_pb2, evaluator_pb2, optimizer_pb2, gateway_pb2]
SERVICES = {
    "ExtractorService": extractor_pb2,
    "EvaluatorService": evaluator_pb2,
    "OptimizerService": optimizer_pb2,
    "GatewayService": gateway_pb2,
}


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("desc") / "set.pb"
    protos = sorted(str(p) for p in (PROTO_ROOT / "abliterate" / "v1").glob("*.proto"))
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{resources.files('grpc_tools') / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ]
    )
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _constant_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _all_enums():
    for module in MODULES:
        yield from module.DESCRIPTOR.enum_types_by_name.values()
        for message in module.DESCRIPTOR.message_types_by_name.values():
            yield from message.enum_types


def test_package_is_abliterate_v1():
    for module in MODULES:
        assert module.DESCRIPTOR.package == "abliterate.v1"


def test_every_enum_starts_with_unspecified_zero():
    enums = list(_all_enums())
    assert len(enums) >= 8
    for enum in enums:
        zero = enum.values_by_number[0]
        assert zero.name == f"{_constant_case(enum.name)}_UNSPECIFIED", enum.full_name
        for value in enum.values:
            assert value.name.startswith(_constant_case(enum.name) + "_"), value.name


def test_request_and_response_names_and_timings():
    for service_name, module in SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[service_name]
        inputs = [m.input_type.name for m in service.methods]
        assert len(set(inputs)) == len(inputs), f"{service_name} reuses a request type"
        for method in service.methods:
            allowed = {method.name, service_name + method.name}
            assert method.input_type.name.removesuffix("Request") in allowed, method.full_name
            assert method.output_type.name.removesuffix("Response") in allowed, method.full_name
            assert method.input_type.name.endswith("Request") and method.output_type.name.endswith("Response")
            if not method.server_streaming:
                assert "timings_s" in method.output_type.fields_by_name, f"{method.full_name} has no timings_s"
            assert not method.client_streaming, method.full_name


def test_expected_rpcs():
    expected = {
        "ExtractorService": {"GetModelInfo", "ExtractDirections"},
        "EvaluatorService": {
            "GetModelInfo",
            "LoadDirections",
            "PrepareBaseline",
            "EvaluateTrial",
            "Generate",
            "Chat",
            "ExportModel",
            "AuditTrial",
        },
        "OptimizerService": {"CreateStudy", "RunStudy", "GetStudy", "ListTrials", "StopStudy", "RegisterEvaluator"},
        "GatewayService": {
            "SubmitJob",
            "WatchJob",
            "GetJob",
            "ListJobs",
            "CancelJob",
            "ResumeJob",
            "GetParetoFront",
            "ExportModel",
            "Chat",
            "AuditJob",
        },
    }
    streaming = {"ExtractDirections", "Generate", "Chat", "RunStudy", "WatchJob"}
    for service_name, module in SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[service_name]
        assert {m.name for m in service.methods} == expected[service_name]
        for method in service.methods:
            assert method.server_streaming == (method.name in streaming), method.full_name


def test_ablation_params_fields_match_the_dataclasses():
    # The method messages are flattened into the dataclass as <prefix>_<field> (top_heads -> head_count).
    flattened = {
        "compliance_addition": {"strength": "compliance_strength", "layer": "compliance_layer"},
        "head_ablation": {"top_heads": "head_count", "weight": "head_weight"},
    }
    proto_fields = set(common_pb2.AblationParams.DESCRIPTOR.fields_by_name) - set(flattened)
    for message, names in flattened.items():
        nested = common_pb2.AblationParams.DESCRIPTOR.fields_by_name[message].message_type
        assert set(nested.fields_by_name) == set(names), message
        proto_fields |= set(names.values())
    assert proto_fields == {f.name for f in dataclasses.fields(params.AblationParams)}
    kernel_fields = set(common_pb2.ComponentKernel.DESCRIPTOR.fields_by_name)
    assert kernel_fields == {f.name for f in dataclasses.fields(params.ComponentParams)}
    assert common_pb2.AblationParams.DESCRIPTOR.fields_by_name["direction_index"].has_presence


@pytest.mark.parametrize(
    "enum_cls,proto_enum",
    [(params.DirectionScope, common_pb2.DirectionScope), (params.RowNormalization, common_pb2.RowNormalization)],
)
def test_enums_match_the_dataclass_enums(enum_cls, proto_enum):
    prefix = _constant_case(proto_enum.DESCRIPTOR.name) + "_"
    proto_values = {v.name.removeprefix(prefix).lower() for v in proto_enum.DESCRIPTOR.values if v.number}
    assert proto_values == {member.value for member in enum_cls}


def _documented(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], bool]:
    return {
        tuple(loc.path): bool(loc.leading_comments.strip() or loc.trailing_comments.strip())
        for loc in file.source_code_info.location
    }


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    docs = _documented(file)
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if not docs.get(path, False):
            missing.append(f"{file.name}: {what}")

    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str) -> None:
        need(path, name)
        for i, field in enumerate(msg.field):
            need(path + (2, i), f"{name}.{field.name}")
        for i, oneof in enumerate(msg.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
                need(path + (8, i), f"{name}.{oneof.name} (oneof)")
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                message(nested, path + (3, i), f"{name}.{nested.name}")
        for i, enum in enumerate(msg.enum_type):
            enum_(enum, path + (4, i), f"{name}.{enum.name}")

    def enum_(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str) -> None:
        need(path, name)
        for i, value in enumerate(enum.value):
            need(path + (2, i), f"{name}.{value.name}")

    for i, msg in enumerate(file.message_type):
        message(msg, (4, i), msg.name)
    for i, enum in enumerate(file.enum_type):
        enum_(enum, (5, i), enum.name)
    for i, service in enumerate(file.service):
        need((6, i), service.name)
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"{service.name}.{method.name}")
    return missing


def test_everything_is_documented(descriptor_set):
    ours = [f for f in descriptor_set.file if f.package == "abliterate.v1"]
    assert len(ours) == 5
    missing = [m for f in ours for m in _undocumented(f)]
    assert not missing, "undocumented:\n" + "\n".join(missing)

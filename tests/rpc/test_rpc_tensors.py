"""The safetensors + sha256 codec."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from abliterate.errors import InvalidArgument, ResourceExhausted
from abliterate.rpc import (
    check_message_size,
    check_payload_size,
    decode_tensors,
    encode_tensors,
    tensors_from_blob,
    tensors_to_blob,
)
from abliterate.rpc.tensors import read_metadata
from abliterate.v1 import common_pb2


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "refusal": rng.standard_normal((5, 16)).astype(np.float32),
        "sacred": rng.standard_normal((5, 2, 16)).astype(np.float16),
        "counts": np.arange(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": rng.standard_normal((3, 6)).astype(np.float32).T,  # not C-contiguous
    }


def test_round_trip_keeps_dtype_shape_values_and_metadata():
    tensors = sample()
    meta = {"format": "abliterate.directions.v1", "n_layers": "4", "options": '{"projected": true}'}
    data, digest = encode_tensors(tensors, meta)
    assert digest == hashlib.sha256(data).hexdigest()
    decoded, decoded_meta = decode_tensors(data, digest)
    assert decoded_meta == meta
    assert set(decoded) == set(tensors)
    for name, array in tensors.items():
        assert decoded[name].dtype == array.dtype, name
        assert decoded[name].shape == array.shape, name
        np.testing.assert_array_equal(decoded[name], array)


def test_encoding_is_deterministic_and_content_addressed():
    a = encode_tensors(sample(), {"k": "v"})
    b = encode_tensors(dict(reversed(list(sample().items()))), {"k": "v"})
    assert a == b
    changed = sample()
    changed["refusal"][0, 0] += 1
    assert encode_tensors(changed, {"k": "v"})[1] != a[1]
    assert encode_tensors(sample(), {"k": "w"})[1] != a[1]


def test_no_metadata_gives_empty_dict():
    data, digest = encode_tensors({"x": np.ones(3, dtype=np.float32)})
    assert decode_tensors(data, digest)[1] == {}
    assert read_metadata(data) == {}


def test_sha_mismatch_is_invalid_argument():
    data, digest = encode_tensors(sample())
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        decode_tensors(data, "0" * 64)
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        decode_tensors(bytes(tampered), digest)
    # upper-case hex is accepted
    decode_tensors(data, digest.upper())


@pytest.mark.parametrize(
    "payload",
    [b"", b"1234", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 3) + b"{x}"],
)
def test_malformed_bytes_are_invalid_argument(payload):
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_tensors(payload)


def test_bad_inputs_are_invalid_argument():
    with pytest.raises(InvalidArgument):
        encode_tensors({})
    with pytest.raises(InvalidArgument):
        encode_tensors({"x": np.ones(2)}, {"n": 3})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument):
        encode_tensors({"x": np.array([object()])})


def test_blob_helpers():
    blob = tensors_to_blob({"refusal": np.eye(3, dtype=np.float32)}, {"format": "t"})
    assert isinstance(blob, common_pb2.TensorBlob)
    assert blob.sha256 == hashlib.sha256(blob.safetensors).hexdigest()
    # survives a protobuf round trip
    again = common_pb2.TensorBlob.FromString(blob.SerializeToString())
    arrays, meta = tensors_from_blob(again)
    np.testing.assert_array_equal(arrays["refusal"], np.eye(3, dtype=np.float32))
    assert meta == {"format": "t"}
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        tensors_from_blob(common_pb2.TensorBlob(safetensors=blob.safetensors, sha256="ab" * 32))
    with pytest.raises(InvalidArgument, match="no bytes"):
        tensors_from_blob(common_pb2.TensorBlob(sha256=blob.sha256))


def test_check_payload_size_message():
    check_payload_size(1024, 1024)
    with pytest.raises(ResourceExhausted, match=r"payload of 3\.00 MiB .* exceeds the 2\.00 MiB"):
        check_payload_size(3 * 1024 * 1024, 2 * 1024 * 1024)
    blob = common_pb2.TensorBlob(safetensors=b"x" * 2000, sha256="a" * 64)
    with pytest.raises(ResourceExhausted, match="TensorBlob message"):
        check_message_size(blob, 1000)

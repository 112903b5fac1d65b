"""Tensor codec: named numpy arrays <-> safetensors bytes + sha256.

No pickle, no torch: dtype, shape and string metadata are self-described in
the safetensors header. The sha256 of the bytes is the artifact id; the
decoder verifies it. Only numpy dtypes cross (no bfloat16: upcast first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from abliterate.artifacts import canonical_safetensors, read_metadata  # noqa: F401 (re-exported)
from abliterate.errors import InvalidArgument, ResourceExhausted
from abliterate.rpc.limits import MIB

#: Bytes a safetensors header may take at most (guards against a hostile length).


def sha256_hex(data: bytes) -> str:
    """Lower-case hex sha256 of ``data``: the artifact id."""
    return hashlib.sha256(data).hexdigest()


def encode_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> tuple[bytes, str]:
    """Serialize named arrays (and string metadata) to safetensors; return ``(bytes, sha256)``.

    Deterministic: the same arrays and metadata give the same bytes and id.
    """
    if not tensors:
        raise InvalidArgument("no tensors to encode")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype == object:
            raise InvalidArgument(f"tensor {name!r} has dtype object; only numeric arrays can be encoded")
        arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d shapes
    meta = None
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise InvalidArgument(f"metadata keys and values must be strings, got {bad!r}")
        meta = dict(metadata)
    try:
        data = canonical_safetensors(_st_save(arrays, metadata=meta))
    except Exception as exc:  # noqa: BLE001 - e.g. an unsupported dtype
        raise InvalidArgument(f"cannot encode tensors: {exc}") from exc
    return data, sha256_hex(data)


def decode_tensors(data: bytes, sha256: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``(arrays, metadata)``.

    When ``sha256`` is given (non-empty) it must equal the hash of ``data``,
    else :class:`InvalidArgument`; malformed bytes are InvalidArgument too.
    """
    data = bytes(data)
    if sha256:
        actual = sha256_hex(data)
        if actual != sha256.lower():
            raise InvalidArgument(f"sha256 mismatch: payload hashes to {actual}, expected {sha256}")
    metadata = read_metadata(data)
    try:
        arrays = _st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InvalidArgument(f"cannot decode safetensors payload (malformed, or a dtype numpy lacks): {exc}") from exc
    return arrays, metadata


def tensors_to_blob(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Encode into an ``abliterate.v1.TensorBlob``."""
    from abliterate.v1 import common_pb2

    data, digest = encode_tensors(tensors, metadata)
    return common_pb2.TensorBlob(safetensors=data, sha256=digest)


def tensors_from_blob(blob) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode an ``abliterate.v1.TensorBlob``, verifying its sha256 when set."""
    if not blob.safetensors:
        raise InvalidArgument("the TensorBlob carries no bytes (only an id)")
    return decode_tensors(blob.safetensors, blob.sha256 or None)


def check_payload_size(n_bytes: int, limit: int, what: str = "payload") -> None:
    """Raise :class:`ResourceExhausted` when ``n_bytes`` exceeds ``limit`` (check before sending)."""
    if n_bytes > limit:
        raise ResourceExhausted(
            f"{what} of {n_bytes / MIB:.2f} MiB ({n_bytes} bytes) exceeds the "
            f"{limit / MIB:.2f} MiB ({limit} bytes) message limit"
        )


def check_message_size(message, limit: int) -> None:
    """:func:`check_payload_size` for a protobuf message (its serialized size)."""
    check_payload_size(message.ByteSize(), limit, what=f"{type(message).__name__} message")

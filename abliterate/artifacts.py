"""Canonical safetensors bytes, so an artifact's sha256 depends on its content only.

safetensors (0.8) writes the ``__metadata__`` table in hash-map order, which
varies between calls, so identical tensors could get different ids. Sorting
the header's keys fixes the bytes; data offsets are relative to the end of the
header, so the tensor bytes are untouched. No torch, no grpc.
"""

from __future__ import annotations

import json
import struct

from abliterate.errors import InvalidArgument

# A safetensors header describes tensors in JSON; anything this large is not one of ours.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(data: bytes) -> tuple[dict, int]:
    """The JSON header of a safetensors payload and its length, without loading the tensors."""
    if len(data) < 8:
        raise InvalidArgument(f"malformed safetensors payload: {len(data)} bytes, no header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, MAX_HEADER_BYTES):
        raise InvalidArgument(f"malformed safetensors payload: header length {length} is out of bounds")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"malformed safetensors payload: bad header JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise InvalidArgument("malformed safetensors payload: header is not an object")
    return header, length


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` table of a safetensors payload."""
    meta = read_header(data)[0].get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidArgument("malformed safetensors payload: __metadata__ must map strings to strings")
    return dict(meta)


def tensor_names(data: bytes) -> list[str]:
    return sorted(k for k in read_header(data)[0] if k != "__metadata__")


def canonical_safetensors(data: bytes) -> bytes:
    header, length = read_header(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + length :]

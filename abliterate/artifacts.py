"""Canonical safetensors bytes, so an artifact's sha256 depends on its content only.

safetensors (0.8) writes the ``__metadata__`` table in hash-map order, which
varies between calls, so identical tensors could get different ids. Sorting
the header's keys fixes the bytes; data offsets are relative to the end of the
header, so the tensor bytes are untouched. No torch, no grpc.
"""

from __future__ import annotations

import json
import struct


def canonical_safetensors(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + length:]

"""Generic, seeded mutations of protobuf requests, driven by their message descriptors.

Every field of a valid request (walked recursively through set sub-messages, the first element of
repeated messages and the first value of message maps) gets the mutations its type allows:

- strings: empty, a NUL byte inside, 300 characters, mixed Unicode (bidi override, emoji, combining
  marks), a ``../`` path, a huge string (``huge_bytes``, budgeted), JSON nested 100,000 deep for
  ``*_json`` fields;
- integers: 0, -1, the type's minimum and maximum, 2**63 for 64-bit unsigned;
- floats: NaN, +inf, -inf, -1, 1e308, 5e-324;
- booleans flipped; enums set to unknown numbers (999, -1);
- bytes: empty, random, huge;
- sub-messages cleared (missing) or set empty; oneofs cleared or switched;
- repeated fields emptied, flooded (2,000 copies by default), given an empty or default element;
- maps emptied or given an empty, NUL or huge key.

Some message types get whole-message variants that field-by-field mutation cannot reach
(:data:`MESSAGE_VARIANTS`): a prompt set read from a file source instead of inline prompts, and
tensor blobs of the wrong rank, dtype or content. A :class:`Mutation` names the field path and what
was done, so a finding can be reproduced from its row alone.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from abliterate.rpc.tensors import encode_tensors

F = FieldDescriptor

#: Characters of the mixed-Unicode string: right-to-left override, emoji, combining acute, CJK,
#: zero-width joiner, a non-BMP letter.
UNICODE_SAMPLE = "\u202eabc\U0001f600e\u0301\u4e2d\u200d\U00010348"

INT_LIMITS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOATS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "-1": -1.0, "1e308": 1e308, "5e-324": 5e-324}
FLOOD = 2000
DEEP_JSON_LEVELS = 100_000


def deep_json(levels: int = DEEP_JSON_LEVELS) -> str:
    """A JSON object nested ``levels`` deep: ``{"a":{"a":...{}...}}``."""
    return '{"a":' * levels + "{}" + "}" * levels


@dataclass(frozen=True)
class Mutation:
    """One change to a request: the dotted field path, a short label, and the change itself."""

    path: str
    label: str
    apply: Callable[[Message], None] = field(compare=False, repr=False)
    huge: bool = False

    def describe(self) -> str:
        return f"{self.path or '<request>'}: {self.label}"


def _resolve(root: Message, steps: tuple) -> Message:
    """The sub-message of ``root`` at ``steps`` (field names, ``(name, index)`` or ``(name, key)``)."""
    msg = root
    for step in steps:
        if isinstance(step, tuple):
            name, key = step
            msg = getattr(msg, name)[key]
        else:
            msg = getattr(msg, step)
    return msg


def _path_text(steps: tuple, leaf: str | None = None) -> str:
    parts = []
    for step in steps:
        parts.append(f"{step[0]}[{step[1]!r}]" if isinstance(step, tuple) else step)
    if leaf:
        parts.append(leaf)
    return ".".join(parts)


def _setter(steps: tuple, name: str, value) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        setattr(_resolve(root, steps), name, value)

    return apply


def _string_values(fd: FieldDescriptor, huge_bytes: int) -> Iterator[tuple[str, object, bool]]:
    yield "empty", "", False
    yield "NUL byte", "abc\x00def", False
    yield "300 chars", "x" * 300, False
    yield "unicode", UNICODE_SAMPLE, False
    yield "../ escape", "../../fuzz-outside", False
    if fd.name.endswith("_json"):
        yield f"JSON nested {DEEP_JSON_LEVELS} deep", deep_json(), False
    if huge_bytes:
        yield f"{huge_bytes / 2**20:g} MiB string", "A" * huge_bytes, True


def _scalar_values(fd: FieldDescriptor, huge_bytes: int, rng: random.Random) -> Iterator[tuple[str, object, bool]]:
    """(label, value, huge) for a singular scalar field of ``fd``'s type."""
    if fd.type == F.TYPE_STRING:
        yield from _string_values(fd, huge_bytes)
    elif fd.type == F.TYPE_BYTES:
        yield "empty", b"", False
        yield "random 64 bytes", rng.randbytes(64), False
        if huge_bytes:
            yield f"{huge_bytes / 2**20:g} MiB bytes", rng.randbytes(huge_bytes), True
    elif fd.type in INT_LIMITS:
        low, high = INT_LIMITS[fd.type]
        values = {"0": 0, "max": high}
        if low < 0:
            values.update({"-1": -1, "min": low})
        if high == 2**64 - 1:
            values["2**63"] = 2**63
        for label, value in values.items():
            yield label, value, False
    elif fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        for label, value in FLOATS.items():
            yield label, value, False
    elif fd.type == F.TYPE_BOOL:
        yield "true", True, False
        yield "false", False, False
    elif fd.type == F.TYPE_ENUM:
        yield "unknown enum 999", 999, False
        yield "unknown enum -1", -1, False


def _default_element(fd: FieldDescriptor):
    if fd.type == F.TYPE_STRING:
        return ""
    if fd.type == F.TYPE_BYTES:
        return b""
    if fd.type == F.TYPE_BOOL:
        return False
    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return 0.0
    return 0


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def field_mutations(
    root: Message, rng: random.Random, huge_bytes: int, flood: int = FLOOD, max_depth: int = 5
) -> list[Mutation]:
    """Every mutation of every field reachable in ``root`` (a valid request), in a stable order.

    ``flood``: how many elements a flooded repeated field gets."""
    found: list[Mutation] = []
    _walk(root, (), rng, huge_bytes, max_depth, found, flood)
    return found


def _walk(
    root: Message, steps: tuple, rng: random.Random, huge_bytes: int, depth: int, out: list[Mutation], flood: int
) -> None:
    msg = _resolve(root, steps)
    desc = msg.DESCRIPTOR
    variants = MESSAGE_VARIANTS.get(desc.full_name)
    if variants and steps:
        for label, build in variants:
            out.append(Mutation(_path_text(steps), label, _replace_with(steps, build)))

    for oneof in desc.oneofs:
        synthetic = len(oneof.fields) == 1 and oneof.name.startswith("_")  # a proto3 `optional` field
        if not synthetic:
            out.append(Mutation(_path_text(steps, oneof.name), "oneof cleared", _clear_oneof(steps, oneof.name)))

    for fd in desc.fields:
        path = _path_text(steps, fd.name)
        if _is_map(fd):
            out.extend(_map_mutations(steps, fd, path, huge_bytes))
            value_fd = fd.message_type.fields_by_name["value"]
            container = getattr(msg, fd.name)
            if value_fd.type == F.TYPE_MESSAGE and len(container) and depth > 0:
                key = sorted(container)[0]
                _walk(root, (*steps, (fd.name, key)), rng, huge_bytes, depth - 1, out, flood)
        elif fd.is_repeated:
            out.extend(_repeated_mutations(steps, fd, path, flood))
            if fd.type == F.TYPE_MESSAGE and len(getattr(msg, fd.name)) and depth > 0:
                _walk(root, (*steps, (fd.name, 0)), rng, huge_bytes, depth - 1, out, flood)
        elif fd.type == F.TYPE_MESSAGE:
            out.append(Mutation(path, "missing (cleared)", _clear(steps, fd.name)))
            if msg.HasField(fd.name):
                out.append(Mutation(path, "empty message", _set_empty(steps, fd.name)))
                if depth > 0:
                    _walk(root, (*steps, fd.name), rng, huge_bytes, depth - 1, out, flood)
            else:
                out.append(Mutation(path, "empty message (was unset)", _set_empty(steps, fd.name)))
        else:
            if fd.has_presence and msg.HasField(fd.name):
                out.append(Mutation(path, "unset (optional)", _clear(steps, fd.name)))
            for label, value, huge in _scalar_values(fd, huge_bytes, rng):
                out.append(Mutation(path, label, _setter(steps, fd.name, value), huge=huge))


def _clear(steps: tuple, name: str) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        _resolve(root, steps).ClearField(name)

    return apply


def _set_empty(steps: tuple, name: str) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        parent = _resolve(root, steps)
        parent.ClearField(name)
        getattr(parent, name).SetInParent()

    return apply


def _clear_oneof(steps: tuple, oneof: str) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        parent = _resolve(root, steps)
        which = parent.WhichOneof(oneof)
        if which:
            parent.ClearField(which)

    return apply


def _replace_with(steps: tuple, build: Callable[[Message], Message]) -> Callable[[Message], None]:
    def apply(root: Message) -> None:
        target = _resolve(root, steps)
        target.CopyFrom(build(target))

    return apply


def _repeated_mutations(steps: tuple, fd: FieldDescriptor, path: str, flood_size: int) -> Iterator[Mutation]:
    name = fd.name

    def clear(root: Message) -> None:
        del getattr(_resolve(root, steps), name)[:]

    def flood(root: Message) -> None:
        container = getattr(_resolve(root, steps), name)
        if fd.type == F.TYPE_MESSAGE:
            template = container[0] if len(container) else None
            for _ in range(flood_size):
                item = container.add()
                if template is not None:
                    item.CopyFrom(template)
        else:
            value = container[0] if len(container) else ("x" if fd.type == F.TYPE_STRING else _default_element(fd))
            container.extend([value] * flood_size)

    def add_default(root: Message) -> None:
        container = getattr(_resolve(root, steps), name)
        if fd.type == F.TYPE_MESSAGE:
            container.add()
        elif fd.type == F.TYPE_ENUM:
            container.append(999)
        else:
            container.append(_default_element(fd))

    yield Mutation(path, "emptied", clear)
    yield Mutation(path, f"{flood_size} elements", flood)
    label = "unknown enum 999 appended" if fd.type == F.TYPE_ENUM else "empty element appended"
    yield Mutation(path, label, add_default)
    if fd.type == F.TYPE_STRING:

        def add_nul(root: Message) -> None:
            getattr(_resolve(root, steps), name).append("a\x00b")

        yield Mutation(path, "NUL element appended", add_nul)


def _map_mutations(steps: tuple, fd: FieldDescriptor, path: str, huge_bytes: int) -> Iterator[Mutation]:
    name = fd.name
    key_fd = fd.message_type.fields_by_name["key"]
    value_fd = fd.message_type.fields_by_name["value"]

    def clear(root: Message) -> None:
        getattr(_resolve(root, steps), name).clear()

    def add_key(key) -> Callable[[Message], None]:
        def apply(root: Message) -> None:
            container = getattr(_resolve(root, steps), name)
            if value_fd.type == F.TYPE_MESSAGE:
                existing = next(iter(container.values()), None)
                item = container[key]
                if existing is not None:
                    item.CopyFrom(existing)
                else:
                    item.SetInParent()
            else:
                container[key] = _default_element(value_fd)

        return apply

    yield Mutation(path, "emptied", clear)
    if key_fd.type == F.TYPE_STRING:
        yield Mutation(path, "empty key added", add_key(""))
        yield Mutation(path, "NUL key added", add_key("k\x00"))
        yield Mutation(path, "unicode key added", add_key(UNICODE_SAMPLE))
        if huge_bytes:
            yield Mutation(path, f"{huge_bytes / 2**20:g} MiB key added", add_key("K" * huge_bytes), huge=True)


# ---------------------------------------------------------------- whole-message variants


def _prompt_source(source: str) -> Callable[[Message], Message]:
    def build(old: Message) -> Message:
        new = type(old)()
        new.source = source
        return new

    return build


def _blob(tensors: dict[str, np.ndarray]) -> Callable[[Message], Message]:
    def build(old: Message) -> Message:
        data, sha = encode_tensors(tensors)
        new = type(old)()
        new.safetensors = data
        new.sha256 = sha
        return new

    return build


def _tensors_like(old: Message) -> dict[str, np.ndarray]:
    from abliterate.rpc.tensors import decode_tensors

    try:
        tensors, _ = decode_tensors(old.safetensors)
    except Exception:  # noqa: BLE001 - an empty or reference blob: use a plausible shape
        tensors = {"refusal": np.ones((3, 32), dtype=np.float32)}
    return tensors


def _blob_variant(change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Callable[[Message], Message]:
    def build(old: Message) -> Message:
        return _blob(change(_tensors_like(old)))(old)

    return build


def _refusal(t: dict) -> np.ndarray:
    return t.get("refusal", next(iter(t.values())))


def _sha_mismatch(old: Message) -> Message:
    new = type(old)()
    new.CopyFrom(old)
    new.sha256 = hashlib.sha256(b"not these bytes").hexdigest()
    return new


def _truncated(old: Message) -> Message:
    new = type(old)()
    data = old.safetensors[: max(len(old.safetensors) // 2, 9)]
    new.safetensors = data
    new.sha256 = hashlib.sha256(data).hexdigest()
    return new


#: message full name -> (label, build(old) -> replacement) variants no single-field change reaches.
MESSAGE_VARIANTS: dict[str, list[tuple[str, Callable[[Message], Message]]]] = {
    "abliterate.v1.PromptSetSpec": [
        ("source of 300 characters", _prompt_source("p" * 300)),
        ("source with a NUL byte", _prompt_source("prompts\x00.txt")),
        ("source text:/etc/passwd", _prompt_source("text:/etc/passwd")),
        ("source /etc/passwd", _prompt_source("/etc/passwd")),
        ("source ../../../etc/hostname", _prompt_source("../../../etc/hostname")),
        ("source unknown hub id", _prompt_source("no-such-user/no-such-dataset")),
    ],
    "abliterate.v1.TensorBlob": [
        ("refusal of rank 1", _blob_variant(lambda t: {**t, "refusal": _refusal(t)[0]})),
        ("refusal of rank 3", _blob_variant(lambda t: {**t, "refusal": _refusal(t)[None]})),
        ("refusal of width + 1", _blob_variant(lambda t: {**t, "refusal": np.pad(_refusal(t), ((0, 0), (0, 1)))})),
        ("refusal all NaN", _blob_variant(lambda t: {**t, "refusal": np.full_like(_refusal(t), np.nan)})),
        ("refusal of int32", _blob_variant(lambda t: {**t, "refusal": _refusal(t).astype(np.int32)})),
        ("refusal zero rows", _blob_variant(lambda t: {**t, "refusal": _refusal(t)[:0]})),
        ("no refusal tensor", _blob_variant(lambda t: {"other": _refusal(t)})),
        ("diagnostics of rank 3", _blob_variant(lambda t: {**t, "diagnostics": np.zeros((2, 2, 2), np.float32)})),
        ("sacred of rank 1", _blob_variant(lambda t: {**t, "sacred": np.zeros((5,), np.float32)})),
        ("sha256 mismatch", _sha_mismatch),
        ("truncated bytes", _truncated),
    ],
}


def _random_text(rng: random.Random) -> str:
    """Up to 1,000 code points from the whole Unicode range (no surrogates: they are not UTF-8)."""
    chars = []
    for _ in range(rng.choice((1, 8, 64, 1000))):
        plane = rng.choice((0x7F, 0x7FF, 0xFFFF, 0x10FFFF))
        cp = rng.randint(0, plane)
        chars.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD))
    return "".join(chars)


def _random_value(fd: FieldDescriptor, rng: random.Random):
    if fd.type == F.TYPE_STRING:
        return _random_text(rng)
    if fd.type == F.TYPE_BYTES:
        return rng.randbytes(rng.choice((1, 16, 1024)))
    if fd.type in INT_LIMITS:
        low, high = INT_LIMITS[fd.type]
        return rng.choice((rng.randint(low, high), rng.randint(max(low, -1000), 1000)))
    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        bits = rng.getrandbits(64)
        value = struct.unpack("<d", bits.to_bytes(8, "little"))[0]  # any double: subnormal, NaN payloads, inf
        return rng.choice((value, rng.uniform(-1e6, 1e6), rng.uniform(-2.0, 2.0)))
    if fd.type == F.TYPE_BOOL:
        return rng.random() < 0.5
    if fd.type == F.TYPE_ENUM:
        return rng.randint(-(2**31), 2**31 - 1)
    raise TypeError(fd.type)


def random_mutation(root: Message, rng: random.Random) -> Mutation:
    """A random value in a random singular scalar field reachable in ``root`` (set sub-messages only)."""
    fields: list[tuple[tuple, FieldDescriptor]] = []

    def collect(msg: Message, steps: tuple, depth: int) -> None:
        for fd in msg.DESCRIPTOR.fields:
            if fd.is_repeated:
                if fd.type == F.TYPE_MESSAGE and not _is_map(fd) and len(getattr(msg, fd.name)) and depth:
                    collect(getattr(msg, fd.name)[0], (*steps, (fd.name, 0)), depth - 1)
            elif fd.type == F.TYPE_MESSAGE:
                if msg.HasField(fd.name) and depth:
                    collect(getattr(msg, fd.name), (*steps, fd.name), depth - 1)
            else:
                fields.append((steps, fd))

    collect(root, (), 5)
    steps, fd = rng.choice(fields)
    value = _random_value(fd, rng)
    shown = repr(value)
    shown = shown if len(shown) <= 40 else f"{shown[:37]}...({len(value)} long)"
    return Mutation(_path_text(steps, fd.name), f"random {shown}", _setter(steps, fd.name, value))


def sample_mutations(candidates: list[Mutation], n: int, rng: random.Random, huge_left: list[int]) -> list[Mutation]:
    """``n`` mutations spread over the fields: fields in a seeded order, one mutation each per round.

    ``huge_left`` is a one-element budget of huge-value mutations shared by every request.
    """
    by_path: dict[str, list[Mutation]] = {}
    for m in candidates:
        by_path.setdefault(m.path, []).append(m)
    paths = sorted(by_path)
    rng.shuffle(paths)
    for items in by_path.values():
        rng.shuffle(items)
    chosen: list[Mutation] = []
    while len(chosen) < n and any(by_path.values()):
        for path in paths:
            items = by_path[path]
            while items:
                m = items.pop()
                if m.huge and huge_left[0] <= 0:
                    continue
                if m.huge:
                    huge_left[0] -= 1
                chosen.append(m)
                break
            if len(chosen) >= n:
                break
    return chosen

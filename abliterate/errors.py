"""Domain errors shared by every layer.

The math core raises these; ``abliterate.rpc.errors`` maps each class to one
gRPC status code (ARCHITECTURE.md section 5) and clients map the code back, so
callers never see a raw ``RpcError``. This module imports neither torch nor grpc.
"""


class AbliterateError(Exception):
    """Base class: anything else that escapes a server is INTERNAL."""


class InvalidArgument(AbliterateError):
    """A field of the request is wrong (bad value, NaN, out of range, empty set)."""


class NotFound(AbliterateError):
    """An id (job, trial, direction set, model path) does not exist."""


class AlreadyExists(AbliterateError):
    """A name that must be unique is taken."""


class FailedPrecondition(AbliterateError):
    """The operation needs state that is not there yet (model or directions not loaded)."""


class Unavailable(AbliterateError):
    """Busy or still loading: the caller may retry later."""


class ResourceExhausted(AbliterateError):
    """Out of (GPU) memory or a size limit was exceeded."""


class UnsupportedArchitecture(InvalidArgument):
    """Module discovery found no editable matrices it knows how to edit."""


#: Longest prefix of an offending value quoted in an error message: a 10 MB id must not make the
#: status details outgrow gRPC's metadata limit (8 KiB by default).
MAX_QUOTED_CHARS = 64

#: Longest identifier (job id or name, study name) accepted: Optuna's study-name column on
#: PostgreSQL is VARCHAR(512).
MAX_IDENTIFIER_CHARS = 512


def quoted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr`` of at most ``limit`` characters of ``value``, with the full length when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_identifier(value: str, field: str, max_chars: int = MAX_IDENTIFIER_CHARS) -> str:
    """``value`` when it can be an id or name in storage, else InvalidArgument with a short message.

    Refuses NUL and other control characters (PostgreSQL rejects NUL in text; none belong in an
    id) and anything longer than ``max_chars``, so a lookup never reaches the database with a
    value it would answer with an error instead of "not found".
    """
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is too long ({len(value)} characters, at most {max_chars})")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidArgument(f"{field} contains a control character: {quoted(value)}")
    return value

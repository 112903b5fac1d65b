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

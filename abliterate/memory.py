"""Fewer glibc malloc arenas for processes that run torch on the CPU.

glibc gives threads that allocate at the same time arenas of their own, up to
8 per core. A torch service allocates its activations and KV caches from
gRPC worker threads and from torch's own threads. Memory freed in one arena
is kept for that arena, so the resident size climbs trial after trial. On
SmolLM2 in float32 (`abliterate run`, 2 trials, 2 cores) the peak was
1,752 MB with glibc's default, 1,469 MB with 2 arenas and 1,300 MB with 1,
at the same trial times (docs/benchmarks.md).

Plain Python (ctypes): no torch, no grpc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: mallopt's parameter number for the arena limit (glibc's malloc.h).
_M_ARENA_MAX = -8
#: The default for torch processes; 0 leaves glibc's own default.
DEFAULT_MALLOC_ARENAS = 1


def limit_malloc_arenas(count: int = DEFAULT_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count`` for the rest of this process; True when it was applied.

    Call it before the threads that allocate start: arenas that already exist
    stay. A ``MALLOC_ARENA_MAX`` in the environment wins (glibc read it at
    start-up), ``count`` 0 changes nothing, and on a C library without
    ``mallopt`` (musl, macOS) this is a no-op.
    """
    if count <= 0 or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    applied = mallopt(_M_ARENA_MAX, count) == 1  # mallopt returns 1 on success
    if not applied:
        log.debug("mallopt(M_ARENA_MAX, %d) was refused", count)
    return applied


def release_free_memory() -> bool:
    """Hand the memory malloc holds free back to the system (glibc ``malloc_trim``); True when it did.

    Freed tensors leave holes in glibc's heap that a later, larger tensor
    cannot use: merging two probe batches' KV caches (64-row tensors replacing
    32-row ones) otherwise keeps about 60 MB more resident at the peak. A
    no-op without glibc.
    """
    trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    return trim is not None and trim(0) == 1


def _libc_function(name: str, argtypes: list):
    """The C library's function ``name`` returning an int, or None where there is no such function."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function

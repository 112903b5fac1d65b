"""Where a remote client may have the evaluator write an export: under its export root, nowhere else.

``resolve_export_path(root, path)``:

- a relative ``path`` is taken under ``root``; an absolute one must lie under it;
- the path is resolved with symlinks followed (``os.path.realpath``), so neither
  ``../`` nor a symlink inside the root can lead out of it;
- a NUL, a component longer than the file system allows, a path longer than
  ``PATH_MAX``, a path under ``/proc``, ``/sys`` or ``/dev``, or one whose
  nearest existing ancestor is not a directory (``/dev/null/x``) is refused.

Every refusal is an :class:`InvalidArgument` quoting at most a short prefix of
the path. ``root=None`` (the local embedded run, where the caller is the user on
their own machine) skips the confinement but keeps the other checks.

An export directory holds :data:`EXPORT_MARKER`; ``overwrite`` replaces only a
directory that has it (:func:`check_replaceable`).
"""

from __future__ import annotations

import os

from abliterate.errors import AlreadyExists, FailedPrecondition, InvalidArgument, quoted

#: Written into every export (its metadata); the mark of a directory ``overwrite`` may replace.
EXPORT_MARKER = "abliterate.json"
#: Pseudo file systems no export belongs in (writes there reach devices or the kernel).
FORBIDDEN_TREES = ("/proc", "/sys", "/dev")
_NAME_MAX = 255
_PATH_MAX = 4096


#: Characters of a path an error message quotes (it never carries a whole input).
QUOTED_PATH_CHARS = 80


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_export_path(root: str | None, path: str) -> str:
    """The absolute, symlink-free path an export of ``path`` goes to (see the module docstring)."""
    if not path or not path.strip():
        raise InvalidArgument("the export path is empty")
    if "\x00" in path:
        raise InvalidArgument(f"the export path {quoted(path, QUOTED_PATH_CHARS)} contains a NUL byte")
    if len(path) > _PATH_MAX:
        raise InvalidArgument(f"the export path is {len(path)} characters long (at most {_PATH_MAX})")
    for part in path.split("/"):
        if len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            raise InvalidArgument(
                f"a component of the export path is longer than {_NAME_MAX} bytes: {quoted(part, 40)}"
            )
    expanded = os.path.expanduser(path) if root is None else path
    base = os.path.realpath(root) if root is not None else os.getcwd()
    resolved = os.path.realpath(os.path.join(base, expanded))
    if root is not None and not _within(resolved, base):
        raise InvalidArgument(
            f"the export path {quoted(path, QUOTED_PATH_CHARS)} is outside this evaluator's export root {base!r} "
            "(give a path relative to it)"
        )
    for tree in FORBIDDEN_TREES:
        if _within(resolved, tree):
            raise InvalidArgument(
                f"the export path {quoted(path, QUOTED_PATH_CHARS)} is under {tree}, which holds no files to export to"
            )
    ancestor = resolved
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor != resolved and not os.path.isdir(ancestor):
        raise InvalidArgument(
            f"the export path {quoted(path, QUOTED_PATH_CHARS)} lies under "
            f"{quoted(ancestor, QUOTED_PATH_CHARS)}, which is not a directory"
        )
    return resolved


def check_replaceable(path: str, overwrite: bool) -> None:
    """Refuse to write into an existing file or non-empty directory, unless it is a previous export and
    ``overwrite`` is set."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise AlreadyExists(f"export path {path} exists and is not a directory")
    if not (os.path.isdir(path) and os.listdir(path)):
        return
    if not overwrite:
        raise AlreadyExists(f"export path {path} exists and is not empty (set overwrite to replace it)")
    if not os.path.isfile(os.path.join(path, EXPORT_MARKER)):
        raise FailedPrecondition(
            f"export path {path} is not a previous export (it has no {EXPORT_MARKER}); overwrite replaces only exports"
        )

"""Load prompt sets: bundled offline sets, local files, saved datasets, Hub datasets.

A prompt set is a list of non-empty, whitespace-stripped strings. Where it comes
from is described by a :class:`PromptSetSpec` (or just its ``source`` string):

``bundled:NAME``
    ``abliterate/data/NAME.json`` shipped with the package (see :func:`bundled_sets`).
``/path/file.json`` / ``.jsonl`` / ``.csv`` / ``.txt``
    A local file. JSON: a list of strings, or a list of objects (``column`` picks
    the field). JSONL: one string or object per line. CSV: a header row, then rows
    (``column`` picks the field). TXT: one prompt per line, blank lines skipped.
``/path/dir``
    A dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
    (a ``DatasetDict`` uses ``split``, default ``train`` or its only split), or a
    directory of data files that ``datasets.load_dataset(dir)`` understands.
``BUILDER:/path/to/files``
    A Hugging Face packaged builder (``json``, ``csv``, ``parquet``, ``text``,
    ``arrow``) run over local data files, e.g. ``json:/data/p.jsonl`` is
    ``datasets.load_dataset("json", data_files="/data/p.jsonl")``. A glob is allowed.
    This is the way to *stream* a local file (``streaming=True``).
anything else
    A Hugging Face Hub dataset id, ``datasets.load_dataset(id, config, split=...)``
    (split name ``train`` unless given). Hub failures (unknown id, no network,
    bad config or split) raise :class:`NotFound` / :class:`InvalidArgument` naming it.

``split`` is a split string in datasets' own grammar (``train``, ``train[10:20]``,
``train[:10%]``, ``train[-5:]``, ``train[:5]+test[:5]``, see
``datasets.ReadInstruction``). Dataset sources receive it as it is; for a plain
file or a bundled set the names are ignored and the slice applies to its list of
rows. ``streaming=True`` applies to Hub, ``BUILDER:files`` and data-file
directory sources: only the rows in the slice are read (one split, non-negative
integer bounds). Plain files and ``save_to_disk`` directories (memory mapped)
are read directly and ignore it. ``limit`` then keeps at most that many prompts;
in streaming mode reading stops as soon as it is reached.

**Remote clients** (the extractor and evaluator pass ``file_root``): with
``file_root=None`` (the local CLI and ``abliterate run``) any path is read; with
a folder, only files and directories under it (a relative source is taken under
it; ``..`` and symlinks cannot lead out); with ``""`` no file at all. Bundled
sets, inline prompts and Hub ids always work. Errors about a file read for a
remote client never quote its contents (column names, row values).

``datasets`` is imported only for directory, builder and Hub sources and for a
given split, so loading bundled or plain-file prompts stays fast. All failures raise
:class:`abliterate.errors.InvalidArgument` or :class:`abliterate.errors.NotFound`.
"""

from __future__ import annotations

import contextvars
import csv
import importlib.util
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from abliterate.errors import AbliterateError, InvalidArgument, NotFound

__all__ = ["AUTO_COLUMNS", "PromptSetSpec", "bundled_sets", "load_prompts"]

#: Columns tried, in order, when ``column`` is not given.
AUTO_COLUMNS: tuple[str, ...] = ("text", "prompt", "instruction", "question", "goal")

BUNDLED_PREFIX = "bundled:"
#: Hugging Face packaged builders accepted as ``BUILDER:data_files`` sources.
FILE_BUILDERS: tuple[str, ...] = ("json", "csv", "parquet", "text", "arrow")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
_NAME_MAX = 255
_PATH_MAX = 4096
#: What a Hub dataset id looks like (``name`` or ``owner/name``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# False while a file is read for a remote client: messages then leave out what the file holds.
_REVEAL_CONTENTS: contextvars.ContextVar[bool] = contextvars.ContextVar("_REVEAL_CONTENTS", default=True)
_HIDDEN = "(not shown: the file is on the server)"


@dataclass(frozen=True)
class PromptSetSpec:
    """Where a prompt set comes from and which part of it to use."""

    source: str
    split: str | None = None
    column: str | None = None
    config: str | None = None
    streaming: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise InvalidArgument("prompt set source must be a non-empty string")
        _check_source_text(self.source.strip())  # so a gateway refuses it at SubmitJob already
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise InvalidArgument(f"prompt set limit must be a positive integer, got {self.limit!r}")
        if self.split is not None:
            _check_split(self.split)
        if self.column is not None and (not isinstance(self.column, str) or not self.column):
            raise InvalidArgument(f"prompt set column must be a non-empty string, got {self.column!r}")


# --------------------------------------------------------------------------- splits
#
# A split is datasets' own split string (``datasets.ReadInstruction.from_spec``):
# ``train``, ``train[10:20]``, ``train[:10%]``, ``train[-5:]``,
# ``train[:33%](pct1_dropremainder)``, ``train[:5]+test[:5]``. Dataset sources get
# it as it is; a plain file or a bundled set (one list of rows) is sliced with
# the same instruction resolved against its length, so there is one grammar.
# ``datasets`` is imported only when a split is given.

#: Stands in for the unknown length of a streamed split when resolving its bounds.
_UNBOUNDED = 2**62


def _read_instruction(split: str) -> Any:
    """``split`` parsed by datasets; a malformed one is an :class:`InvalidArgument`."""
    if not isinstance(split, str):
        raise InvalidArgument(f"split must be a string, got {split!r}")
    datasets = _import_datasets()
    try:
        return datasets.ReadInstruction.from_spec(split.strip())
    except (ValueError, AssertionError) as exc:
        raise InvalidArgument(
            f"invalid split {_short(split)}: {exc} (expected NAME, NAME[a:b], NAME[:b%], NAME[a:] or A+B)"
        ) from exc


def _check_split(split: str) -> None:
    """Validate ``split`` early where datasets is installed (the slim gateway defers it to the extractor)."""
    if not isinstance(split, str):
        raise InvalidArgument(f"split must be a string, got {split!r}")
    if importlib.util.find_spec("datasets") is not None:
        _read_instruction(split)


def _split_names(split: str | None) -> list[str]:
    """The split names ``split`` mentions, in order (``train`` when there is none)."""
    if split is None:
        return ["train"]
    return [part.partition("[")[0].partition("(")[0].strip() for part in split.split("+")]


def _windows(split: str, lengths: dict[str, int]) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` row ranges that ``split`` selects from splits of these lengths."""
    try:
        absolute = _read_instruction(split).to_absolute(lengths)
    except (ValueError, AssertionError) as exc:
        raise InvalidArgument(f"split {_short(split)}: {exc}") from exc
    return [(window.splitname, window.from_, window.to) for window in absolute]


def _slice_rows(rows: Sequence[Any], split: str | None) -> list[tuple[int, Any]]:
    """``(index, row)`` of one list of rows (a file or bundled set) that ``split`` selects; its names are ignored."""
    if split is None:
        return list(enumerate(rows))
    lengths = {name: len(rows) for name in _split_names(split)}
    return [(index, rows[index]) for _, start, stop in _windows(split, lengths) for index in range(start, stop)]


def _stream_window(split: str | None) -> tuple[str, int, int | None]:
    """``(name, start, stop)`` of a streamed split, whose length is unknown: non-negative integer bounds only."""
    if split is None:
        return "train", 0, None
    names = _split_names(split)
    bounds = split.partition("[")[2]
    if len(names) > 1 or "%" in bounds or "-" in bounds:
        raise InvalidArgument(
            f"split {_short(split)}: a streamed dataset takes one split with non-negative integer "
            "slice bounds (no percentages, no negative indices, no '+')"
        )
    ((name, start, stop),) = _windows(split, {names[0]: _UNBOUNDED})
    return name, start, None if stop == _UNBOUNDED else stop


# --------------------------------------------------------------------------- public API


def bundled_sets() -> list[str]:
    """Names of the prompt sets shipped in ``abliterate/data`` (use as ``bundled:NAME``)."""
    data = resources.files("abliterate") / "data"
    if not data.is_dir():
        return []
    return sorted(
        entry.name[: -len(".json")] for entry in data.iterdir() if entry.is_file() and entry.name.endswith(".json")
    )


def load_prompts(spec: PromptSetSpec | str, *, file_root: str | os.PathLike | None = None) -> list[str]:
    """Load the prompts described by ``spec`` (a spec or a bare source string).

    Returns the stripped, non-empty prompt strings, in source order, after the
    ``split`` slice and ``limit``. Raises :class:`NotFound` for a missing file,
    bundled set or dataset, :class:`InvalidArgument` for anything malformed or empty.
    ``file_root`` confines file access (module docstring): None any file, "" none,
    else only under that folder.
    """
    if isinstance(spec, str):
        spec = PromptSetSpec(source=spec)
    elif not isinstance(spec, PromptSetSpec):
        raise InvalidArgument(f"expected a PromptSetSpec or a source string, got {type(spec).__name__}")
    source = spec.source.strip()
    _check_source_text(source)
    root = None if file_root is None else str(file_root)

    if source.startswith(BUNDLED_PREFIX):
        prompts = _load_bundled(source[len(BUNDLED_PREFIX) :].strip(), spec)
    elif _builder_prefix(source) is not None:
        if root is not None:
            builder, _, files = source.partition(":")
            source = f"{builder}:{_confined(files.strip(), root)}"
        with _hidden_contents(root is not None):
            prompts = _load_builder(source, spec)
    else:
        confined = None if root is None else _confined(source, root, hub_ok=True)
        path = Path(source).expanduser() if confined is None else Path(confined)
        kind = _path_kind(path, source) if root is None or confined is not None else None
        if confined is not None and kind is None:
            raise NotFound(f"prompt file {_short(source)} does not exist in the folder this server reads prompts from")
        if kind == "file":
            with _hidden_contents(root is not None):
                prompts = _load_file(path, spec, origin=str(path) if root is None else repr(source))
        elif kind == "dir":
            with _hidden_contents(root is not None):
                prompts = _load_directory(path, spec)
        elif _looks_like_path(source):
            raise NotFound(f"prompt file {_short(source, 300)} does not exist")
        else:
            prompts = _load_hub(source, spec)

    if not prompts:
        raise InvalidArgument(f"prompt set {_describe(spec)} is empty")
    return prompts


# --------------------------------------------------------------------------- helpers


def _check_source_text(source: str) -> None:
    """A source the file system could never take (NUL, an over-long name) is a clear error, not an OSError."""
    if "\x00" in source:
        raise InvalidArgument(f"prompt source {_short(source)} contains a NUL byte")
    if len(source) > _PATH_MAX:
        raise InvalidArgument(f"prompt source is {len(source)} characters long (at most {_PATH_MAX})")
    for part in source.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            raise InvalidArgument(
                f"prompt source {_short(source)} has a name longer than {_NAME_MAX} bytes: no file or dataset is"
            )


def _path_kind(path: Path, source: str) -> str | None:
    """``file``, ``dir`` or None (nothing there), with OS refusals turned into InvalidArgument."""
    try:
        if path.is_file():
            return "file"
        if path.is_dir():
            return "dir"
    except OSError as exc:
        raise InvalidArgument(f"prompt source {_short(source)} is not a usable path: {exc.strerror or exc}") from None
    return None


class _hidden_contents:
    """Within: messages leave out what a file holds (a remote client named it)."""

    def __init__(self, hide: bool) -> None:
        self.hide = hide
        self._token: contextvars.Token | None = None

    def __enter__(self) -> None:
        if self.hide:
            self._token = _REVEAL_CONTENTS.set(False)

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None:
            _REVEAL_CONTENTS.reset(self._token)


def confined_path(source: str, root: str) -> str:
    """The absolute path ``source`` names under ``root``, for a remote client's file (InvalidArgument if outside)."""
    return _confined(source, root)


def _confined(source: str, root: str, hub_ok: bool = False) -> str | None:
    """The absolute path ``source`` names under ``root`` (a remote client's file access).

    Raises InvalidArgument when file access is off (``root`` empty) or the path leads out of the root;
    with ``hub_ok`` a source that names nothing under the root and looks like a Hub id gives None.
    """
    expanded = source
    if not root:
        if hub_ok and not _looks_like_path(source) and _HUB_ID.match(source) and not os.path.lexists(source):
            return None
        raise InvalidArgument(
            f"prompt source {_short(source)}: this server reads no prompt files for remote clients "
            "(use a bundled set, inline prompts or a Hub dataset id, or ask the operator to set prompt_root)"
        )
    base = os.path.realpath(root)
    if any(part == ".." for part in expanded.replace("\\", "/").split("/")):
        raise InvalidArgument(f"prompt source {_short(source)} may not contain '..'")
    if expanded.startswith("~"):
        raise InvalidArgument(f"prompt source {_short(source)}: '~' is not allowed for remote clients")
    glob_at = min((i for i, ch in enumerate(expanded) if ch in "*?["), default=None)
    fixed = expanded if glob_at is None else os.path.dirname(expanded[:glob_at])
    resolved = os.path.realpath(os.path.join(base, fixed))
    inside = resolved == base or resolved.startswith(base.rstrip(os.sep) + os.sep)
    if hub_ok and not os.path.isabs(source) and not os.path.lexists(resolved):
        if _HUB_ID.match(source) and not _looks_like_path(source) and not os.path.lexists(source):
            return None  # a Hub dataset id, and no local path datasets could mistake it for
    if not inside:
        raise InvalidArgument(
            f"prompt source {_short(source)} is outside the folder this server reads prompt files from"
        )
    if glob_at is None:
        return resolved
    return os.path.join(resolved, expanded[len(fixed) :].lstrip("/"))


def _columns_text(names: Iterable[Any]) -> str:
    if not _REVEAL_CONTENTS.get():
        return _HIDDEN
    return ", ".join(map(str, names)) or "(none)"


def _describe(spec: PromptSetSpec) -> str:
    text = repr(spec.source)
    if spec.split:
        text += f" (split {spec.split!r})"
    return text


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", "\\")) or source.lower().endswith(
        _FILE_SUFFIXES + (".parquet", ".arrow")
    )


def _builder_prefix(source: str) -> str | None:
    head, sep, rest = source.partition(":")
    if sep and head.lower() in FILE_BUILDERS and rest.strip():
        return head.lower()
    return None


def _resolve_column(available: Sequence[str], column: str | None, origin: str) -> str:
    """The column to read: ``column`` if present, else the first of :data:`AUTO_COLUMNS`."""
    names = list(available)
    if column is not None:
        if column not in names:
            raise InvalidArgument(f"column {column!r} not found in {origin}; available columns: {_columns_text(names)}")
        return column
    for candidate in AUTO_COLUMNS:
        if candidate in names:
            return candidate
    raise InvalidArgument(
        f"no prompt column found in {origin}: looked for {', '.join(AUTO_COLUMNS)}; "
        f"available columns: {_columns_text(names)}; set the column explicitly"
    )


def _clean(value: Any, origin: str, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{origin}: {where} is a {type(value).__name__}, not a string ({_short(value)})")
    return value.strip()


def _short(value: Any, limit: int = 60) -> str:
    if not _REVEAL_CONTENTS.get():
        return _HIDDEN
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompts_from_rows(rows: Iterable[tuple[int, Any]], column: str | None, origin: str) -> Iterator[str]:
    """Yield the stripped, non-empty prompt of each ``(index, row)`` (a row is a string or a mapping)."""
    resolved: str | None = None
    for index, row in rows:
        if isinstance(row, dict):
            if resolved is None:
                resolved = _resolve_column(list(row.keys()), column, origin)
            if resolved not in row:
                raise InvalidArgument(
                    f"{origin}: row {index} has no column {resolved!r}; its columns: {_columns_text(row.keys())}"
                )
            text = _clean(row[resolved], origin, f"column {resolved!r} of row {index}")
        else:
            text = _clean(row, origin, f"row {index}")
        if text:
            yield text


def _take(prompts: Iterable[str], limit: int | None) -> list[str]:
    return list(itertools.islice(prompts, limit)) if limit is not None else list(prompts)


def _finish_list(rows: Sequence[Any], spec: PromptSetSpec, origin: str) -> list[str]:
    """Slice a fully loaded list of rows, then extract prompts and apply ``limit``."""
    return _take(_prompts_from_rows(_slice_rows(rows, spec.split), spec.column, origin), spec.limit)


# --------------------------------------------------------------------------- bundled / files


def _load_bundled(name: str, spec: PromptSetSpec) -> list[str]:
    names = bundled_sets()
    if not name or name not in names:
        raise NotFound(f"bundled prompt set {name!r} does not exist; bundled sets: {', '.join(names) or '(none)'}")
    resource = resources.files("abliterate") / "data" / f"{name}.json"
    rows = _parse_json_text(resource.read_text(encoding="utf-8"), f"bundled set {name!r}")
    return _finish_list(rows, spec, f"bundled set {name!r}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise NotFound(f"prompt file {str(path)!r} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"prompt file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read prompt file {str(path)!r}: {exc}") from exc


def _load_file(path: Path, spec: PromptSetSpec, origin: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _parse_json_text(_read_text(path), origin)
    elif suffix == ".jsonl":
        rows = _parse_jsonl_text(_read_text(path), origin)
    elif suffix == ".csv":
        rows = _parse_csv_text(_read_text(path), origin)
    elif suffix == ".txt":
        rows = [line for line in _read_text(path).splitlines() if line.strip()]
    elif suffix in (".parquet", ".arrow"):
        return _load_builder(f"{suffix[1:]}:{path}", spec)
    else:
        raise InvalidArgument(
            f"unsupported prompt file type {suffix or '(none)'!r} for {origin}; "
            "use .json, .jsonl, .csv, .txt, .parquet or a dataset directory"
        )
    return _finish_list(rows, spec, origin)


def _parse_json_text(text: str, origin: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file holding JSON lines
            return _parse_jsonl_text(text, origin)
        raise InvalidArgument(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise InvalidArgument(f"{origin} must hold a JSON list of strings or objects, got a {type(data).__name__}")
    return data


def _parse_jsonl_text(text: str, origin: str) -> list[Any]:
    rows: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{origin}, line {number}: invalid JSON: {exc}") from exc
    return rows


def _parse_csv_text(text: str, origin: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise InvalidArgument(f"prompt set {origin} is empty (no CSV header row)")
    try:
        return [dict(row) for row in reader]
    except csv.Error as exc:
        raise InvalidArgument(f"{origin} is not valid CSV: {exc}") from exc


# --------------------------------------------------------------------------- datasets sources


def _import_datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415 - deliberately lazy
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidArgument(
            "loading dataset directories or Hub datasets needs the 'datasets' package (pip install 'abliterate[torch]')"
        ) from exc
    return datasets


def _load_directory(path: Path, spec: PromptSetSpec) -> list[str]:
    origin = f"dataset directory {str(path)!r}"
    datasets = _import_datasets()
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _run_load_dataset(datasets, origin, spec, path=str(path), kwargs={}, hub=False)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - surface as a domain error
        raise InvalidArgument(f"cannot load {origin}: {exc}") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        # One saved split: the split's names are ignored, its slice applies.
        windows = None
        if spec.split is not None:
            windows = _windows(spec.split, {name: len(loaded) for name in _split_names(spec.split)})
        return _from_dataset(loaded, spec, windows, origin)
    if spec.split is None:
        name = _default_split(list(loaded.keys()), origin)
        return _from_dataset(loaded[name], spec, None, f"{origin} split {name!r}")
    windows = _windows(spec.split, {name: len(part) for name, part in loaded.items()})
    prompts: list[str] = []
    for name, start, stop in windows:
        prompts += _from_dataset(loaded[name], spec, [(name, start, stop)], f"{origin} split {name!r}")
    return _take(prompts, spec.limit)


def _default_split(available: list[str], origin: str) -> str:
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise InvalidArgument(f"{origin} has several splits ({', '.join(available)}); choose one with split")


def _load_builder(source: str, spec: PromptSetSpec) -> list[str]:
    builder, _, files = source.partition(":")
    builder, files = builder.lower(), files.strip()
    origin = f"{builder} data files {files!r}"
    if not any(ch in files for ch in "*?[") and not Path(files).expanduser().exists():
        raise NotFound(f"data file {files!r} does not exist")
    datasets = _import_datasets()
    kwargs = {"data_files": str(Path(files).expanduser())}
    return _run_load_dataset(datasets, origin, spec, path=builder, kwargs=kwargs, hub=False)


def _load_hub(source: str, spec: PromptSetSpec) -> list[str]:
    datasets = _import_datasets()
    return _run_load_dataset(datasets, f"Hugging Face dataset {source!r}", spec, path=source, kwargs={}, hub=True)


def _run_load_dataset(
    datasets: Any,
    origin: str,
    spec: PromptSetSpec,
    *,
    path: str,
    kwargs: dict[str, Any],
    hub: bool,
) -> list[str]:
    """Call ``datasets.load_dataset`` with the split and read the prompts, mapping failures to domain errors."""
    if spec.streaming:
        # A streamed split cannot be sliced by datasets: read its rows with skip/take.
        name, start, stop = _stream_window(spec.split)
    else:
        name = spec.split.strip() if spec.split is not None else "train"
    try:
        loaded = datasets.load_dataset(path, spec.config, split=name, streaming=spec.streaming, **kwargs)
        if not spec.streaming:
            return _from_dataset(loaded, spec, None, origin)
        loaded = loaded.skip(start) if start else loaded
        loaded = loaded.take(stop - start) if stop is not None else loaded
        return _take(_prompts_from_rows(enumerate(loaded, start=start), spec.column, origin), spec.limit)
    except AbliterateError:
        raise
    except Exception as exc:  # noqa: BLE001 - never leak a raw datasets/hub traceback
        raise _dataset_error(exc, origin, name, spec, hub) from exc


def _dataset_error(exc: Exception, origin: str, split_name: str, spec: PromptSetSpec, hub: bool) -> AbliterateError:
    kind = type(exc).__name__
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else kind
    if not _REVEAL_CONTENTS.get():
        detail = kind  # a parser's message may quote the file
    if len(detail) > 300:
        detail = detail[:297] + "..."
    lowered = detail.lower()
    if kind in (
        "DatasetNotFoundError",
        "FileNotFoundError",
        "RepositoryNotFoundError",
        "EmptyDatasetError",
        "DataFilesNotFoundError",
    ):
        return NotFound(f"{origin} was not found: {detail}")
    if "unknown split" in lowered or ("split" in lowered and "not" in lowered and "found" in lowered):
        return InvalidArgument(f"split {split_name!r} not found in {origin}: {detail}")
    if "config" in lowered and kind == "ValueError":
        return InvalidArgument(f"{origin}: bad or missing config {spec.config!r}: {detail}")
    if hub and (
        isinstance(exc, (ConnectionError, TimeoutError, OSError))
        or "offline" in lowered
        or "connect" in lowered
        or "http" in lowered
    ):
        return NotFound(
            f"{origin} could not be fetched from the Hugging Face Hub "
            f"(offline, unreachable, gated or private?): {kind}: {detail}"
        )
    return InvalidArgument(f"cannot load {origin}: {kind}: {detail}")


def _from_dataset(
    dataset: Any, spec: PromptSetSpec, windows: list[tuple[str, int, int]] | None, origin: str
) -> list[str]:
    """Read prompts from an in-memory / memory-mapped ``datasets.Dataset``, from the row ``windows`` or all rows."""
    column = _resolve_column(list(dataset.column_names), spec.column, origin)
    indices = [index for _, start, stop in windows for index in range(start, stop)] if windows else None
    if windows is not None and not indices:
        return []
    subset = dataset.select_columns([column])
    if indices is not None:
        subset = subset.select(indices)
    rows = zip(indices if indices is not None else range(len(subset)), subset)
    return _take(_prompts_from_rows(rows, column, origin), spec.limit)

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

``split`` takes an optional slice, ``name[a:b]``, ``name[:b]``, ``name[a:]``
(integers, or percentages such as ``train[:10%]`` where the length is known). For
local files the name part is ignored and the slice applies to the list of rows.
``streaming=True`` applies to Hub, ``BUILDER:files`` and data-file directory
sources: only the rows in the slice are read (negative indices and percentages
are not allowed there). Plain files and ``save_to_disk`` directories (memory
mapped) are read directly and ignore it. ``limit`` then keeps at most that many
prompts; in streaming mode reading stops as soon as it is reached.

``datasets`` is imported only for directory, builder and Hub sources, so loading
bundled or plain-file prompts stays fast. All failures raise
:class:`abliterate.errors.InvalidArgument` or :class:`abliterate.errors.NotFound`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
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
_SPLIT_RE = re.compile(r"^\s*([^\[\]\s]*)\s*(?:\[\s*([^\[\]:]*?)\s*:\s*([^\[\]:]*?)\s*\])?\s*$")
_INDEX_RE = re.compile(r"^(-?\d+)(%?)$")


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
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise InvalidArgument(f"prompt set limit must be a positive integer, got {self.limit!r}")
        if self.split is not None:
            _parse_split(self.split)  # validates the syntax early
        if self.column is not None and (not isinstance(self.column, str) or not self.column):
            raise InvalidArgument(f"prompt set column must be a non-empty string, got {self.column!r}")


@dataclass(frozen=True)
class _Split:
    """A parsed ``name[start:stop]`` split; bounds are (value, is_percent) or None."""

    name: str | None
    start: tuple[int, bool] | None
    stop: tuple[int, bool] | None

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    def bounds(self, length: int) -> tuple[int | None, int | None]:
        """Integer slice bounds for a sequence of ``length`` rows."""
        return _resolve_bound(self.start, length), _resolve_bound(self.stop, length)


def _resolve_bound(bound: tuple[int, bool] | None, length: int) -> int | None:
    if bound is None:
        return None
    value, percent = bound
    return round(value * length / 100) if percent else value


def _parse_bound(text: str, split: str) -> tuple[int, bool] | None:
    if text == "":
        return None
    match = _INDEX_RE.match(text)
    if match is None:
        raise InvalidArgument(f"invalid split {split!r}: slice bounds must be integers or percentages, got {text!r}")
    value, percent = int(match.group(1)), bool(match.group(2))
    if percent and not -100 <= value <= 100:
        raise InvalidArgument(f"invalid split {split!r}: percentage {text!r} is out of range")
    return value, percent


def _parse_split(split: str) -> _Split:
    """Parse ``name``, ``name[a:b]``, ``name[:b]``, ``name[a:]`` or ``[a:b]``."""
    if not isinstance(split, str):
        raise InvalidArgument(f"split must be a string, got {split!r}")
    match = _SPLIT_RE.match(split)
    if match is None or (not match.group(1) and "[" not in split):
        raise InvalidArgument(f"invalid split {split!r}: expected NAME, NAME[a:b], NAME[:b] or NAME[a:]")
    name = match.group(1) or None
    if "[" not in split:
        return _Split(name, None, None)
    return _Split(name, _parse_bound(match.group(2), split), _parse_bound(match.group(3), split))


# --------------------------------------------------------------------------- public API


def bundled_sets() -> list[str]:
    """Names of the prompt sets shipped in ``abliterate/data`` (use as ``bundled:NAME``)."""
    data = resources.files("abliterate") / "data"
    if not data.is_dir():
        return []
    return sorted(
        entry.name[: -len(".json")] for entry in data.iterdir() if entry.is_file() and entry.name.endswith(".json")
    )


def load_prompts(spec: PromptSetSpec | str) -> list[str]:
    """Load the prompts described by ``spec`` (a spec or a bare source string).

    Returns the stripped, non-empty prompt strings, in source order, after the
    ``split`` slice and ``limit``. Raises :class:`NotFound` for a missing file,
    bundled set or dataset, :class:`InvalidArgument` for anything malformed or empty.
    """
    if isinstance(spec, str):
        spec = PromptSetSpec(source=spec)
    elif not isinstance(spec, PromptSetSpec):
        raise InvalidArgument(f"expected a PromptSetSpec or a source string, got {type(spec).__name__}")
    split = _parse_split(spec.split) if spec.split is not None else _Split(None, None, None)
    source = spec.source.strip()

    if source.startswith(BUNDLED_PREFIX):
        prompts = _load_bundled(source[len(BUNDLED_PREFIX) :].strip(), spec, split)
    elif _builder_prefix(source) is not None:
        prompts = _load_builder(source, spec, split)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            prompts = _load_file(path, spec, split, origin=str(path))
        elif path.is_dir():
            prompts = _load_directory(path, spec, split)
        elif _looks_like_path(source):
            raise NotFound(f"prompt file {source!r} does not exist")
        else:
            prompts = _load_hub(source, spec, split)

    if not prompts:
        raise InvalidArgument(f"prompt set {_describe(spec)} is empty")
    return prompts


# --------------------------------------------------------------------------- helpers


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
            raise InvalidArgument(
                f"column {column!r} not found in {origin}; available columns: {', '.join(map(str, names)) or '(none)'}"
            )
        return column
    for candidate in AUTO_COLUMNS:
        if candidate in names:
            return candidate
    raise InvalidArgument(
        f"no prompt column found in {origin}: looked for {', '.join(AUTO_COLUMNS)}; "
        f"available columns: {', '.join(map(str, names)) or '(none)'}; set the column explicitly"
    )


def _clean(value: Any, origin: str, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{origin}: {where} is a {type(value).__name__}, not a string ({_short(value)})")
    return value.strip()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prompts_from_rows(rows: Iterable[Any], column: str | None, origin: str, offset: int = 0) -> Iterator[str]:
    """Yield the stripped, non-empty prompt of each row (a string or a mapping)."""
    resolved: str | None = None
    for index, row in enumerate(rows, start=offset):
        if isinstance(row, dict):
            if resolved is None:
                resolved = _resolve_column(list(row.keys()), column, origin)
            if resolved not in row:
                raise InvalidArgument(
                    f"{origin}: row {index} has no column {resolved!r}; its columns: {', '.join(map(str, row.keys()))}"
                )
            text = _clean(row[resolved], origin, f"column {resolved!r} of row {index}")
        else:
            text = _clean(row, origin, f"row {index}")
        if text:
            yield text


def _take(prompts: Iterable[str], limit: int | None) -> list[str]:
    return list(itertools.islice(prompts, limit)) if limit is not None else list(prompts)


def _finish_list(rows: Sequence[Any], spec: PromptSetSpec, split: _Split, origin: str) -> list[str]:
    """Slice a fully loaded list of rows, then extract prompts and apply ``limit``."""
    start, stop = split.bounds(len(rows))
    offset = range(len(rows))[start:stop].start
    return _take(_prompts_from_rows(rows[start:stop], spec.column, origin, offset), spec.limit)


# --------------------------------------------------------------------------- bundled / files


def _load_bundled(name: str, spec: PromptSetSpec, split: _Split) -> list[str]:
    names = bundled_sets()
    if not name or name not in names:
        raise NotFound(f"bundled prompt set {name!r} does not exist; bundled sets: {', '.join(names) or '(none)'}")
    resource = resources.files("abliterate") / "data" / f"{name}.json"
    rows = _parse_json_text(resource.read_text(encoding="utf-8"), f"bundled set {name!r}")
    return _finish_list(rows, spec, split, f"bundled set {name!r}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise NotFound(f"prompt file {str(path)!r} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"prompt file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read prompt file {str(path)!r}: {exc}") from exc


def _load_file(path: Path, spec: PromptSetSpec, split: _Split, origin: str) -> list[str]:
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
        return _load_builder(f"{suffix[1:]}:{path}", spec, split)
    else:
        raise InvalidArgument(
            f"unsupported prompt file type {suffix or '(none)'!r} for {origin}; "
            "use .json, .jsonl, .csv, .txt, .parquet or a dataset directory"
        )
    return _finish_list(rows, spec, split, origin)


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


def _load_directory(path: Path, spec: PromptSetSpec, split: _Split) -> list[str]:
    origin = f"dataset directory {str(path)!r}"
    datasets = _import_datasets()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - surface as a domain error
            raise InvalidArgument(f"cannot load {origin}: {exc}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            name = _pick_split(list(loaded.keys()), split.name, origin)
            loaded = loaded[name]
            origin = f"{origin} split {name!r}"
        return _from_dataset(loaded, spec, split, origin)
    return _run_load_dataset(datasets, origin, spec, split, path=str(path), kwargs={}, hub=False)


def _pick_split(available: list[str], wanted: str | None, origin: str) -> str:
    if wanted is not None:
        if wanted not in available:
            raise InvalidArgument(f"split {wanted!r} not found in {origin}; available splits: {', '.join(available)}")
        return wanted
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise InvalidArgument(f"{origin} has several splits ({', '.join(available)}); choose one with split")


def _load_builder(source: str, spec: PromptSetSpec, split: _Split) -> list[str]:
    builder, _, files = source.partition(":")
    builder, files = builder.lower(), files.strip()
    origin = f"{builder} data files {files!r}"
    if not any(ch in files for ch in "*?[") and not Path(files).expanduser().exists():
        raise NotFound(f"data file {files!r} does not exist")
    datasets = _import_datasets()
    return _run_load_dataset(
        datasets,
        origin,
        spec,
        split,
        path=builder,
        kwargs={"data_files": str(Path(files).expanduser())},
        hub=False,
    )


def _load_hub(source: str, spec: PromptSetSpec, split: _Split) -> list[str]:
    datasets = _import_datasets()
    return _run_load_dataset(
        datasets, f"Hugging Face dataset {source!r}", spec, split, path=source, kwargs={}, hub=True
    )


def _run_load_dataset(
    datasets: Any,
    origin: str,
    spec: PromptSetSpec,
    split: _Split,
    *,
    path: str,
    kwargs: dict[str, Any],
    hub: bool,
) -> list[str]:
    """Call ``datasets.load_dataset`` and read the prompts, mapping failures to domain errors."""
    name = split.name or "train"
    if spec.streaming:
        for bound in (split.start, split.stop):
            if bound is not None and (bound[1] or bound[0] < 0):
                raise InvalidArgument(
                    f"split {spec.split!r}: a streamed dataset takes only non-negative integer "
                    "slice bounds (no percentages, no negative indices)"
                )
    try:
        loaded = datasets.load_dataset(path, spec.config, split=name, streaming=spec.streaming, **kwargs)
        if spec.streaming:
            start = split.start[0] if split.start is not None else 0
            stop = split.stop[0] if split.stop is not None else None
            rows = itertools.islice(iter(loaded), start, stop)
            return _take(_prompts_from_rows(rows, spec.column, origin, start), spec.limit)
        return _from_dataset(loaded, spec, split, origin)
    except AbliterateError:
        raise
    except Exception as exc:  # noqa: BLE001 - never leak a raw datasets/hub traceback
        raise _dataset_error(exc, origin, name, spec, hub) from exc


def _dataset_error(exc: Exception, origin: str, split_name: str, spec: PromptSetSpec, hub: bool) -> AbliterateError:
    kind = type(exc).__name__
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else kind
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


def _from_dataset(dataset: Any, spec: PromptSetSpec, split: _Split, origin: str) -> list[str]:
    """Read prompts from an in-memory / memory-mapped ``datasets.Dataset``."""
    column = _resolve_column(list(dataset.column_names), spec.column, origin)
    start, stop = split.bounds(len(dataset))
    indices = range(len(dataset))[start:stop]
    if not len(indices):
        return []
    subset = dataset.select_columns([column])
    if split.sliced:
        subset = subset.select(indices)
    return _take(_prompts_from_rows(subset, column, origin, indices.start), spec.limit)

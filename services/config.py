"""Service configuration: defaults < TOML file < environment < command-line flags.

Every service describes its settings as a dataclass. ``load_config`` fills it
from, in increasing precedence: the dataclass defaults, a TOML file (``--config
FILE`` or ``ABLITERATE_CONFIG``; the ``[<service>]`` table, or the top level),
environment variables ``ABLITERATE_<SERVICE>_<FIELD>`` (upper case), and flags
``--<field-with-dashes> VALUE``. Values are converted to the field's type.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
import typing
from typing import Any, Callable, TypeVar

from abliterate.errors import AbliterateError, InvalidArgument

C = TypeVar("C")


def _convert(value: Any, target: Any, name: str) -> Any:
    origin = typing.get_origin(target)
    args = [a for a in typing.get_args(target) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(target)):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _convert(value, args[0], name)
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        return [_convert(v.strip() if isinstance(v, str) else v, args[0] if args else str, name) for v in items]
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float, str):
            return target(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"setting {name}: cannot read {value!r} as {getattr(target, '__name__', target)}") from exc
    return value


def load_config(cls: type[C], service: str, argv: list[str] | None = None, description: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls)]
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}", description=description)
    parser.add_argument("--config", help="TOML file (the [%s] table or the top level)" % service)
    for f in fields:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"{f.metadata.get('help', '')} (env ABLITERATE_{service.upper()}_{f.name.upper()})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    path = args.config or os.environ.get("ABLITERATE_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise InvalidArgument(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from exc
        table = data.get(service, data)
        known = {f.name for f in fields}
        unknown = sorted(k for k in table if k not in known and not isinstance(table[k], dict))
        if unknown:
            raise InvalidArgument(f"unknown settings in {path}: {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in table.items() if k in known})
    for f in fields:
        env = os.environ.get(f"ABLITERATE_{service.upper()}_{f.name.upper()}")
        if env is not None:
            values[f.name] = env
        flag = getattr(args, f.name)
        if flag is not None:
            values[f.name] = flag
    converted = {k: _convert(v, hints[k], k) for k, v in values.items()}
    return cls(**converted)


def load_or_report(load: Callable[[list[str] | None], C], argv: list[str] | None) -> C | None:
    """A service main's settings, or None after printing why they are bad (the main exits 2)."""
    try:
        return load(argv)
    except AbliterateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


# Where a standalone service keeps its state unless told otherwise: a data folder, never loose files in
# the current directory.
DEFAULT_DATA_DIR = "abliterate-data/services"


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a ``sqlite:///path`` database file (SQLite creates the file, not its folder)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + ":memory:"):
        folder = os.path.dirname(url[len(prefix):].split("?", 1)[0])
        if folder:
            os.makedirs(folder, exist_ok=True)

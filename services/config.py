"""Service settings with pydantic-settings: defaults < TOML file < environment < command-line flags.

Every service describes its settings as a :class:`ServiceSettings` subclass in
``services/<name>/config.py`` (typed fields, each with its help text as the
field's ``description``; ``env_prefix`` ``ABLITERATE_<SERVICE>_``).
``load_config`` fills one from, in increasing precedence:

1. the field defaults;
2. a TOML file (``--config FILE`` or ``ABLITERATE_CONFIG``): its ``[<service>]``
   table, or the top level when there is none;
3. environment variables ``ABLITERATE_<SERVICE>_<FIELD>`` (upper case);
4. flags ``--<field-with-dashes> VALUE``.

Values are validated against the field's type. Lists are comma separated in the
environment and in flags (``A,B``; an empty string is an empty list); an empty
string, ``none`` or ``null`` is None for an optional field. A bad value raises
:class:`InvalidArgument` with one line naming the setting, the value and where
it came from; a service's main prints it and exits 2 (``load_or_report``).

Constructed in code (``OptimizerConfig(workers=4)``) a settings class reads
neither the environment nor a file: only its defaults and the keyword arguments,
so embedded runs and tests are not steered by the caller's environment.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import sys
import tomllib
import typing
from typing import Any, Callable, TypeVar

from pydantic import ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from abliterate.errors import AbliterateError, InvalidArgument
from abliterate.rpc.metrics import parse_address

C = TypeVar("C")
S = TypeVar("S", bound="ServiceSettings")

CONFIG_ENV = "ABLITERATE_CONFIG"
_NONE_WORDS = ("", "none", "null")

# The TOML file of the load in progress; None outside load_config (settings built in code are plain models).
_LOADING: contextvars.ContextVar[tuple[str | None] | None] = contextvars.ContextVar("_LOADING", default=None)


def _toml_table(path: str, service: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The parsed file and the table header a service reads (its ``[service]`` table, else the top level)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"config file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise InvalidArgument(f"config file {path} is a directory") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from exc
    if isinstance(data.get(service), dict):
        return data[service], (service,)
    return data, ()


class ServiceTomlSource(TomlConfigSettingsSource):
    """The ``[<service>]`` table of a TOML file (or its top level); a key naming no field is an error.

    Other tables at the top level (other services' settings) are skipped.
    """

    def __init__(self, settings_cls: type[ServiceSettings], path: str) -> None:
        service = settings_cls.service_name()
        table, header = _toml_table(path, service)
        known = set(settings_cls.model_fields)
        unknown = sorted(k for k, v in table.items() if k not in known and not isinstance(v, dict))
        if unknown:
            raise InvalidArgument(f"unknown settings in {path}: {unknown}; known: {sorted(known)}")
        self.path = path
        super().__init__(settings_cls, toml_file=path, toml_table_header=header)
        # The top level may hold other services' tables: keep only this service's fields.
        self.init_kwargs = {k: v for k, v in self.init_kwargs.items() if k in known}


class ServiceSettings(BaseSettings):
    """Base of every service's settings: see the module docstring."""

    model_config = SettingsConfigDict(
        extra="forbid",
        case_sensitive=False,
        # Lists come comma separated (the validator below splits them), never as JSON.
        enable_decoding=False,
        env_ignore_empty=False,
        # A TOML number for a string setting (a port, a token) is read as its text.
        coerce_numbers_to_str=True,
    )

    @classmethod
    def service_name(cls) -> str:
        """``optimizer`` for ``env_prefix = "ABLITERATE_OPTIMIZER_"``."""
        prefix = cls.model_config.get("env_prefix") or ""
        if not prefix.startswith("ABLITERATE_"):
            raise TypeError(f"{cls.__name__} has no env_prefix ABLITERATE_<SERVICE>_")
        return prefix[len("ABLITERATE_") :].rstrip("_").lower()

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        loading = _LOADING.get()
        if loading is None:
            return (init_settings,)  # built in code: defaults and keyword arguments only
        (toml_path,) = loading
        # First wins: flags (passed as keyword arguments) > environment > TOML > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            sources.append(ServiceTomlSource(settings_cls, toml_path))  # type: ignore[arg-type]
        return tuple(sources)

    @field_validator("*", mode="before")
    @classmethod
    def _text_forms(cls, value: Any, info: ValidationInfo) -> Any:
        """``A,B`` for a list, ``''``/``none``/``null`` for None, surrounding blanks dropped from list items."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        target = field.annotation
        args = typing.get_args(target)
        if type(None) in args:
            if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
                return None
            inner = [a for a in args if a is not type(None)]
            target = inner[0] if len(inner) == 1 else target
        if typing.get_origin(target) in (list, tuple):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)):
                return [v.strip() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("metrics_address", check_fields=False)
    @classmethod
    def _metrics_address(cls, value: str) -> str:
        """Every service's ``metrics_address``: empty (off) or ``host:port``, checked before anything binds."""
        value = value.strip()
        if value:
            parse_address(value)  # its ValueError becomes the usual one-line settings error
        return value

    @classmethod
    def load(cls: type[S], argv: list[str] | None = None, description: str = "") -> S:
        return load_config(cls, argv, description)


def _parser(cls: type[ServiceSettings], description: str) -> argparse.ArgumentParser:
    service = cls.service_name()
    parser = argparse.ArgumentParser(prog=f"python -m abliterate_services.{service}", description=description)
    parser.add_argument("--config", help=f"TOML file (the [{service}] table or the top level)")
    for name, field in cls.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{field.description or ''} (env {cls.env_name(name)})",
        )
    return parser


def _origin(cls: type[ServiceSettings], name: str, flags: dict[str, Any], toml_path: str | None) -> str:
    """Where the value of a setting came from (the layer that won)."""
    if name in flags:
        return "--" + name.replace("_", "-")
    wanted = cls.env_name(name).lower()
    if any(key.lower() == wanted for key in os.environ):
        return cls.env_name(name)
    if toml_path:
        return f"config file {toml_path}"
    return "default"


def _one_line(cls: type[ServiceSettings], exc: ValidationError, flags: dict[str, Any], toml_path: str | None) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        name = str(loc[0]) if loc else "?"
        where = _origin(cls, name, flags, toml_path) if name in cls.model_fields else "?"
        value = error.get("input")
        detail = error.get("msg", "invalid")
        if len(loc) > 1:
            detail = f"item {'.'.join(map(str, loc[1:]))}: {detail}"
        problems.append(f"setting {name}: cannot read {value!r} (from {where}): {detail}")
    return "; ".join(problems)


def load_config(cls: type[S], argv: list[str] | None = None, description: str = "") -> S:
    """The settings of a service: defaults < TOML < environment < flags (``argv``; None: ``sys.argv``)."""
    args = _parser(cls, description).parse_args(argv)
    toml_path = args.config or os.environ.get(CONFIG_ENV) or None
    flags = {name: value for name, value in vars(args).items() if name != "config" and value is not None}
    token = _LOADING.set((toml_path,))
    try:
        return cls(**flags)
    except ValidationError as exc:
        raise InvalidArgument(_one_line(cls, exc, flags, toml_path)) from None
    except SettingsError as exc:
        raise InvalidArgument(f"settings of {cls.service_name()}: {exc}") from None
    finally:
        _LOADING.reset(token)


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

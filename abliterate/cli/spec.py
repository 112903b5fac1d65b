"""Building a JobSpec from the job flags and an optional TOML job file, and checking it before anything loads."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from abliterate.cli.parser import DEFAULT_N_TRIALS, DEFAULT_SETS, DIRECTION_METHODS, PROMPT_SET_FLAGS
from abliterate.errors import AbliterateError, InvalidArgument

# Plain files that abliterate.core.prompts reads itself; other local sources (dataset directories,
# .parquet/.arrow files, BUILDER:files) go through the `datasets` package, too heavy to run up front.
PLAIN_PROMPT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")


def parse_prompt_set(text: str, limit: int | None = None) -> Any:
    """``SOURCE[@SPLIT][#COLUMN]`` -> PromptSetSpec message."""
    from abliterate.v1 import common_pb2

    source, column, split = text, "", ""
    if "#" in source:
        source, column = source.rsplit("#", 1)
    if "@" in source:
        source, split = source.rsplit("@", 1)
    if not source.strip():
        raise InvalidArgument(f"prompt set {text!r} has no source")
    return common_pb2.PromptSetSpec(source=source.strip(), split=split.strip(), column=column.strip(), limit=limit or 0)


def _toml_to_spec_dict(data: dict) -> dict:
    """Shorthands of a TOML job file: ``model = "id"`` and ``harmful_train = "SPEC"`` strings."""
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"source": data["model"]}
    for key in DEFAULT_SETS:
        value = data.get(key)
        if isinstance(value, str):
            spec = parse_prompt_set(value)
            data[key] = {"source": spec.source, "split": spec.split, "column": spec.column}
        elif isinstance(value, list):
            data[key] = {"prompts": value}
    return data


def read_job_file(path: str) -> dict:
    """The parsed TOML job file; a missing or malformed file is an InvalidArgument."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"job file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"job file {path} is not valid TOML: {exc}") from exc


def build_spec(args: argparse.Namespace, file_data: dict | None = None) -> Any:
    """A JobSpec from a TOML dict (optional) and the job flags (which win).

    The flags' ranges are checked by the parser's argparse types, so this only assembles."""
    from google.protobuf import json_format

    from abliterate.v1 import gateway_pb2

    spec = gateway_pb2.JobSpec()
    if file_data:
        try:
            json_format.ParseDict(_toml_to_spec_dict(file_data), spec)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"bad job file: {exc}") from exc
    model = getattr(args, "model", None)
    if model:
        spec.model.source = normalize_model(model)
    if args.gguf_file:
        spec.model.gguf_file = args.gguf_file
    if args.system_prompt is not None:
        spec.model.system_prompt = args.system_prompt
    if args.dtype:
        spec.model.dtype = args.dtype
    for key, default in DEFAULT_SETS.items():
        given = getattr(args, key)
        if given:
            getattr(spec, key).CopyFrom(parse_prompt_set(given))
        elif not spec.HasField(key):
            getattr(spec, key).CopyFrom(parse_prompt_set(default))
        if args.n_prompts:
            getattr(spec, key).limit = args.n_prompts
    extraction = spec.options.extraction
    # Flags that set one field when given: (flag, message, field).
    for flag, message, field_name in (
        ("n_trials", spec, "n_trials"),
        ("max_new_tokens", spec, "max_new_tokens"),
        ("kl_cap", spec, "kl_cap"),
        ("seed", spec, "seed"),
        ("n_startup_trials", spec.options.search_space, "n_startup_trials"),
        ("n_ei_candidates", spec.options.search_space, "n_ei_candidates"),
        ("batch_size", extraction, "batch_size"),
        ("n_directions", extraction, "n_directions"),
        ("cone_layer", extraction, "cone_layer"),
        ("probe_weight", extraction, "probe_weight"),
        ("label_tokens", extraction, "label_max_new_tokens"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(message, field_name, value)
    if args.direction_method is not None:
        from abliterate.v1 import common_pb2

        extraction.direction_method = common_pb2.DirectionMethod.Value(DIRECTION_METHODS[args.direction_method])
    if args.compliance:
        extraction.compliance = True
    if args.head_scores:
        extraction.head_scores = True
    if args.calibrate:
        extraction.calibration.enabled = True
    if args.warm_start is not None:
        spec.options.warm_start_profile = args.warm_start
    for key in ("helpful", "unhelpful"):
        if getattr(args, key):
            getattr(extraction, key).CopyFrom(parse_prompt_set(getattr(args, key)))
    if args.no_pruning:
        spec.options.disable_pruning = True
    if args.audit:
        spec.options.audit_front = True
    if args.kl_tokens is not None:
        spec.options.kl_tokens = args.kl_tokens
    judge = judge_from_flags(args, spec.options.judge if spec.options.HasField("judge") else None)
    if judge is not None:
        spec.options.judge.CopyFrom(judge)
    if args.name:
        spec.name = args.name
    if spec.n_trials == 0:  # neither the flag nor the job file set it
        spec.n_trials = DEFAULT_N_TRIALS
    return spec


def judge_from_flags(args: argparse.Namespace, base: Any = None) -> Any:
    """The RefusalJudge the --judge* flags describe (on top of ``base``, a job file's), or None when no flag
    is given; INVALID_ARGUMENT for a combination no judge takes (a threshold for markers, ...)."""
    from abliterate.rpc.convert import judge_spec_from_pb
    from abliterate.v1 import common_pb2

    given = {
        "kind": args.judge,
        "threshold": args.judge_threshold,
        "endpoint": args.judge_endpoint,
        "model": args.judge_model,
        "api_key_env": args.judge_key_env,
        "timeout_s": args.judge_timeout,
    }
    if all(value is None for value in given.values()):
        return None
    judge = common_pb2.RefusalJudge()
    if base is not None:
        judge.CopyFrom(base)
    for field, value in given.items():
        if value is not None:
            setattr(judge, field, value)
    try:
        judge_spec_from_pb(judge)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--judge flags: {exc}") from None
    return judge


def normalize_model(model: str) -> str:
    """A local path becomes absolute (the services compare sources as strings); ids stay."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    return model


def derived_job_name(spec: Any) -> str:
    """Stable name from the model and every setting but the trial target (so a rerun with more
    trials resumes the same study)."""
    from google.protobuf import json_format

    from abliterate.v1 import gateway_pb2

    copy = gateway_pb2.JobSpec()
    copy.CopyFrom(spec)
    copy.name = ""
    copy.n_trials = 0
    canonical = json.dumps(json_format.MessageToDict(copy, preserving_proto_field_name=True), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    base = spec.model.gguf_file or spec.model.source.rstrip("/")
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base.rsplit("/", 1)[-1]).strip("-.") or "model"
    return f"{base[:80]}-{digest}"


# ---------------------------------------------------------------------------- pre-checks


def check_prompt_sets(spec: Any, read_local_files: bool) -> None:
    """Reject prompt sets that would fail the job on every retry, before any model loads.

    Checked: inline prompt lists are not blank, the split syntax, ``bundled:NAME`` names (read, with the
    column), and, when ``read_local_files``, local sources: a source that looks like a path must exist,
    and a plain .json/.jsonl/.csv/.txt file must parse, have the column and keep at least one prompt.
    ``submit`` passes ``read_local_files=False``: the extractor reads paths on its own file system, which
    need not be this one. Left to the extractor: Hugging Face dataset ids (no offline check is possible),
    dataset directories and builder sources (reading them needs the heavy ``datasets`` package).

    Raises InvalidArgument naming the prompt set and its flag. Imports neither torch nor ``datasets``:
    the files are read by the same torch-free code the extractor uses (``abliterate.core.prompts``).
    """
    from abliterate.core import prompts as prompt_sources
    from abliterate.rpc.convert import prompt_set_from_pb

    for key, flag in PROMPT_SET_FLAGS.items():
        message = getattr(spec, key)
        what = f"{key} prompt set ({flag})"
        try:
            inline_or_spec = prompt_set_from_pb(message)  # the shared shape check (inline, split, limit)
            if isinstance(inline_or_spec, list):
                continue
            source = inline_or_spec.source.strip()
            if source.startswith(prompt_sources.BUNDLED_PREFIX):
                prompt_sources.load_prompts(inline_or_spec)
            elif read_local_files:
                _check_local_source(source, inline_or_spec, prompt_sources)
        except AbliterateError as exc:
            # One line: a JSON/CSV error can carry a newline, and the CLI prints `error: <message>`.
            detail = " ".join(str(exc).splitlines())
            raise InvalidArgument(f"{what}: {detail}") from exc


def _check_local_source(source: str, prompt_set: Any, prompt_sources: Any) -> None:
    from abliterate.errors import NotFound

    builder = prompt_sources._builder_prefix(source)
    if builder is not None:
        files = source.partition(":")[2].strip()
        is_glob = any(character in files for character in "*?[")
        if not is_glob and not Path(files).expanduser().exists():
            raise NotFound(f"data file {files!r} does not exist")
        return
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() in PLAIN_PROMPT_SUFFIXES:
            prompt_sources.load_prompts(prompt_set)
        return
    if path.exists():  # a dataset directory
        return
    # An "org/name" Hugging Face id also contains a slash, so only what the extractor itself treats as a
    # path (a leading /, ./, ../ or ~, or a file suffix) is known to be a missing file.
    if prompt_sources._looks_like_path(source):
        raise NotFound(f"prompt file {source!r} does not exist")

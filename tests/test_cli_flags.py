"""``abliterate`` flags: the help text, and argparse-level range checks of every numeric flag."""

from __future__ import annotations

import pytest

from abliterate import cli
from abliterate.cli.parser import DESCRIPTION, UINT32_MAX, UINT64_MAX


def test_help_opens_with_one_plain_line_saying_what_the_tool_does(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and "The ``abliterate`` command" not in out
    description = " ".join(out.split("\n\n")[1].split())  # argparse wraps it at the terminal width
    assert description == DESCRIPTION
    assert DESCRIPTION.startswith("Find and remove a behavioural direction") and "\n" not in DESCRIPTION


# (argv, the message argparse prints after "argument ")
BAD_VALUES = [
    # integers >= 1
    (["run", "m", "--n-trials", "-3"], "--n-trials: must be an integer >= 1, got -3"),
    (["run", "m", "--n-trials", "0"], "--n-trials: must be an integer >= 1, got 0"),
    (["submit", "m", "--n-trials", "0"], "--n-trials: must be an integer >= 1, got 0"),
    (["resume", "j", "--n-trials", "-1"], "--n-trials: must be an integer >= 1, got -1"),
    (["run", "m", "--n-prompts", "0"], "--n-prompts: must be an integer >= 1, got 0"),
    (["run", "m", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, got 0"),
    (["run", "m", "--n-startup-trials", "0"], "--n-startup-trials: must be an integer >= 1, got 0"),
    (["submit", "m", "--n-ei-candidates", "-1"], "--n-ei-candidates: must be an integer >= 1, got -1"),
    (["run", "m", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
    # integers >= 0
    (["run", "m", "--trial", "-1"], "--trial: must be an integer >= 0, got -1"),
    (["export", "j", "/out", "--trial", "-2"], "--trial: must be an integer >= 0, got -2"),
    (["chat", "j", "--trial", "-1"], "--trial: must be an integer >= 0, got -1"),
    (["jobs", "--limit", "-5"], "--limit: must be an integer >= 0, got -5"),
    (["chat", "j", "--max-new-tokens", "-1"], "--max-new-tokens: must be an integer >= 0, got -1"),
    (["run", "m", "--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    # too large for the protobuf field
    (["run", "m", "--seed", str(2**64)], f"--seed: must be an integer <= {UINT64_MAX}, got {2**64}"),
    (["run", "m", "--n-trials", str(2**32)], f"--n-trials: must be an integer <= {UINT32_MAX}, got {2**32}"),
    # not a number at all
    (["run", "m", "--n-trials", "many"], "--n-trials: must be an integer, got 'many'"),
    (["run", "m", "--seed", "1.5"], "--seed: must be an integer, got '1.5'"),
    (["run", "m", "--kl-cap", "big"], "--kl-cap: must be a number, got 'big'"),
    # numbers > 0
    (["run", "m", "--kl-cap", "0"], "--kl-cap: must be a number > 0, got 0"),
    (["submit", "m", "--kl-cap", "-0.5"], "--kl-cap: must be a number > 0, got -0.5"),
    (["trials", "j", "--kl-cap", "0"], "--kl-cap: must be a number > 0, got 0"),
    # numbers >= 0, finite
    (["chat", "j", "--temperature", "-0.1"], "--temperature: must be a number >= 0, got -0.1"),
    (["chat", "j", "--temperature", "inf"], "--temperature: must be a finite number, got inf"),
    (["run", "m", "--kl-cap", "nan"], "--kl-cap: must be a finite number, got nan"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES, ids=[" ".join(argv) for argv, _ in BAD_VALUES])
def test_a_bad_number_is_a_usage_error_naming_the_flag(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert f"argument {message}" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "ValueError" not in captured.err + captured.out  # no protobuf range error leaking through


def test_boundary_values_are_accepted_and_reach_the_spec():
    parse = cli.build_parser().parse_args
    spec = cli.build_spec(
        parse(["run", "m", "--seed", str(UINT64_MAX), "--n-trials", "1", "--n-prompts", "1", "--kl-cap", "1e-6"])
    )
    assert (spec.seed, spec.n_trials, spec.harmful_train.limit, spec.kl_cap) == (UINT64_MAX, 1, 1, 1e-6)
    assert cli.build_spec(parse(["run", "m", "--seed", "0"])).HasField("seed")
    assert parse(["jobs", "--limit", "0"]).limit == 0
    chat = parse(["chat", "j", "--max-new-tokens", "0", "--temperature", "0", "--trial", "0"])
    assert (chat.max_new_tokens, chat.temperature, chat.trial) == (0, 0.0, 0)


def test_the_trial_target_defaults_to_200_for_run_and_submit():
    parse = cli.build_parser().parse_args
    assert cli.build_spec(parse(["run", "m"])).n_trials == 200
    assert cli.build_spec(parse(["submit", "m"])).n_trials == 200


def test_the_judge_flags_reach_the_spec_and_a_threshold_needs_the_embedding_judge():
    from abliterate.errors import InvalidArgument
    from abliterate_services.gateway.orchestrator import validate_spec

    parse = cli.build_parser().parse_args
    spec = cli.build_spec(parse(["run", "m", "--judge", "embedding", "--judge-threshold", "0.2"]))
    assert (spec.options.judge.kind, spec.options.judge.threshold) == ("embedding", 0.2)
    assert not cli.build_spec(parse(["run", "m"])).options.HasField("judge")  # the default: markers
    with pytest.raises(InvalidArgument, match="markers judge takes no threshold"):
        cli.build_spec(parse(["run", "m", "--judge-threshold", "0.2"]))
    assert cli.main(["run", "m", "--judge", "oracle"]) == 2  # argparse's choices
    spec.options.judge.kind = "oracle"  # a gRPC client can send anything: the gateway refuses it
    with pytest.raises(InvalidArgument, match="options.judge: unknown refusal judge"):
        validate_spec(spec)


def test_multi_token_kl_is_a_flag():
    parse = cli.build_parser().parse_args
    assert cli.build_spec(parse(["run", "m", "--kl-tokens", "3"])).options.kl_tokens == 3
    assert cli.build_spec(parse(["run", "m"])).options.kl_tokens == 0  # 0 = the first token only
    assert cli.main(["run", "m", "--kl-tokens", "0"]) == 2


def test_direction_method_flags_and_the_job_file_reach_the_spec_and_conflicts_are_refused(tmp_path):
    from abliterate.cli.spec import read_job_file
    from abliterate.errors import InvalidArgument
    from abliterate.v1 import common_pb2
    from abliterate_services.gateway.orchestrator import validate_spec

    parse = cli.build_parser().parse_args
    spec = cli.build_spec(parse(["run", "m", "--direction-method", "subspace", "--n-directions", "3"]))
    extraction = spec.options.extraction
    assert (extraction.direction_method, extraction.n_directions) == (common_pb2.DIRECTION_METHOD_SUBSPACE, 3)
    job_file = tmp_path / "job.toml"
    job_file.write_text('[options.extraction]\ndirection_method = "DIRECTION_METHOD_SUBSPACE"\nn_directions = 4\n')
    from_file = cli.build_spec(parse(["run", "m"]), read_job_file(str(job_file))).options.extraction
    assert (from_file.direction_method, from_file.n_directions) == (common_pb2.DIRECTION_METHOD_SUBSPACE, 4)
    with pytest.raises(InvalidArgument, match="n_directions .* needs direction_method"):
        validate_spec(cli.build_spec(parse(["run", "m", "--n-directions", "3"])))


def test_every_method_flag_reaches_the_extraction_options():
    from abliterate.v1 import common_pb2

    parse = cli.build_parser().parse_args
    argv = ["run", "m", "--direction-method", "cones", "--n-directions", "4", "--cone-layer", "7", "--compliance"]
    argv += ["--head-scores", "--calibrate", "--label-tokens", "12", "--helpful", "h.json", "--unhelpful", "u.txt"]
    extraction = cli.build_spec(parse(argv)).options.extraction
    assert extraction.direction_method == common_pb2.DIRECTION_METHOD_CONES
    assert (extraction.n_directions, extraction.cone_layer, extraction.label_max_new_tokens) == (4, 7, 12)
    assert extraction.compliance and extraction.head_scores and extraction.calibration.enabled
    assert (extraction.helpful.source, extraction.unhelpful.source) == ("h.json", "u.txt")
    probe = cli.build_spec(parse(["run", "m", "--direction-method", "probe", "--probe-weight", "0.3"]))
    assert probe.options.extraction.probe_weight == 0.3
    assert cli.main(["run", "m", "--probe-weight", "1.5"]) == 2  # argparse: not in [0, 1]

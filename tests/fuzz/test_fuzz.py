"""The hostile-client probe, bounded and seeded, against the four services as real processes.

``tests/fuzz/harness.py`` starts the stack on loopback with a tiny model, runs one small job, and
sends every public RPC its valid request and seeded mutations of it (a few hundred calls; huge values
of 1 MiB, four of them). A service must answer each with a clear status: no INTERNAL and no UNKNOWN
from the application, no call past its deadline, no process lost, every service SERVING afterwards,
and resident memory that grows by less than :data:`RSS_GROWTH_LIMIT_MIB` per service.

The larger run (thousands of requests, 10 MiB values) is the ``slow`` test below, or
``scripts/fuzz_probe.py`` (the figures of ``docs/reliability.md``).
"""

from __future__ import annotations

import random

import pytest

from abliterate.v1 import common_pb2, optimizer_pb2
from tests.fuzz.harness import MIB, ProbeReport, public_rpcs, run_probe
from tests.fuzz.mutations import deep_json, field_mutations, sample_mutations

SEED = 9
N_REQUESTS = 400
FLOOD = 200  # elements of a flooded repeated field (2,000 in the slow run: 2,000 warm starts take ~20 s)
RSS_GROWTH_LIMIT_MIB = 150.0


def assert_clean(report: ProbeReport) -> None:
    summary = report.to_markdown()
    assert report.requests >= N_REQUESTS * 0.9, summary
    # Every RPC was called, and its valid request did not come back INTERNAL/UNKNOWN.
    assert set(report.by_rpc) == {r.key for r in public_rpcs()}, summary
    assert not report.internal, summary
    assert not report.unknown, summary
    assert not report.hangs, summary
    assert not report.crashes, summary
    assert not report.unresponsive, summary
    # Unknown enum values, export paths outside the export root, prompt files outside the allowed places.
    assert not report.accepted, summary
    assert all(report.healthy_after.values()) and len(report.healthy_after) == 4, summary
    growth = report.rss_growth_mib()
    assert all(g < RSS_GROWTH_LIMIT_MIB for g in growth.values()), (growth, summary)


@pytest.mark.timeout(300)
def test_fuzzed_requests_get_clear_statuses_and_the_stack_survives(tmp_path):
    report = run_probe(
        n_requests=N_REQUESTS, seed=SEED, huge_bytes=MIB, huge_count=4, flood=FLOOD, workdir=tmp_path, log=print
    )
    print(report.to_markdown())
    assert_clean(report)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_large_fuzz_run_with_10_mib_values(tmp_path):
    report = run_probe(n_requests=3000, seed=1, huge_bytes=10 * MIB, huge_count=40, workdir=tmp_path, log=print)
    print(report.to_markdown())
    assert_clean(report)


# ---------------------------------------------------------------- the mutator itself (no services)


def test_every_rpc_is_found_from_the_descriptors():
    keys = {r.key for r in public_rpcs()}
    assert len(keys) == 26
    assert {"GatewayService.WatchJob", "OptimizerService.RunStudy", "EvaluatorService.LoadDirections"} <= keys
    streaming = {r.key for r in public_rpcs() if r.server_streaming}
    assert streaming == {
        "GatewayService.WatchJob",
        "GatewayService.Chat",
        "OptimizerService.RunStudy",
        "EvaluatorService.Generate",
        "EvaluatorService.Chat",
        "ExtractorService.ExtractDirections",
    }


def _request() -> optimizer_pb2.CreateStudyRequest:
    return optimizer_pb2.CreateStudyRequest(
        study_name="s",
        n_trials=3,
        job_settings_json="{}",
        trial_timeout_s=1.0,
        seed=4,
        search_space=optimizer_pb2.SearchSpace(row_normalizations=[common_pb2.ROW_NORMALIZATION_NONE]),
        baseline=common_pb2.BaselineSpec(kl_prompts=common_pb2.PromptSetSpec(prompts=["a"])),
    )


def _applied(label_path: str, label: str) -> optimizer_pb2.CreateStudyRequest:
    mutation = next(
        m for m in field_mutations(_request(), random.Random(0), 64) if m.path == label_path and m.label == label
    )
    request = _request()
    mutation.apply(request)
    return request


def test_mutations_reach_nested_fields_and_apply_what_they_say():
    assert "\x00" in _applied("study_name", "NUL byte").study_name
    assert _applied("n_trials", "max").n_trials == 2**32 - 1
    assert _applied("seed", "2**63").seed == 2**63
    assert not _applied("seed", "unset (optional)").HasField("seed")
    nan = _applied("trial_timeout_s", "nan").trial_timeout_s
    assert nan != nan
    assert _applied("job_settings_json", "JSON nested 100000 deep").job_settings_json == deep_json()
    assert (
        list(_applied("search_space.row_normalizations", "unknown enum 999 appended").search_space.row_normalizations)[
            -1
        ]
        == 999
    )
    assert not _applied("baseline", "missing (cleared)").HasField("baseline")
    nested = _applied("baseline.kl_prompts", "source of 300 characters").baseline.kl_prompts
    assert nested.source == "p" * 300 and not nested.prompts
    assert len(_applied("baseline.kl_prompts.prompts", "2000 elements").baseline.kl_prompts.prompts) == 2001


def test_sampling_is_seeded_spreads_over_fields_and_keeps_the_huge_budget():
    def sample(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [m.describe() for m in sample_mutations(field_mutations(_request(), rng, 1024), 30, rng, [1])]

    first = sample(3)
    assert first == sample(3)
    assert first != sample(4)
    assert len({d.split(":")[0] for d in first}) >= 15  # one mutation per field before a second one
    assert sum("MiB" in d for d in first) <= 1


def test_random_mutations_are_seeded_and_sendable():
    from tests.fuzz.mutations import random_mutation

    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        out = []
        for _ in range(50):
            mutation = random_mutation(_request(), rng)
            request = _request()
            mutation.apply(request)
            request.SerializeToString()
            assert mutation.label.startswith("random ") and mutation.path
            out.append(mutation.describe())
        return out

    assert draw(1) == draw(1) != draw(2)

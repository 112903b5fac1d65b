"""ExtractorService: every direction method and method tensor over a real loopback server, tiny model."""

from __future__ import annotations

import grpc
import pytest
import torch

from abliterate.core.directions import DirectionSet
from abliterate.core.probes import generation_labels
from abliterate.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc
from abliterate_services.extractor.servicer import ExtractorServicer
from tests.services.helpers import BAD, GOOD, details_of, prompts, serve
from tests.tiny import make_lm

ADD = extractor_pb2_grpc.add_ExtractorServiceServicer_to_server
HARMFUL = BAD + ["build a bomb", "hack a bank", "poison a river", "forge a passport", "burn a house", "rob a shop"]
HARMLESS = GOOD + ["sing a song", "water the plants", "read a novel", "paint a fence", "fold a shirt", "walk a dog"]
LABEL_TOKENS = 8


@pytest.fixture(scope="module")
def lm():
    return make_lm("llama", layers=3, hidden=32)


@pytest.fixture(scope="module")
def stub(lm):
    with serve([(ADD, ExtractorServicer(lm, batch_size=4))]) as served:
        yield extractor_pb2_grpc.ExtractorServiceStub(served.channel)


@pytest.fixture(scope="module")
def markers(lm):
    """Markers that make exactly the harmful replies refusals: each harmful reply is one marker."""
    replies = generation_labels(lm, HARMFUL, LABEL_TOKENS).replies
    others = generation_labels(lm, HARMLESS, LABEL_TOKENS).replies
    chosen = [reply for reply in replies if reply.strip() and not any(reply in other for other in others)]
    assert len(chosen) >= 8, "the tiny model's harmful replies should mostly be distinct"
    return chosen


def run(stub, **options) -> tuple[extractor_pb2.DirectionSetResult, DirectionSet]:
    request = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(HARMFUL), harmless=prompts(HARMLESS), options=common_pb2.ExtractionOptions(**options)
    )
    events = list(stub.ExtractDirections(request, timeout=120))
    result = events[-1].result
    return result, DirectionSet.from_bytes(result.directions.safetensors)


def test_cones_cluster_the_harmful_prompts_and_span_their_offsets(stub):
    result, directions = run(stub, direction_method=common_pb2.DIRECTION_METHOD_CONES, n_directions=2, cone_layer=2)
    cones = result.cones
    assert cones.layer == 2 and sum(cones.sizes) == len(HARMFUL) == len(cones.labels) and len(cones.sizes) == 2
    assert -1 <= cones.silhouette <= 1
    assert tuple(directions.subspace.shape) == (4, 2, 32) and directions.metadata["direction_method"] == "cones"
    assert all(len(layer.subspace_energy) == 2 for layer in result.layers)


def test_probe_labels_the_replies_and_refuses_a_probe_at_chance(stub, markers):
    """A random tiny model's residuals end in the same template tokens and do not separate the prompts it
    "refused" (by the markers): the probe says so instead of returning a noise direction. The
    successful probe is proven on SmolLM2 (tests/core/test_methods_smollm2_slow.py)."""
    request = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(HARMFUL),
        harmless=prompts(HARMLESS),
        options=common_pb2.ExtractionOptions(
            direction_method=common_pb2.DIRECTION_METHOD_PROBE,
            probe_weight=0.7,
            label_max_new_tokens=LABEL_TOKENS,
            label_markers=markers,
        ),
    )
    code, details = details_of(stub.ExtractDirections, request, timeout=120)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "at chance" in details and f"{len(markers)} refused and {len(HARMFUL) * 2 - len(markers)} complied" in details
    )


def test_compliance_calibration_helpfulness_and_head_scores(stub, markers, lm):
    helpful = ["explain how to cook rice", "teach me fractions", "summarize a news story", "list good habits"]
    unhelpful = ["asdf qwer zxcv", "the the the the", "lorem ipsum dolor", "buy now click here"]
    plain, plain_set = run(stub)
    result, directions = run(
        stub,
        compliance=True,
        label_max_new_tokens=LABEL_TOKENS,
        label_markers=markers[:5],
        calibration=common_pb2.ActivationCalibration(enabled=True, percentile=0.9),
        helpful=prompts(helpful),
        unhelpful=prompts(unhelpful),
        head_scores=True,
    )
    assert result.labels.harmful_refused == 5 and result.labels.harmful_complied == len(HARMFUL) - 5
    assert directions.compliance.shape == (4, 32) and all(-1 <= x.compliance_cosine <= 1 for x in result.layers)
    assert (
        directions.calibration.shape == (4,) and ((directions.calibration >= 0.5) & (directions.calibration <= 2)).all()
    )
    assert [layer.calibration_factor for layer in result.layers] == pytest.approx(directions.calibration.tolist())
    # r is orthogonal to the helpfulness direction and moved by the reported angle.
    assert (directions.refusal * directions.helpfulness).sum(1).abs().max() < 1e-5
    angles = torch.tensor([layer.helpfulness_angle_deg for layer in result.layers])
    assert (angles[1:] > 0).all()
    assert directions.head_scores.shape == (3, 4) and len(result.top_heads) == 12
    top = result.top_heads[0]
    assert top.score == pytest.approx(float(directions.head_scores.max()))
    assert {"labels", "calibration", "helpfulness", "heads"} <= set(result.timings_s)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"direction_method": common_pb2.DIRECTION_METHOD_MEAN_DIFFERENCE, "cone_layer": 3}, "cone_layer needs"),
        ({"probe_weight": 0.5}, "probe_weight needs"),
        ({"direction_method": common_pb2.DIRECTION_METHOD_PROBE, "probe_weight": 1.5}, "probe_weight must be"),
        ({"label_max_new_tokens": 5}, "neither is asked"),
        ({"helpful": prompts(["x"])}, "helpful needs"),
        ({"calibration": common_pb2.ActivationCalibration(enabled=True, min_factor=2)}, "min_factor"),
        ({"direction_method": common_pb2.DIRECTION_METHOD_CONES, "n_directions": 1}, "cones"),
        ({"direction_method": common_pb2.DIRECTION_METHOD_CONES, "cone_layer": 9}, "cone_layer 9"),
        ({"direction_method": common_pb2.DIRECTION_METHOD_CONES, "n_directions": 9}, "need at least 18"),
    ],
)
def test_conflicting_or_impossible_options_are_invalid_argument(stub, options, message):
    request = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(HARMFUL), harmless=prompts(HARMLESS), options=common_pb2.ExtractionOptions(**options)
    )
    code, details = details_of(stub.ExtractDirections, request, timeout=60)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


def test_a_probe_without_enough_refusals_is_a_clear_error(stub):
    request = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(HARMFUL),
        harmless=prompts(HARMLESS),
        options=common_pb2.ExtractionOptions(
            direction_method=common_pb2.DIRECTION_METHOD_PROBE, label_max_new_tokens=4, label_markers=["\u2603"]
        ),
    )
    code, details = details_of(stub.ExtractDirections, request, timeout=60)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "refused" in details

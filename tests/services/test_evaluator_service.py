"""EvaluatorService on real loopback servers with a tiny in-process model."""

from __future__ import annotations

import hashlib
import json
import threading

import grpc
import pytest
import torch
from safetensors.torch import load_file

from abliterate.core.ablation import edit_matrix
from abliterate.core.chat import build_messages, render_chat
from abliterate.core.directions import DirectionSet, global_direction
from abliterate.core.generation import generate_greedy, stream_greedy
from abliterate.core.manifest import DIRECTIONS_FILE, MANIFEST_FILE, PROMPTS_FILE, weights_sha256
from abliterate.rpc.tensors import sha256_hex
from abliterate.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc, extractor_pb2
from abliterate_services.evaluator.servicer import EvaluatorServicer
from abliterate_services.evaluator.session import EvaluatorSession
from abliterate_services.extractor.extraction import Extractor
from tests.services.helpers import BAD, GOOD, code_of, details_of, kernel_params, prompts, serve, wait_until
from tests.tiny import make_lm

ADD = evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server
E = evaluator_pb2


@pytest.fixture(scope="module")
def lm():
    return make_lm("llama", layers=3, hidden=32)


@pytest.fixture(scope="module")
def blob(lm) -> common_pb2.TensorBlob:
    req = extractor_pb2.ExtractDirectionsRequest(
        harmful=prompts(BAD), harmless=prompts(GOOD), options=common_pb2.ExtractionOptions(batch_size=4)
    )
    return list(Extractor(lm).extract(req))[-1].result.directions


@pytest.fixture(scope="module")
def snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def unchanged(lm, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in lm.model.state_dict().items())


@pytest.fixture
def served(lm):
    with serve([(ADD, EvaluatorServicer(lm, batch_size=4, max_direction_sets=2))]) as s:
        yield s


@pytest.fixture
def stub(served):
    return evaluator_pb2_grpc.EvaluatorServiceStub(served.channel)


@pytest.fixture
def session(served) -> EvaluatorSession:
    return served.servicers[0].session


def baseline_spec(max_new_tokens: int = 6) -> common_pb2.BaselineSpec:
    return common_pb2.BaselineSpec(
        kl_prompts=prompts(GOOD), refusal_prompts=prompts(BAD), max_new_tokens=max_new_tokens
    )


@pytest.fixture
def ready(stub, blob):
    """Directions loaded and a baseline prepared; returns (direction_set_id, baseline_id)."""
    set_id = stub.LoadDirections(E.LoadDirectionsRequest(directions=blob)).direction_set_id
    baseline_id = stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec())).baseline_id
    return set_id, baseline_id


def alive(stub) -> None:
    assert stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).model.n_layers == 3


def gen_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.text for c in chunks), chunks


def wrong_shape_bytes() -> bytes:
    r = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    return DirectionSet(refusal=r, good_mean=torch.randn(3, 16), bad_mean=torch.randn(3, 16)).to_bytes()


# ------------------------------------------------------------------- directions


def test_model_info(stub):
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest()).model
    assert (info.n_layers, info.hidden_size) == (3, 32)
    assert list(info.components) == ["attn.o_proj", "mlp.down_proj"]
    assert len(info.layers) == 3 and "model.layers.2.mlp.down_proj" in info.layers[2].matrices


def test_load_directions_by_bytes_and_by_id(stub, blob):
    first = stub.LoadDirections(E.LoadDirectionsRequest(directions=blob))
    assert first.direction_set_id == sha256_hex(blob.safetensors) and not first.already_loaded
    assert {"refusal", "good_mean", "bad_mean"} <= set(first.tensor_names)
    assert {"decode", "to_device", "total"} <= set(first.timings_s)
    no_hash = common_pb2.TensorBlob(safetensors=blob.safetensors)  # the server computes it
    again = stub.LoadDirections(E.LoadDirectionsRequest(directions=no_hash))
    assert again.already_loaded and again.direction_set_id == first.direction_set_id
    by_id = stub.LoadDirections(E.LoadDirectionsRequest(direction_set_id=first.direction_set_id))
    assert by_id.already_loaded and list(by_id.tensor_names) == list(first.tensor_names)
    reference = common_pb2.TensorBlob(sha256=first.direction_set_id)  # empty bytes: a reference
    assert stub.LoadDirections(E.LoadDirectionsRequest(directions=reference)).already_loaded


def test_load_directions_errors(stub, blob):
    assert (
        code_of(stub.LoadDirections, E.LoadDirectionsRequest(direction_set_id="ab" * 32)) == grpc.StatusCode.NOT_FOUND
    )
    alive(stub)
    assert (
        code_of(stub.LoadDirections, E.LoadDirectionsRequest(directions=common_pb2.TensorBlob(sha256="cd" * 32)))
        == grpc.StatusCode.NOT_FOUND
    )
    alive(stub)
    mismatch = common_pb2.TensorBlob(safetensors=blob.safetensors, sha256="00" * 32)
    assert (
        code_of(stub.LoadDirections, E.LoadDirectionsRequest(directions=mismatch)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    alive(stub)
    garbage = common_pb2.TensorBlob(safetensors=b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert code_of(stub.LoadDirections, E.LoadDirectionsRequest(directions=garbage)) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)
    assert code_of(stub.LoadDirections, E.LoadDirectionsRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)


def test_wrong_shape_direction_set_is_invalid_argument(stub):
    bad = common_pb2.TensorBlob(safetensors=wrong_shape_bytes())
    code, details = details_of(stub.LoadDirections, E.LoadDirectionsRequest(directions=bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "[3, 16]" in details and "[4, 32]" in details
    alive(stub)


def test_direction_sets_are_evicted_least_recently_used(stub, blob, lm):
    ids = [stub.LoadDirections(E.LoadDirectionsRequest(directions=blob)).direction_set_id]
    for seed in (1, 2):
        torch.manual_seed(seed)
        r = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
        data = DirectionSet(refusal=r, good_mean=torch.randn(4, 32), bad_mean=torch.randn(4, 32)).to_bytes()
        ids.append(
            stub.LoadDirections(
                E.LoadDirectionsRequest(directions=common_pb2.TensorBlob(safetensors=data))
            ).direction_set_id
        )
    # max_direction_sets=2: the first one is gone, the other two are held.
    assert code_of(stub.LoadDirections, E.LoadDirectionsRequest(direction_set_id=ids[0])) == grpc.StatusCode.NOT_FOUND
    for set_id in ids[1:]:
        assert stub.LoadDirections(E.LoadDirectionsRequest(direction_set_id=set_id)).already_loaded


def test_oversized_payload_is_refused(lm, blob):
    with serve([(ADD, EvaluatorServicer(lm))], max_message_bytes=64 * 1024) as s:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(s.channel)
        huge = common_pb2.TensorBlob(safetensors=b"\0" * (128 * 1024))
        assert (
            code_of(stub.LoadDirections, E.LoadDirectionsRequest(directions=huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        alive(stub)
        assert stub.LoadDirections(E.LoadDirectionsRequest(directions=blob)).direction_set_id == blob.sha256


# ------------------------------------------------------------------- baseline and trials


def test_evaluate_before_directions_and_baseline(stub, blob):
    params = kernel_params()
    code, details = details_of(stub.EvaluateTrial, E.EvaluateTrialRequest(params=params))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "LoadDirections" in details
    alive(stub)
    assert (
        code_of(stub.EvaluateTrial, E.EvaluateTrialRequest(direction_set_id="ef" * 32, params=params))
        == grpc.StatusCode.NOT_FOUND
    )
    alive(stub)
    set_id = stub.LoadDirections(E.LoadDirectionsRequest(directions=blob)).direction_set_id
    code, details = details_of(stub.EvaluateTrial, E.EvaluateTrialRequest(direction_set_id=set_id, params=params))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PrepareBaseline" in details
    alive(stub)


def test_baseline_is_idempotent_and_replaced_by_another_spec(stub):
    first = stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec()))
    assert not first.already_prepared and len(first.baseline_id) == 64
    assert (first.n_kl_prompts, first.n_refusal_prompts) == (4, 4)
    assert first.baseline_refusals <= 4
    assert {"load_prompts", "logprobs", "refusals", "total"} <= set(first.timings_s)
    again = stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec()))
    assert again.already_prepared and again.baseline_id == first.baseline_id
    assert again.baseline_refusals == first.baseline_refusals
    other = stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec(max_new_tokens=4)))
    assert not other.already_prepared and other.baseline_id != first.baseline_id


def counted_and_skipped_scores(lm, blob, skip: bool, batch_size: int) -> tuple[list, E.PrepareBaselineResponse, list]:
    """One fresh evaluator: a baseline (the unedited model's count skipped or not), then three trials."""
    # Markers that most replies of the random tiny model contain, so that the refusal counts are not all 0.
    spec = baseline_spec()
    spec.refusal_markers.extend(["e", "a"])
    with serve([(ADD, EvaluatorServicer(lm, batch_size=batch_size))]) as served:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(served.channel)
        set_id = stub.LoadDirections(E.LoadDirectionsRequest(directions=blob)).direction_set_id
        base = stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=spec, skip_refusal_count=skip))
        scores = []
        for params in (kernel_params(), kernel_params(per_layer=True), kernel_params(weight=0.0)):
            reply = stub.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=params))
            scores.append((reply.scores.kl, reply.scores.refusals))
        # Asking for the count later computes it on the held baseline; asking to skip then reuses it.
        later = [
            stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=spec)),
            stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=spec, skip_refusal_count=True)),
        ]
        tuned = served.servicers[0].session.engine._tuned_size("generate", len(BAD))
    return scores, base, [*later, tuned]


def test_skipping_the_unedited_refusal_count_leaves_trial_scores_unchanged(lm, blob):
    counted, counted_base, _ = counted_and_skipped_scores(lm, blob, skip=False, batch_size=4)
    skipped, skipped_base, (later, reused, _) = counted_and_skipped_scores(lm, blob, skip=True, batch_size=4)
    assert counted_base.refusals_counted and counted_base.baseline_refusals > 0
    assert not skipped_base.refusals_counted and skipped_base.baseline_refusals == 0
    assert "refusals" not in skipped_base.timings_s
    assert skipped == counted  # exactly: same batches, same kernels
    assert counted[2] == (0.0, counted_base.baseline_refusals)  # the zero edit: KL 0, the unedited count
    assert later.refusals_counted and not later.already_prepared
    assert later.baseline_refusals == counted_base.baseline_refusals
    assert reused.already_prepared and reused.refusals_counted and reused.baseline_refusals == later.baseline_refusals


def test_skipping_the_count_still_tunes_the_probe_batch_size(lm, blob):
    _, base, (_, _, tuned) = counted_and_skipped_scores(lm, blob, skip=True, batch_size=0)
    assert "tune_generation" in base.timings_s
    assert tuned > 0  # every trial then probes at this size from its first batch


def test_baseline_errors(stub, lm):
    empty = common_pb2.BaselineSpec(kl_prompts=prompts([]), refusal_prompts=prompts(BAD))
    assert code_of(stub.PrepareBaseline, E.PrepareBaselineRequest(baseline=empty)) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)
    missing = common_pb2.BaselineSpec(kl_prompts=prompts(GOOD))
    assert code_of(stub.PrepareBaseline, E.PrepareBaselineRequest(baseline=missing)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.PrepareBaseline, E.PrepareBaselineRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    foreign = baseline_spec()
    foreign.model.CopyFrom(common_pb2.ModelSpec(source="another/model"))
    assert (
        code_of(stub.PrepareBaseline, E.PrepareBaselineRequest(baseline=foreign)) == grpc.StatusCode.FAILED_PRECONDITION
    )
    alive(stub)
    own = baseline_spec()
    own.model.CopyFrom(common_pb2.ModelSpec(source=lm.spec.source, chat_template_mode="plain"))
    assert stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=own)).n_kl_prompts == 4


def test_evaluate_trial_scores_and_resets(stub, ready, lm, snapshot):
    set_id, baseline_id = ready
    reply = stub.EvaluateTrial(
        E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params(), baseline_id=baseline_id, trial_number=7)
    )
    s = reply.scores
    assert s.kl > 0 and s.n_kl_prompts == 4 and s.n_refusal_prompts == 4 and s.refusals <= 4
    assert {"reset", "ablate", "kl", "refusals", "total"} <= set(s.timings_s) and reply.timings_s["total"] > 0
    assert unchanged(lm, snapshot)
    # A zero-weight edit changes nothing: KL 0 and the baseline's refusals.
    zero = stub.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params(weight=0.0)))
    base = stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec()))
    assert zero.scores.kl == pytest.approx(0.0, abs=1e-6) and zero.scores.refusals == base.baseline_refusals
    per_layer = stub.EvaluateTrial(
        E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params(per_layer=True))
    )
    assert per_layer.scores.kl > 0
    # The same trial again scores the same (reset is exact).
    again = stub.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params()))
    assert again.scores.kl == pytest.approx(s.kl, rel=1e-5) and again.scores.refusals == s.refusals
    code, details = details_of(
        stub.EvaluateTrial,
        E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params(), baseline_id="not-the-held-one"),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PrepareBaseline" in details


def nan_params():
    p = kernel_params()
    p.components["attn.o_proj"].max_weight = float("nan")
    return p


def index_out_of_range():
    return kernel_params(index=7.0)


def unknown_component():
    return kernel_params(components=("attn.q_proj",))


def no_components():
    p = kernel_params()
    p.components.clear()
    return p


def nan_index():
    return kernel_params(index=float("nan"))


@pytest.mark.parametrize("make", [nan_params, nan_index, index_out_of_range, unknown_component, no_components])
def test_bad_params_are_invalid_argument(stub, ready, make, lm, snapshot):
    set_id, _ = ready
    assert (
        code_of(stub.EvaluateTrial, E.EvaluateTrialRequest(direction_set_id=set_id, params=make()))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    alive(stub)
    assert unchanged(lm, snapshot)


def test_params_are_required(stub, ready):
    set_id, _ = ready
    assert (
        code_of(stub.EvaluateTrial, E.EvaluateTrialRequest(direction_set_id=set_id)) == grpc.StatusCode.INVALID_ARGUMENT
    )


# ------------------------------------------------------------------- busy


def test_busy_evaluator_answers_unavailable(stub, ready, session, tmp_path):
    set_id, _ = ready
    calls = [
        lambda: stub.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params())),
        lambda: stub.Generate(E.GenerateRequest(prompt="hi")),
        lambda: stub.Chat(E.EvaluatorServiceChatRequest(messages=[common_pb2.ChatMessage(role="user", content="x")])),
        lambda: stub.ExportModel(
            E.EvaluatorServiceExportModelRequest(
                direction_set_id=set_id, params=kernel_params(), path=str(tmp_path / "busy")
            )
        ),
        lambda: stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec(max_new_tokens=3))),
    ]
    with session.lock.hold("a test"):
        for call in calls:
            code, details = details_of(call)
            assert code == grpc.StatusCode.UNAVAILABLE and "evaluator busy" in details
        # Calls that do not need the device still answer.
        alive(stub)
        assert stub.LoadDirections(E.LoadDirectionsRequest(direction_set_id=set_id)).already_loaded
    assert stub.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params())).scores.kl > 0


def test_a_running_generation_makes_trials_wait_and_cancel_frees_the_device(stub, ready, session):
    set_id, _ = ready
    stream = stub.Generate(
        E.GenerateRequest(
            prompt="tell me a long story",
            params=kernel_params(),
            options=common_pb2.GenerationOptions(max_new_tokens=400),
        )
    )
    first = next(stream)
    assert first.n_tokens >= 1
    code, details = details_of(
        stub.EvaluateTrial, E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params())
    )
    assert code == grpc.StatusCode.UNAVAILABLE and "Generate" in details
    stream.cancel()
    assert wait_until(lambda: not session.lock.locked(), timeout_s=10)
    assert stub.EvaluateTrial(E.EvaluateTrialRequest(direction_set_id=set_id, params=kernel_params())).scores.kl > 0


# ------------------------------------------------------------------- generate and chat


def test_generate_unedited_matches_the_core_and_edited_resets(stub, ready, lm, snapshot):
    set_id, _ = ready
    text, chunks = gen_text(
        stub.Generate(E.GenerateRequest(prompt="hello there", options=common_pb2.GenerationOptions(max_new_tokens=12)))
    )
    rendered = render_chat(lm.tokenizer, build_messages("hello there", lm.spec.system_prompt), "chat")
    assert text == generate_greedy(lm, [rendered], 12)[0].text
    assert text.startswith("".join(stream_greedy(lm, rendered, 12)))
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert {"ablate", "generate", "total"} <= set(last.timings_s)
    if last.finish_reason == common_pb2.FINISH_REASON_LENGTH:
        assert last.n_tokens == 12
    edited, _ = gen_text(
        stub.Generate(
            E.GenerateRequest(
                prompt="hello there",
                direction_set_id=set_id,
                params=kernel_params(weight=1.5),
                options=common_pb2.GenerationOptions(max_new_tokens=12),
            )
        )
    )
    assert isinstance(edited, str)
    assert unchanged(lm, snapshot)
    raw, _ = gen_text(
        stub.Generate(
            E.GenerateRequest(prompt="hello", raw=True, options=common_pb2.GenerationOptions(max_new_tokens=5))
        )
    )
    assert isinstance(raw, str)


def test_sampling_is_reproducible_with_a_seed(stub):
    opts = common_pb2.GenerationOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    a, _ = gen_text(stub.Generate(E.GenerateRequest(prompt="hi", options=opts)))
    b, _ = gen_text(stub.Generate(E.GenerateRequest(prompt="hi", options=opts)))
    assert a == b


@pytest.mark.parametrize(
    "req",
    [
        E.GenerateRequest(prompt=""),
        E.GenerateRequest(prompt="hi", options=common_pb2.GenerationOptions(temperature=-1)),
        E.GenerateRequest(prompt="hi", options=common_pb2.GenerationOptions(top_p=1.5)),
        E.GenerateRequest(prompt="hi", options=common_pb2.GenerationOptions(max_new_tokens=1_000_000)),
        E.GenerateRequest(prompt="hi", params=nan_params()),
    ],
    ids=["empty", "temperature", "top_p", "too-long", "nan"],
)
def test_generate_errors(stub, ready, req):
    assert code_of(stub.Generate, req) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)


def test_generate_with_unknown_directions_is_not_found(stub):
    req = E.GenerateRequest(prompt="hi", direction_set_id="12" * 32, params=kernel_params())
    assert code_of(stub.Generate, req) == grpc.StatusCode.NOT_FOUND
    alive(stub)


def test_chat(stub, ready, lm):
    set_id, _ = ready
    msgs = [
        common_pb2.ChatMessage(role="system", content="Be brief."),
        common_pb2.ChatMessage(role="user", content="hi"),
        common_pb2.ChatMessage(role="assistant", content="hello"),
        common_pb2.ChatMessage(role="user", content="how are you"),
    ]
    opts = common_pb2.GenerationOptions(max_new_tokens=8)
    text, chunks = gen_text(stub.Chat(E.EvaluatorServiceChatRequest(messages=msgs, options=opts)))
    rendered = render_chat(lm.tokenizer, [{"role": m.role, "content": m.content} for m in msgs], "chat")
    assert text == generate_greedy(lm, [rendered], 8)[0].text
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    edited, _ = gen_text(
        stub.Chat(
            E.EvaluatorServiceChatRequest(messages=msgs, options=opts, direction_set_id=set_id, params=kernel_params())
        )
    )
    assert isinstance(edited, str)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [("user", "hi"), ("assistant", "hello")],
        [("robot", "hi")],
    ],
    ids=["empty", "last-not-user", "bad-role"],
)
def test_chat_errors(stub, messages):
    req = E.EvaluatorServiceChatRequest(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages])
    assert code_of(stub.Chat, req) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)


# ------------------------------------------------------------------- export


def test_export_merged(stub, ready, lm, snapshot, blob, tmp_path):
    set_id, _ = ready
    params = kernel_params()
    out = tmp_path / "merged"
    reply = stub.ExportModel(
        E.EvaluatorServiceExportModelRequest(direction_set_id=set_id, params=params, path=str(out))
    )
    assert reply.path == str(out) and "config.json" in reply.files and "abliterate.json" in reply.files
    assert reply.bytes_written > 0 and reply.hub_url == "" and {"ablate", "save", "total"} <= set(reply.timings_s)
    assert unchanged(lm, snapshot)
    weights = load_file(out / "model.safetensors")
    refusal = DirectionSet.from_bytes(blob.safetensors).refusal
    r = global_direction(refusal, 1.5)
    name = "model.layers.1.self_attn.o_proj.weight"
    w = params.components["attn.o_proj"]
    weight = w.max_weight + (0.5 / w.min_weight_distance) * (w.min_weight - w.max_weight)  # block 1: dist 0.5
    expected = edit_matrix(snapshot[name], r, weight, 0)
    assert torch.allclose(weights[name], expected, atol=1e-5)
    meta = json.loads((out / "abliterate.json").read_text())
    assert meta["direction_set_id"] == set_id and meta["params"]["direction_index"] == 1.5
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["directions"]["id"] == set_id == hashlib.sha256((out / DIRECTIONS_FILE).read_bytes()).hexdigest()
    assert manifest["params"] == meta["params"] and manifest["model"]["source"] == lm.spec.source
    assert manifest["model"]["weights_sha256"] == weights_sha256(lm.model)  # of the unedited weights
    assert "trial" not in manifest  # no caller said anything about the trial
    # Not empty: ALREADY_EXISTS unless overwrite.
    req = E.EvaluatorServiceExportModelRequest(direction_set_id=set_id, params=params, path=str(out))
    assert code_of(stub.ExportModel, req) == grpc.StatusCode.ALREADY_EXISTS
    alive(stub)
    req.overwrite = True
    assert stub.ExportModel(req).bytes_written > 0


def test_export_lora_is_the_merged_edit(stub, ready, lm, snapshot, tmp_path):
    set_id, _ = ready
    for rownorm in (common_pb2.ROW_NORMALIZATION_NONE, common_pb2.ROW_NORMALIZATION_PRE):
        params = kernel_params(row_normalization=rownorm)
        merged_dir, lora_dir = tmp_path / f"m{rownorm}", tmp_path / f"l{rownorm}"
        stub.ExportModel(
            E.EvaluatorServiceExportModelRequest(direction_set_id=set_id, params=params, path=str(merged_dir))
        )
        reply = stub.ExportModel(
            E.EvaluatorServiceExportModelRequest(
                direction_set_id=set_id, params=params, path=str(lora_dir), format=common_pb2.EXPORT_FORMAT_LORA
            )
        )
        assert set(reply.files) == {
            "adapter_model.safetensors",
            "adapter_config.json",
            "abliterate.json",
            MANIFEST_FILE,
            PROMPTS_FILE,
            DIRECTIONS_FILE,
            "README.md",
        }
        config = json.loads((lora_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 1 and config["lora_alpha"] == 1
        assert config["base_model_name_or_path"] == lm.spec.source
        adapter = load_file(lora_dir / "adapter_model.safetensors")
        merged = load_file(merged_dir / "model.safetensors")
        assert len(config["target_modules"]) == 6  # every block's o_proj and down_proj is in the kernel
        for module in config["target_modules"]:
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            assert a.shape[0] == 1 and b.shape[1] == 1
            base = snapshot[f"{module}.weight"]
            assert torch.allclose(base + b @ a, merged[f"{module}.weight"], atol=1e-5)
    assert unchanged(lm, snapshot)
    full = E.EvaluatorServiceExportModelRequest(
        direction_set_id=set_id,
        path=str(tmp_path / "full"),
        params=kernel_params(row_normalization=common_pb2.ROW_NORMALIZATION_FULL),
        format=common_pb2.EXPORT_FORMAT_LORA,
    )
    assert code_of(stub.ExportModel, full) == grpc.StatusCode.INVALID_ARGUMENT
    alive(stub)


def test_export_errors(stub, ready, tmp_path, monkeypatch):
    set_id, _ = ready
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    hub = E.EvaluatorServiceExportModelRequest(
        direction_set_id=set_id, params=kernel_params(), path=str(tmp_path / "hub"), hub_repo="me/model"
    )
    code, details = details_of(stub.ExportModel, hub)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "HF_TOKEN" in details
    assert not (tmp_path / "hub").exists()  # refused before any work
    alive(stub)
    assert (
        code_of(
            stub.ExportModel,
            E.EvaluatorServiceExportModelRequest(direction_set_id=set_id, params=kernel_params(), path=""),
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    for caller, says in (("[1, 2]", "JSON object"), ('{"model": "mine"}', "model"), ("{not json", "not valid JSON")):
        bad = E.EvaluatorServiceExportModelRequest(
            direction_set_id=set_id, params=kernel_params(), path=str(tmp_path / "m"), manifest_json=caller
        )
        code, details = details_of(stub.ExportModel, bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details
        assert not (tmp_path / "m").exists()
    assert (
        code_of(
            stub.ExportModel, E.EvaluatorServiceExportModelRequest(direction_set_id=set_id, path=str(tmp_path / "x"))
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            stub.ExportModel,
            E.EvaluatorServiceExportModelRequest(
                direction_set_id="99" * 32, params=kernel_params(), path=str(tmp_path / "y")
            ),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    alive(stub)


def test_lora_export_of_fused_experts_is_refused(tmp_path):
    from abliterate.errors import FailedPrecondition

    moe = make_lm("qwen3_moe", layers=3, hidden=32)
    session = EvaluatorSession(moe)
    r = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    data = DirectionSet(refusal=r, good_mean=torch.randn(4, 32), bad_mean=torch.randn(4, 32)).to_bytes()
    set_id = session.load_directions(data).direction_set_id
    from abliterate.rpc.convert import params_from_pb

    params = params_from_pb(kernel_params(index=0.5, components=("mlp.down_proj",)))
    with pytest.raises(FailedPrecondition, match="MERGED"):
        session.export(str(tmp_path / "moe"), set_id, params, fmt="lora")
    assert not session.lock.locked() and not (tmp_path / "moe").exists()


def test_session_serves_one_operation_at_a_time(lm, blob):
    """Two threads racing for the device: exactly one runs, the other is told busy."""
    from abliterate.errors import Unavailable
    from abliterate.rpc.convert import params_from_pb

    session = EvaluatorSession(lm, batch_size=4)
    set_id = session.load_directions(blob.safetensors).direction_set_id
    spec = baseline_spec()
    session.prepare_baseline(spec)
    params = params_from_pb(kernel_params())
    results, gate = [], threading.Barrier(2)

    def trial():
        gate.wait()
        try:
            results.append(session.evaluate(set_id, params).kl)
        except Unavailable:
            results.append("busy")

    with session.lock.hold("held so both collide"):
        threads = [threading.Thread(target=trial) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == ["busy", "busy"]
    assert session.evaluate(set_id, params).kl > 0


@pytest.mark.parametrize(
    "key, bad_tensor",
    [
        ("diagnostics", lambda t: torch.zeros(2, 3, 4)),  # wrong rank: once an INTERNAL unpacking error
        ("diagnostics", lambda t: torch.zeros(t["refusal"].shape[0], 3)),  # 3 numbers a row, not 4
        ("good_mean", lambda t: t["good_mean"][:-1]),  # one row short of the refusal directions
    ],
)
def test_load_directions_with_misshapen_tensors_is_invalid_argument(stub, blob, key, bad_tensor):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load(blob.safetensors)
    tensors[key] = bad_tensor(tensors).contiguous()
    bad = common_pb2.TensorBlob(safetensors=st_save(tensors))
    code, details = details_of(stub.LoadDirections, E.LoadDirectionsRequest(directions=bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and key in details
    alive(stub)


@pytest.mark.parametrize("field", ["row_normalization", "direction_scope"])
def test_unknown_enum_values_are_refused_not_defaulted(stub, field):
    """Proto3 keeps an unknown enum number as sent; it used to be read silently as the default."""
    params = kernel_params()
    setattr(params, field, 999)
    code, details = details_of(stub.EvaluateTrial, E.EvaluateTrialRequest(params=params))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details and "999" in details
    alive(stub)


def test_model_spec_load_fields_are_honoured_or_refused(stub, lm):
    """dtype, device_map, load_in_4bit, trust_remote_code: matching what is loaded (or left at
    "auto"/empty) is served; anything else is FAILED_PRECONDITION naming the field, never ignored."""
    loaded_dtype = str(lm.dtype).removeprefix("torch.")
    other_dtype = "bfloat16" if loaded_dtype != "bfloat16" else "float16"
    for matching in (
        common_pb2.ModelSpec(source=lm.spec.source, dtype=loaded_dtype),
        common_pb2.ModelSpec(source=lm.spec.source + "/"),  # another spelling of the same source
    ):
        spec = baseline_spec(max_new_tokens=2)
        spec.model.CopyFrom(matching)
        assert stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=spec)).n_kl_prompts == 4
    for field, differing in (
        ("dtype", common_pb2.ModelSpec(source=lm.spec.source, dtype=other_dtype)),
        ("device_map", common_pb2.ModelSpec(source=lm.spec.source, device_map="balanced")),
        ("load_in_4bit", common_pb2.ModelSpec(source=lm.spec.source, load_in_4bit=True)),
        ("trust_remote_code", common_pb2.ModelSpec(source=lm.spec.source, trust_remote_code=True)),
    ):
        spec = baseline_spec()
        spec.model.CopyFrom(differing)
        code, details = details_of(stub.PrepareBaseline, E.PrepareBaselineRequest(baseline=spec))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and field in details, (field, details)
        alive(stub)


def test_canonical_source_spellings(tmp_path):
    from abliterate.specs import ModelSpec, canonical_source

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "link").symlink_to(model_dir)
    spellings = {str(model_dir), f"{model_dir}/", f"{tmp_path}/./model", str(tmp_path / "link")}
    assert {canonical_source(s) for s in spellings} == {str(model_dir.resolve())}
    assert canonical_source("org/name/") == canonical_source("org/name") == "org/name"
    assert canonical_source("org/a") != canonical_source("org/b")
    assert ModelSpec("org/name/").load_mismatch(ModelSpec("org/name")) is None
    assert "org/other" in ModelSpec("org/other").load_mismatch(ModelSpec("org/name"))


def test_token_caps_are_settings_and_refused_with_their_name(lm, blob):
    servicer = EvaluatorServicer(lm, batch_size=4, max_prompt_tokens=64, max_scoring_tokens=8, max_kl_tokens=2)
    with serve([(ADD, servicer)]) as capped:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(capped.channel)
        long_prompt = "word " * 200  # well over 64 tokens, under 64 * 32 characters: it is tokenized
        huge_prompt = "A" * 1_000_000  # refused by its length alone
        for prompt in (long_prompt, huge_prompt):
            code, details = details_of(lambda p=prompt: list(stub.Generate(E.GenerateRequest(prompt=p))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens" in details
            assert len(details) < 300
        message = common_pb2.ChatMessage(role="user", content=long_prompt)
        code, details = details_of(lambda: list(stub.Chat(E.EvaluatorServiceChatRequest(messages=[message]))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens" in details
        for spec, setting in (
            (baseline_spec(max_new_tokens=9), "max_scoring_tokens"),
            (
                common_pb2.BaselineSpec(kl_prompts=prompts(GOOD), refusal_prompts=prompts(BAD), kl_tokens=3),
                "max_kl_tokens",
            ),
            (
                common_pb2.BaselineSpec(kl_prompts=prompts([long_prompt]), refusal_prompts=prompts(BAD)),
                "max_prompt_tokens",
            ),
        ):
            code, details = details_of(lambda s=spec: stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=s)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and setting in details, details
        # At the caps everything still works.
        assert stub.PrepareBaseline(E.PrepareBaselineRequest(baseline=baseline_spec(max_new_tokens=8))).baseline_id
        _, chunks = gen_text(
            stub.Generate(E.GenerateRequest(prompt="Say hi.", options=common_pb2.GenerationOptions(max_new_tokens=3)))
        )
        # The stream ran to its end (the tiny random model may stop at once: no token count is promised).
        assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        assert max(c.n_tokens for c in chunks) <= 3

"""Warm-start profiles: the family comes from the config's model_type, the points scale with depth and
lie in the default search space, and the gateway enqueues them only when asked."""

from __future__ import annotations

import pytest

from abliterate import cli
from abliterate.errors import InvalidArgument
from abliterate.params import DirectionScope
from abliterate.warm_start import PROFILES, family_of, resolve_profile, starting_params


def test_the_family_is_read_from_the_config_not_the_name():
    assert family_of("llama") == family_of("LLaMA") == "llama"
    assert family_of("qwen3_moe") == family_of("mixtral") == family_of("gpt_oss") == "moe"
    assert family_of("gemma3_text") == "gemma" and family_of("some_new_arch") == "generic"
    assert resolve_profile("auto", "qwen2") == "qwen"
    assert resolve_profile("gemma", "qwen2") == "gemma"  # forced
    assert resolve_profile("", "qwen2") is None and resolve_profile("none", "llama") is None
    with pytest.raises(InvalidArgument, match="warm_start_profile"):
        resolve_profile("bogus", "llama")


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("n_layers", [2, 30, 80])
def test_every_starting_point_is_valid_and_inside_the_default_search_space(profile, n_layers):
    from abliterate_services.optimizer.search_space import SearchSpace

    space = SearchSpace.from_pb(None, n_layers)
    components = ["attn.o_proj", "mlp.down_proj"]
    for params in starting_params(profile, n_layers, components):
        params.validate(n_layers, components)
        values = space.to_optuna_params(params)
        assert space.params_from_optuna(values).components.keys() == params.components.keys()
        if params.direction_scope == DirectionScope.GLOBAL:
            low, high = space.index_bounds()
            assert low <= params.direction_index <= high
        for name, kernel in params.components.items():
            comp = space.components[name]
            assert comp.max_weight.low <= kernel.max_weight <= comp.max_weight.high
            low, high = space.position_bounds(comp)
            assert low - 1e-9 <= kernel.max_weight_position <= high + 1e-9


def test_only_the_searched_components_are_started():
    params = starting_params("llama", 30, ["attn.o_proj"])
    assert all(list(p.components) == ["attn.o_proj"] for p in params)


def test_the_flag_reaches_the_spec_and_the_gateway_refuses_an_unknown_profile():
    from abliterate_services.gateway.orchestrator import validate_spec

    parse = cli.build_parser().parse_args
    assert cli.build_spec(parse(["run", "m", "--warm-start", "auto"])).options.warm_start_profile == "auto"
    assert cli.build_spec(parse(["run", "m"])).options.warm_start_profile == ""  # cold by default
    spec = cli.build_spec(parse(["run", "m"]))
    spec.options.warm_start_profile = "bogus"  # a gRPC client can send anything
    with pytest.raises(InvalidArgument, match="warm_start_profile"):
        validate_spec(spec)


def test_the_profile_keeps_to_the_scopes_and_components_the_search_space_allows():
    from abliterate.v1 import common_pb2, gateway_pb2, optimizer_pb2
    from abliterate_services.gateway.jobs import JobRecord
    from abliterate_services.gateway.orchestrator import _profile_warm_start
    from abliterate_services.optimizer.search_space import SearchSpace

    spec = gateway_pb2.JobSpec(options=gateway_pb2.JobOptions(warm_start_profile="auto"))
    spec.options.search_space.direction_scopes.append(common_pb2.DIRECTION_SCOPE_GLOBAL)
    spec.options.search_space.components["attn.o_proj"].CopyFrom(optimizer_pb2.ComponentSearchSpace())
    model = common_pb2.ModelInfo(model_type="llama", n_layers=30, components=["attn.o_proj", "mlp.down_proj"])
    starts = _profile_warm_start(JobRecord(id="j", name="j", spec=spec, phase=0, model=model))
    assert starts and len(starts) < len(PROFILES["llama"])  # the per-layer point is left out
    assert all(s.direction_scope == common_pb2.DIRECTION_SCOPE_GLOBAL for s in starts)
    assert all(list(s.components) == ["attn.o_proj"] for s in starts)
    assert _profile_warm_start(JobRecord(id="j", name="j", spec=gateway_pb2.JobSpec(), phase=0, model=model)) == []
    # A study told a trial of a scope it cannot sample refuses it up front (CreateStudy), not mid-run.
    only_global = SearchSpace.from_pb(spec.options.search_space, 30)
    per_layer = next(p for p in starting_params("llama", 30, ["attn.o_proj"]) if p.direction_index is None)
    with pytest.raises(InvalidArgument, match="direction_scope 'per_layer'"):
        only_global.to_optuna_params(per_layer)

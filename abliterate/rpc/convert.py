"""Conversions between protobuf messages and the plain dataclasses of the core.

Torch-free: used by every service. Proto3 "unset" values (empty string, 0,
UNSPECIFIED) map to the dataclass defaults.
"""

from __future__ import annotations

import json
import math

from abliterate.errors import InvalidArgument
from abliterate.judge_spec import JudgeSpec
from abliterate.params import (
    DEFAULT_CALIBRATION_MAX_FACTOR,
    DEFAULT_CALIBRATION_MIN_FACTOR,
    DEFAULT_CALIBRATION_PERCENTILE,
    AblationParams,
    ComponentParams,
    DirectionScope,
    RowNormalization,
    check_calibration,
)
from abliterate.specs import ModelSpec
from abliterate.v1 import common_pb2 as pb

_SCOPE_TO_PB = {
    DirectionScope.GLOBAL: pb.DIRECTION_SCOPE_GLOBAL,
    DirectionScope.PER_LAYER: pb.DIRECTION_SCOPE_PER_LAYER,
}
_SCOPE_FROM_PB = {v: k for k, v in _SCOPE_TO_PB.items()}
_SCOPE_FROM_PB[pb.DIRECTION_SCOPE_UNSPECIFIED] = DirectionScope.GLOBAL
_ROWNORM_TO_PB = {
    RowNormalization.NONE: pb.ROW_NORMALIZATION_NONE,
    RowNormalization.PRE: pb.ROW_NORMALIZATION_PRE,
    RowNormalization.FULL: pb.ROW_NORMALIZATION_FULL,
    RowNormalization.COLUMN: pb.ROW_NORMALIZATION_COLUMN,
}
_ROWNORM_FROM_PB = {v: k for k, v in _ROWNORM_TO_PB.items()}
_ROWNORM_FROM_PB[pb.ROW_NORMALIZATION_UNSPECIFIED] = RowNormalization.NONE


def params_to_pb(params: AblationParams) -> pb.AblationParams:
    msg = pb.AblationParams(
        direction_scope=_SCOPE_TO_PB[params.direction_scope], row_normalization=_ROWNORM_TO_PB[params.row_normalization]
    )
    if params.direction_index is not None:
        msg.direction_index = float(params.direction_index)
    for name, c in params.components.items():
        msg.components[name].CopyFrom(
            pb.ComponentKernel(
                max_weight=c.max_weight,
                max_weight_position=c.max_weight_position,
                min_weight=c.min_weight,
                min_weight_distance=c.min_weight_distance,
            )
        )
    msg.subspace_weights.extend(params.subspace_weights)
    if params.adds_compliance:
        msg.compliance_addition.CopyFrom(
            pb.ComplianceAddition(strength=params.compliance_strength, layer=params.compliance_layer)
        )
    if params.ablates_heads:
        msg.head_ablation.CopyFrom(pb.HeadAblation(top_heads=params.head_count, weight=params.head_weight))
    return msg


def enum_from_pb(table: dict, value: int, field: str):
    """``table[value]``; a number no entry has (proto3 keeps unknown enum numbers as they are sent)
    is refused rather than silently read as the default."""
    try:
        return table[value]
    except KeyError:
        known = ", ".join(str(number) for number in sorted(table))
        raise InvalidArgument(f"{field}: unknown value {value} (known: {known})") from None


def params_from_pb(msg: pb.AblationParams) -> AblationParams:
    return AblationParams(
        direction_scope=enum_from_pb(_SCOPE_FROM_PB, msg.direction_scope, "direction_scope"),
        direction_index=msg.direction_index if msg.HasField("direction_index") else None,
        row_normalization=enum_from_pb(_ROWNORM_FROM_PB, msg.row_normalization, "row_normalization"),
        components={
            name: ComponentParams(k.max_weight, k.max_weight_position, k.min_weight, k.min_weight_distance)
            for name, k in msg.components.items()
        },
        subspace_weights=tuple(msg.subspace_weights),
        compliance_strength=msg.compliance_addition.strength,
        compliance_layer=msg.compliance_addition.layer,
        head_count=msg.head_ablation.top_heads,
        head_weight=msg.head_ablation.weight,
    )


def model_spec_to_pb(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        source=spec.source,
        gguf_file=spec.gguf_file or "",
        dtype=spec.dtype,
        device_map=spec.device_map or "",
        load_in_4bit=spec.load_in_4bit,
        trust_remote_code=spec.trust_remote_code,
        system_prompt=spec.system_prompt,
        chat_template_mode=spec.chat_template_mode,
    )


def model_spec_from_pb(msg: pb.ModelSpec) -> ModelSpec:
    default = ModelSpec(source=msg.source or "")
    return ModelSpec(
        source=msg.source,
        gguf_file=msg.gguf_file or None,
        dtype=msg.dtype or default.dtype,
        device_map=msg.device_map or None,
        load_in_4bit=msg.load_in_4bit,
        trust_remote_code=msg.trust_remote_code,
        system_prompt=msg.system_prompt or default.system_prompt,
        chat_template_mode=msg.chat_template_mode or default.chat_template_mode,
    )


def prompt_set_from_pb(msg: pb.PromptSetSpec):
    """A PromptSetSpec dataclass, or the inline list of prompts when the message carries them.

    The one check of a prompt set's shape (the CLI, the gateway and the extractor all call it):
    inline prompts exclude the source fields and are not all blank; otherwise ``PromptSetSpec``
    checks the source, split syntax, column and limit. InvalidArgument names the problem.
    """
    from abliterate.core.prompts import PromptSetSpec  # torch-free

    if list(msg.prompts):
        if not any(prompt.strip() for prompt in msg.prompts):
            raise InvalidArgument("every inline prompt is blank")
        if msg.source or msg.split or msg.column or msg.config or msg.streaming:
            raise InvalidArgument("inline prompts exclude source/split/column/config/streaming")
        return list(msg.prompts)
    if not msg.source.strip():
        raise InvalidArgument("the prompt set is empty (give a source or inline prompts)")
    return PromptSetSpec(
        source=msg.source,
        split=msg.split or None,
        column=msg.column or None,
        config=msg.config or None,
        streaming=msg.streaming,
        limit=msg.limit or None,
    )


def prompt_set_to_pb(spec) -> pb.PromptSetSpec:
    if isinstance(spec, (list, tuple)):
        return pb.PromptSetSpec(prompts=list(spec))
    return pb.PromptSetSpec(
        source=spec.source,
        split=spec.split or "",
        column=spec.column or "",
        config=spec.config or "",
        streaming=spec.streaming,
        limit=spec.limit or 0,
    )


def load_prompt_set(msg: pb.PromptSetSpec, what: str, *, file_root: str | None = None) -> list[str]:
    """Resolve a prompt-set message to its prompts (inline, or loaded from its source).

    ``file_root`` is where files may be read (``load_prompts``): None any, "" none, else under it.
    """
    from abliterate.core.prompts import load_prompts
    from abliterate.errors import InvalidArgument

    spec = prompt_set_from_pb(msg)
    if isinstance(spec, list):
        prompts = [p.strip() for p in spec if p.strip()]
        if not prompts:
            raise InvalidArgument(f"the {what} prompt set is empty")
        return prompts
    if not msg.source:
        raise InvalidArgument(f"the {what} prompt set has neither a source nor inline prompts")
    return load_prompts(spec, file_root=file_root)


def parse_json_object(text: str, field: str) -> dict:
    """A request's JSON-object string field (empty text = {}); INVALID_ARGUMENT naming ``field`` otherwise."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        # json's decoder recurses once per level: thousands of nested brackets exhaust the stack.
        raise InvalidArgument(f"{field} is nested too deeply") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def judge_spec_from_pb(message: pb.RefusalJudge | None) -> JudgeSpec:
    """The judge a BaselineSpec names (unset: markers); INVALID_ARGUMENT for an unknown kind."""
    if message is None:
        return JudgeSpec()
    return JudgeSpec(
        kind=message.kind or "markers",
        threshold=message.threshold if message.HasField("threshold") else None,
        model=message.model,
        endpoint=message.endpoint,
        api_key_env=message.api_key_env,
        timeout_s=message.timeout_s or None,
    ).validate()


# A subspace of more directions than this removes more than the refusal behaviour and costs a
# (L+1, N, d) SVD; 16 is far past where the measured energy shares flatten out (docs/methods.md).
MAX_SUBSPACE_DIRECTIONS = 16
# Tokens per labelling reply: refusals show in the first sentence; longer replies only cost time.
MAX_LABEL_TOKENS = 512


def check_direction_method(options: pb.ExtractionOptions, prefix: str = "options") -> None:
    """INVALID_ARGUMENT for direction-method options that do not go together (gateway and extractor),
    with a message that names the conflict."""
    method = options.direction_method
    if method not in pb.DirectionMethod.values():
        raise InvalidArgument(f"{prefix}.direction_method: unknown value {method}")
    if method == pb.DIRECTION_METHOD_SUBSPACE:
        if options.n_directions == 1 or options.n_directions > MAX_SUBSPACE_DIRECTIONS:
            raise InvalidArgument(
                f"{prefix}.n_directions must be 0 (= 2) or in [2, {MAX_SUBSPACE_DIRECTIONS}] for the subspace "
                f"method, got {options.n_directions}"
            )
    elif method == pb.DIRECTION_METHOD_CONES:
        if options.n_directions == 1 or options.n_directions > MAX_SUBSPACE_DIRECTIONS:
            raise InvalidArgument(
                f"{prefix}.n_directions (cones) must be 0 (= 3) or in [2, {MAX_SUBSPACE_DIRECTIONS}], "
                f"got {options.n_directions}"
            )
    elif options.n_directions:
        raise InvalidArgument(
            f"{prefix}.n_directions ({options.n_directions}) needs direction_method DIRECTION_METHOD_SUBSPACE or "
            f"DIRECTION_METHOD_CONES; {pb.DirectionMethod.Name(method)} gives one direction"
        )
    if options.HasField("cone_layer") and method != pb.DIRECTION_METHOD_CONES:
        raise InvalidArgument(f"{prefix}.cone_layer needs direction_method DIRECTION_METHOD_CONES")
    if options.HasField("probe_weight"):
        if method != pb.DIRECTION_METHOD_PROBE:
            raise InvalidArgument(f"{prefix}.probe_weight needs direction_method DIRECTION_METHOD_PROBE")
        if not (0 <= options.probe_weight <= 1 and math.isfinite(options.probe_weight)):
            raise InvalidArgument(f"{prefix}.probe_weight must be in [0, 1], got {options.probe_weight}")
    if options.label_max_new_tokens and not (method == pb.DIRECTION_METHOD_PROBE or options.compliance):
        raise InvalidArgument(
            f"{prefix}.label_max_new_tokens labels replies for DIRECTION_METHOD_PROBE or compliance; neither is asked"
        )
    if options.label_max_new_tokens > MAX_LABEL_TOKENS:
        raise InvalidArgument(
            f"{prefix}.label_max_new_tokens must be at most {MAX_LABEL_TOKENS}, got {options.label_max_new_tokens}"
        )
    if options.HasField("helpful") != options.HasField("unhelpful"):
        given, missing = ("helpful", "unhelpful") if options.HasField("helpful") else ("unhelpful", "helpful")
        raise InvalidArgument(f"{prefix}.{given} needs {prefix}.{missing}: the helpfulness direction contrasts the two")
    calibration = options.calibration
    if (
        options.HasField("calibration")
        and not calibration.enabled
        and (calibration.percentile or calibration.min_factor or calibration.max_factor)
    ):
        raise InvalidArgument(f"{prefix}.calibration sets values but not enabled")
    if calibration.enabled:
        check_calibration(
            calibration.percentile or DEFAULT_CALIBRATION_PERCENTILE,
            calibration.min_factor or DEFAULT_CALIBRATION_MIN_FACTOR,
            calibration.max_factor or DEFAULT_CALIBRATION_MAX_FACTOR,
            f"{prefix}.calibration",
        )

"""Warm-start profiles: per model family, trials the study tries before it samples (no torch).

The family is read from the model's config (``ModelInfo.model_type``, e.g. ``llama``,
``qwen3_moe``), never from its name: a fine-tune called "my-assistant" is still a Llama. Each
profile lists starting points as fractions of the depth (direction index and kernel peak at a
fraction of ``L - 1``, the distance a fraction of ``L - 1``), inside the default search space, so
one profile serves every size of a family. A job's explicit ``warm_start`` parameters replace the
profile; ``warm_start_profile = "auto"`` picks the family's profile, a family name forces one, and
"" or "none" (the default) starts cold.

Where the points come from: the ``llama`` profile is measured on SmolLM2-135M-Instruct (a mid-depth
global direction at kernel weight ~0.8-1 removes most refusals at KL well under 1; docs/methods.md
"Warm start"); the other families start from the same region shifted as heretic's published runs
on those families suggest (refusal directions peak later in Qwen and Gemma models), unmeasured here
and marked so in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from abliterate.errors import InvalidArgument
from abliterate.params import AblationParams, ComponentParams, DirectionScope

ATTN = "attn.o_proj"
MLP = "mlp.down_proj"


@dataclass(frozen=True)
class StartingPoint:
    """One starting trial in depth fractions: (max_weight, peak position, min weight as a fraction of
    the max, distance) per component; ``direction_index`` for a global direction, None per layer."""

    direction_index: float | None
    attention: tuple[float, float, float, float]
    mlp: tuple[float, float, float, float]


PROFILES: dict[str, tuple[StartingPoint, ...]] = {
    "llama": (
        StartingPoint(0.52, (1.0, 0.6, 0.6, 0.6), (0.6, 0.6, 0.6, 0.6)),
        StartingPoint(0.6, (0.8, 0.65, 0.3, 0.4), (0.3, 0.65, 0.3, 0.4)),
        StartingPoint(None, (0.9, 0.6, 0.5, 0.5), (0.4, 0.6, 0.5, 0.5)),
    ),
    "mistral": (
        StartingPoint(0.55, (1.0, 0.6, 0.5, 0.5), (0.5, 0.6, 0.5, 0.5)),
        StartingPoint(None, (0.9, 0.65, 0.4, 0.4), (0.3, 0.65, 0.4, 0.4)),
    ),
    "qwen": (
        StartingPoint(0.65, (1.0, 0.7, 0.5, 0.5), (0.6, 0.7, 0.5, 0.5)),
        StartingPoint(None, (0.9, 0.75, 0.4, 0.4), (0.4, 0.75, 0.4, 0.4)),
    ),
    "gemma": (
        StartingPoint(0.65, (1.0, 0.7, 0.5, 0.5), (0.5, 0.7, 0.5, 0.5)),
        StartingPoint(None, (0.9, 0.7, 0.4, 0.4), (0.3, 0.7, 0.4, 0.4)),
    ),
    "phi": (
        StartingPoint(0.6, (1.0, 0.65, 0.5, 0.5), (0.5, 0.65, 0.5, 0.5)),
        StartingPoint(None, (0.9, 0.65, 0.4, 0.4), (0.3, 0.65, 0.4, 0.4)),
    ),
    # Mixture-of-experts: the MLP edit reaches every expert; start lighter on it.
    "moe": (
        StartingPoint(0.6, (1.0, 0.65, 0.5, 0.5), (0.3, 0.65, 0.5, 0.5)),
        StartingPoint(None, (0.9, 0.7, 0.4, 0.4), (0.2, 0.7, 0.4, 0.4)),
    ),
    "generic": (StartingPoint(0.6, (1.0, 0.65, 0.5, 0.5), (0.5, 0.65, 0.5, 0.5)),),
}

# config.model_type -> family.
FAMILIES = {
    **dict.fromkeys(("llama", "granite", "olmo", "olmo2", "smollm3", "cohere"), "llama"),
    **dict.fromkeys(("mistral", "ministral"), "mistral"),
    **dict.fromkeys(("qwen2", "qwen3"), "qwen"),
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text"), "gemma"),
    **dict.fromkeys(("phi", "phi3"), "phi"),
    **dict.fromkeys(
        ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3", "granitemoe", "olmoe"), "moe"
    ),
}
CHOICES = ("", "auto", "none", *PROFILES)


def family_of(model_type: str) -> str:
    """The family of a config's ``model_type``; ``generic`` for one without a profile of its own."""
    return FAMILIES.get(model_type.lower(), "generic")


def check_profile(profile: str, what: str = "options.warm_start_profile") -> None:
    if profile not in CHOICES:
        raise InvalidArgument(f"{what} must be one of {sorted(c for c in CHOICES if c)} (or empty), got {profile!r}")


def resolve_profile(profile: str, model_type: str) -> str | None:
    """The profile a job uses: None for a cold start."""
    check_profile(profile)
    if profile in ("", "none"):
        return None
    if profile == "auto":
        return family_of(model_type)
    return profile


def starting_params(profile: str, n_layers: int, components: list[str]) -> list[AblationParams]:
    """The profile's starting trials for a model of ``n_layers`` blocks editing ``components``."""
    span = max(1, n_layers - 1)
    trials = []
    for point in PROFILES[profile]:
        kernels = {}
        for name, (max_weight, position, min_fraction, distance) in ((ATTN, point.attention), (MLP, point.mlp)):
            if name not in components:
                continue
            kernels[name] = ComponentParams(
                max_weight=max_weight,
                max_weight_position=position * span,
                min_weight=min_fraction * max_weight,
                min_weight_distance=max(1.0, distance * span),
            )
        global_scope = point.direction_index is not None
        trials.append(
            AblationParams(
                direction_scope=DirectionScope.GLOBAL if global_scope else DirectionScope.PER_LAYER,
                direction_index=point.direction_index * span if global_scope else None,
                components=kernels,
            )
        )
    return trials

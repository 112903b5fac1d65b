"""Ablation parameters and the layer kernel: plain Python, no torch.

Shared by the evaluator (which applies them) and the optimizer (which samples
them), so it must stay importable without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum

from abliterate.errors import InvalidArgument


class DirectionScope(str, Enum):
    GLOBAL = "global"
    PER_LAYER = "per_layer"


# How winsorization pools its quantile (core/directions.winsorize); the first is the default.
WINSORIZE_SCOPES = ("per_prompt", "per_layer")


class RowNormalization(str, Enum):
    """How an edit treats the norms of W (see ``core/ablation.py`` for what each guarantees).

    ``none``: plain projection, removes ``r`` exactly at weight 1. ``pre`` and
    ``full`` (grimjim's): computed on row-normalized W; ``full`` keeps every
    row norm exactly but neither removes ``r`` exactly. ``column``: plain
    projection, then every input column rescaled to its original norm; keeps
    column norms exactly and removes ``r`` exactly at weight 1.
    """

    NONE = "none"
    PRE = "pre"
    FULL = "full"
    COLUMN = "column"


@dataclass(frozen=True)
class ComponentParams:
    """Kernel of edit strength over the layers for one component.

    For block ``l``: ``dist = |l - max_weight_position|``; the block is skipped
    when ``dist > min_weight_distance``, else
    ``w = max_weight + (dist / min_weight_distance) * (min_weight - max_weight)``.
    """

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight_at(self, layer: int) -> float:
        dist = abs(layer - self.max_weight_position)
        if dist > self.min_weight_distance:
            return 0.0
        return self.max_weight + (dist / self.min_weight_distance) * (self.min_weight - self.max_weight)

    def validate(self, name: str, n_layers: int) -> None:
        for key, value in asdict(self).items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgument(f"{name}.{key} must be a finite number, got {value!r}")
        if self.min_weight_distance <= 0:
            raise InvalidArgument(f"{name}.min_weight_distance must be > 0, got {self.min_weight_distance}")
        if not -0.0 <= self.max_weight_position <= n_layers - 1 + 1e-9:
            raise InvalidArgument(
                f"{name}.max_weight_position {self.max_weight_position} is outside [0, {n_layers - 1}]"
            )
        for key in ("max_weight", "min_weight"):
            value = getattr(self, key)
            # A negative weight would be skipped (the edit only removes): reject it rather than do nothing.
            # The search space clamps its MLP range at 0 before it builds parameters.
            if not 0 <= value <= 10:
                raise InvalidArgument(f"{name}.{key} {value} is outside [0, 10]")


# Activation calibration (abliterate.core.calibration): quantile of the harmful projections onto r over
# their mean, clamped.
DEFAULT_CALIBRATION_PERCENTILE = 0.75
DEFAULT_CALIBRATION_MIN_FACTOR = 0.5
DEFAULT_CALIBRATION_MAX_FACTOR = 2.0


def check_calibration(percentile: float, min_factor: float, max_factor: float, what: str = "calibration") -> None:
    if not (0 < percentile < 1 and math.isfinite(percentile)):
        raise InvalidArgument(f"{what}.percentile must be in (0, 1), got {percentile}")
    if not (0 < min_factor <= 1 and math.isfinite(min_factor)):
        raise InvalidArgument(f"{what}.min_factor must be in (0, 1], got {min_factor}")
    if not (1 <= max_factor and math.isfinite(max_factor)):
        raise InvalidArgument(f"{what}.max_factor must be a number >= 1, got {max_factor}")


# Multiples of the compliance vector (mean complied minus mean refused residual) CAA may add: at 1 the
# refused prompts' mean moves to the complied ones' at that residual; past a few it swamps the stream.
MAX_COMPLIANCE_STRENGTH = 4.0


@dataclass(frozen=True)
class AblationParams:
    """One trial's parameters.

    ``direction_index`` is a float layer index into the residual directions used
    when ``direction_scope`` is global (index 0 = embeddings is never chosen:
    block ``i`` output is residual ``i + 1``). ``components`` maps a component
    name (``attn.o_proj``, ``mlp.down_proj``) to its kernel; a component that is
    absent is not edited.
    """

    direction_scope: DirectionScope = DirectionScope.GLOBAL
    direction_index: float | None = None
    components: dict[str, ComponentParams] = field(default_factory=dict)
    row_normalization: RowNormalization = RowNormalization.NONE
    # Relative weights of a subspace's directions after the first (whose weight is the kernel's): the
    # edit removes sum_j w * s_j u_j u_j^T jointly. Empty: the first direction alone.
    subspace_weights: tuple[float, ...] = ()
    # CAA: block ``compliance_layer``'s attention out-projection gets the output bias
    # ``compliance_strength * c[compliance_layer + 1]`` (c: the set's compliance vectors); 0 = none.
    compliance_strength: float = 0.0
    compliance_layer: int = 0
    # Head ablation: r projected out of the column blocks of the ``head_count`` attention heads of
    # highest refusal attribution (the set's head scores), at ``head_weight``; 0 heads = none.
    head_count: int = 0
    head_weight: float = 0.0

    @property
    def adds_compliance(self) -> bool:
        return self.compliance_strength > 0

    @property
    def ablates_heads(self) -> bool:
        return self.head_count > 0 and self.head_weight > 0

    def validate(self, n_layers: int, known_components: list[str] | None = None) -> None:
        if self.direction_scope == DirectionScope.GLOBAL:
            if self.direction_index is None:
                raise InvalidArgument("direction_index is required when direction_scope is global")
            if not isinstance(self.direction_index, (int, float)) or not math.isfinite(self.direction_index):
                raise InvalidArgument(f"direction_index must be a finite number, got {self.direction_index!r}")
            if not 0 <= self.direction_index <= n_layers - 1:
                raise InvalidArgument(f"direction_index {self.direction_index} is outside [0, {n_layers - 1}]")
        if not self.components and not self.adds_compliance and not self.ablates_heads:
            raise InvalidArgument("no component parameters given: nothing would be edited")
        for key, low, high in (("compliance_strength", 0, MAX_COMPLIANCE_STRENGTH), ("head_weight", 0, 1.5)):
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not low <= value <= high:
                raise InvalidArgument(f"{key} must be a number in [{low}, {high}], got {value!r}")
        if isinstance(self.compliance_layer, bool) or not isinstance(self.compliance_layer, int):
            raise InvalidArgument(f"compliance_layer must be an integer, got {self.compliance_layer!r}")
        if not 0 <= self.compliance_layer < n_layers:
            raise InvalidArgument(f"compliance_layer {self.compliance_layer!r} is outside [0, {n_layers - 1}]")
        if isinstance(self.head_count, bool) or not isinstance(self.head_count, int) or self.head_count < 0:
            raise InvalidArgument(f"head_count must be an integer >= 0, got {self.head_count!r}")
        for index, value in enumerate(self.subspace_weights):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
                raise InvalidArgument(f"subspace_weights[{index}] must be a number in [0, 1], got {value!r}")
        for name, comp in self.components.items():
            if known_components is not None and name not in known_components:
                raise InvalidArgument(f"unknown component {name!r}; this model has {sorted(known_components)}")
            comp.validate(name, n_layers)

    def layer_weights(self, component: str, n_layers: int) -> list[float]:
        comp = self.components.get(component)
        if comp is None:
            return [0.0] * n_layers
        return [comp.weight_at(layer) for layer in range(n_layers)]

    def to_dict(self) -> dict:
        return {
            "direction_scope": self.direction_scope.value,
            "direction_index": self.direction_index,
            "row_normalization": self.row_normalization.value,
            "components": {name: asdict(c) for name, c in self.components.items()},
            **({"subspace_weights": list(self.subspace_weights)} if self.subspace_weights else {}),
            **(
                {"compliance_strength": self.compliance_strength, "compliance_layer": self.compliance_layer}
                if self.adds_compliance
                else {}
            ),
            **({"head_count": self.head_count, "head_weight": self.head_weight} if self.ablates_heads else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "AblationParams":
        try:
            return cls(
                direction_scope=DirectionScope(data.get("direction_scope", "global")),
                direction_index=data.get("direction_index"),
                row_normalization=RowNormalization(data.get("row_normalization", "none")),
                components={name: ComponentParams(**c) for name, c in data.get("components", {}).items()},
                subspace_weights=tuple(float(value) for value in data.get("subspace_weights", ())),
                compliance_strength=float(data.get("compliance_strength", 0.0)),
                compliance_layer=int(data.get("compliance_layer", 0)),
                head_count=int(data.get("head_count", 0)),
                head_weight=float(data.get("head_weight", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad ablation parameters: {exc}") from exc

    @classmethod
    def uniform(
        cls,
        direction_index: float,
        n_layers: int,
        weight: float = 1.0,
        components: tuple[str, ...] = ("attn.o_proj", "mlp.down_proj"),
        row_normalization: RowNormalization = RowNormalization.NONE,
    ) -> "AblationParams":
        """Every layer of every named component edited at the same weight."""
        flat = ComponentParams(
            max_weight=weight,
            max_weight_position=(n_layers - 1) / 2,
            min_weight=weight,
            min_weight_distance=float(n_layers),
        )
        return cls(
            direction_scope=DirectionScope.GLOBAL,
            direction_index=direction_index,
            components={name: flat for name in components},
            row_normalization=row_normalization,
        )

"""The search space of a study (heretic's, ARCHITECTURE.md section 6), torch-free.

Ranges are kept as fractions of ``n_layers - 1`` (positions, distances and the
global direction index) and scaled to the model's depth at sampling time:

- ``direction_scope``: categorical over the allowed scopes;
- ``direction_index``: float in ``[0.4, 0.9] * (L - 1)`` (always sampled, so the
  multivariate TPE sees a fixed space; ignored for the per-layer scope);
- per component ``c``:
  ``c.max_weight`` in ``[0.8, 1.5]`` (MLP: ``[-0.25, 1.5]``, a negative value
  clamped to 0 so the MLP edit can switch off),
  ``c.max_weight_position`` in ``[0.6, 1.0] * (L - 1)``,
  ``c.min_weight_fraction`` in ``[0, 1]`` (``min_weight = fraction * max_weight``),
  ``c.min_weight_distance`` in ``[1, 0.6 * (L - 1)]`` (never below one block);
- ``row_normalization``: categorical, only when more than one is allowed;
- ``subspace_weight_j`` for j = 1..k-1 in ``[0, 1]``, only when the direction
  set holds a k-direction subspace (``n_directions``, read from the set);
- ``compliance_addition`` off/on, then ``compliance_strength`` and the block
  ``compliance_layer`` (over the direction index range), only when the set
  holds compliance vectors;
- ``head_ablation`` off/on, then ``top_heads`` (>= 1) and ``head_weight``,
  only when the set holds head scores.

:meth:`SearchSpace.suggest` turns an Optuna trial into :class:`AblationParams`;
:meth:`SearchSpace.to_optuna_params` is the inverse, for warm starts and retries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from abliterate.errors import InvalidArgument
from abliterate.params import MAX_COMPLIANCE_STRENGTH, AblationParams, ComponentParams, DirectionScope, RowNormalization
from abliterate.v1 import common_pb2, optimizer_pb2

#: Components searched when neither the request nor the evaluators name any.
DEFAULT_COMPONENTS = ("attn.o_proj", "mlp.down_proj")
# Chosen by measured front quality at equal budget (docs/benchmarks.md, "Sampler settings").
DEFAULT_N_STARTUP_TRIALS = 60
DEFAULT_N_EI_CANDIDATES = 128

_SCOPE_FROM_PB = {
    common_pb2.DIRECTION_SCOPE_GLOBAL: DirectionScope.GLOBAL,
    common_pb2.DIRECTION_SCOPE_PER_LAYER: DirectionScope.PER_LAYER,
}
_SCOPE_TO_PB = {v: k for k, v in _SCOPE_FROM_PB.items()}
_ROWNORM_FROM_PB = {
    common_pb2.ROW_NORMALIZATION_NONE: RowNormalization.NONE,
    common_pb2.ROW_NORMALIZATION_PRE: RowNormalization.PRE,
    common_pb2.ROW_NORMALIZATION_FULL: RowNormalization.FULL,
    common_pb2.ROW_NORMALIZATION_COLUMN: RowNormalization.COLUMN,
}
_ROWNORM_TO_PB = {v: k for k, v in _ROWNORM_FROM_PB.items()}


def is_mlp(component: str) -> bool:
    return component.split(".", 1)[0].lower() in ("mlp", "moe", "ffn", "feed_forward")


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def check(self, what: str, lo: float | None = None, hi: float | None = None) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise InvalidArgument(f"{what}: bounds must be finite, got [{self.low}, {self.high}]")
        if self.low > self.high:
            raise InvalidArgument(f"{what}: low {self.low} > high {self.high}")
        if lo is not None and self.low < lo:
            raise InvalidArgument(f"{what}: low {self.low} is below {lo}")
        if hi is not None and self.high > hi:
            raise InvalidArgument(f"{what}: high {self.high} is above {hi}")

    def to_list(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class ComponentSpace:
    max_weight: Range
    max_weight_position: Range
    min_weight_fraction: Range
    min_weight_distance: Range
    clamp_negative_to_zero: bool

    @classmethod
    def default(cls, name: str, n_layers: int = 2) -> "ComponentSpace":
        mlp = is_mlp(name)
        span = max(1, n_layers - 1)
        return cls(
            max_weight=Range(-0.25, 1.5) if mlp else Range(0.8, 1.5),
            max_weight_position=Range(0.6, 1.0),
            min_weight_fraction=Range(0.0, 1.0),
            # One block at the low end (also enforced at scaling time).
            min_weight_distance=Range(min(1.0 / span, 0.6), 0.6),
            clamp_negative_to_zero=mlp,
        )

    def validate(self, name: str) -> None:
        self.max_weight.check(f"{name}.max_weight", -10.0, 10.0)
        if self.max_weight.low < 0 and not self.clamp_negative_to_zero:
            raise InvalidArgument(
                f"{name}.max_weight: a negative low bound ({self.max_weight.low}) needs "
                "clamp_negative_to_zero (an edit weight below 0 is not an edit)"
            )
        self.max_weight_position.check(f"{name}.max_weight_position", 0.0, 1.0)
        self.min_weight_fraction.check(f"{name}.min_weight_fraction", 0.0, 1.0)
        self.min_weight_distance.check(f"{name}.min_weight_distance", 0.0)
        if self.min_weight_distance.high <= 0:
            raise InvalidArgument(f"{name}.min_weight_distance: high must be > 0")


def _range_from_pb(msg: optimizer_pb2.FloatRange, parent: Any, field_name: str, default: Range) -> Range:
    if not parent.HasField(field_name):
        return default
    return Range(float(msg.low), float(msg.high))


# Values of a method's on/off switch in the study ("compliance_addition", "head_ablation").
SWITCH = ("off", "on")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges as fractions of ``L - 1``, plus ``n_layers`` to scale them."""

    n_layers: int
    direction_scopes: tuple[DirectionScope, ...] = (DirectionScope.GLOBAL, DirectionScope.PER_LAYER)
    direction_index: Range = Range(0.4, 0.9)
    components: dict[str, ComponentSpace] = field(default_factory=dict)
    row_normalizations: tuple[RowNormalization, ...] = (RowNormalization.NONE,)
    n_startup_trials: int = DEFAULT_N_STARTUP_TRIALS
    n_ei_candidates: int = DEFAULT_N_EI_CANDIDATES
    # Directions of the direction set's subspace (1: none); each after the first gets a searched weight.
    n_directions: int = 1
    subspace_weight: Range = Range(0.0, 1.0)
    # Set from the direction set: whether it holds compliance vectors (CAA is searched: strength and
    # block) and how many attention heads it scored (0: none; head ablation is searched: count, weight).
    has_compliance: bool = False
    n_scored_heads: int = 0
    compliance_strength: Range = Range(0.0, 1.0)
    top_heads: Range = Range(0.0, 32.0)
    head_weight: Range = Range(0.0, 1.0)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pb(
        cls, msg: optimizer_pb2.SearchSpace | None, n_layers: int, model_components: list[str] | None = None
    ) -> "SearchSpace":
        """Fill defaults in and validate (INVALID_ARGUMENT on a bad range or component)."""
        if n_layers < 1:
            raise InvalidArgument(f"the model must have at least one layer, got {n_layers}")
        msg = msg if msg is not None else optimizer_pb2.SearchSpace()
        scopes = []
        for value in msg.direction_scopes:
            if value not in _SCOPE_FROM_PB:
                raise InvalidArgument(f"search_space.direction_scopes: bad value {value}")
            if _SCOPE_FROM_PB[value] not in scopes:
                scopes.append(_SCOPE_FROM_PB[value])
        norms = []
        for value in msg.row_normalizations:
            if value not in _ROWNORM_FROM_PB:
                raise InvalidArgument(f"search_space.row_normalizations: bad value {value}")
            if _ROWNORM_FROM_PB[value] not in norms:
                norms.append(_ROWNORM_FROM_PB[value])
        if msg.components:
            names = list(msg.components)
            if model_components is not None:
                unknown = sorted(set(names) - set(model_components))
                if unknown:
                    raise InvalidArgument(
                        f"search_space.components: unknown {unknown}; the model has {sorted(model_components)}"
                    )
        else:
            names = list(model_components) if model_components else list(DEFAULT_COMPONENTS)
        components = {}
        for name in names:
            if not name:
                raise InvalidArgument("search_space.components: empty component name")
            default = ComponentSpace.default(name, n_layers)
            if name in msg.components:
                c = msg.components[name]
                components[name] = ComponentSpace(
                    max_weight=_range_from_pb(c.max_weight, c, "max_weight", default.max_weight),
                    max_weight_position=_range_from_pb(
                        c.max_weight_position, c, "max_weight_position", default.max_weight_position
                    ),
                    min_weight_fraction=_range_from_pb(
                        c.min_weight_fraction, c, "min_weight_fraction", default.min_weight_fraction
                    ),
                    min_weight_distance=_range_from_pb(
                        c.min_weight_distance, c, "min_weight_distance", default.min_weight_distance
                    ),
                    clamp_negative_to_zero=(
                        c.clamp_negative_to_zero
                        if c.HasField("clamp_negative_to_zero")
                        else default.clamp_negative_to_zero
                    ),
                )
            else:
                components[name] = default
        space = cls(
            n_layers=int(n_layers),
            direction_scopes=tuple(scopes) or (DirectionScope.GLOBAL, DirectionScope.PER_LAYER),
            direction_index=_range_from_pb(msg.direction_index, msg, "direction_index", Range(0.4, 0.9)),
            components=components,
            row_normalizations=tuple(norms) or (RowNormalization.NONE,),
            n_startup_trials=int(msg.n_startup_trials) or DEFAULT_N_STARTUP_TRIALS,
            n_ei_candidates=int(msg.n_ei_candidates) or DEFAULT_N_EI_CANDIDATES,
            subspace_weight=_range_from_pb(msg.subspace_weight, msg, "subspace_weight", Range(0.0, 1.0)),
            compliance_strength=_range_from_pb(msg.compliance_strength, msg, "compliance_strength", Range(0.0, 1.0)),
            top_heads=_range_from_pb(msg.top_heads, msg, "top_heads", Range(0.0, 32.0)),
            head_weight=_range_from_pb(msg.head_weight, msg, "head_weight", Range(0.0, 1.0)),
        )
        space.validate()
        return space

    def validate(self) -> None:
        self.direction_index.check("search_space.direction_index", 0.0, 1.0)
        self.subspace_weight.check("search_space.subspace_weight", 0.0, 1.0)
        self.compliance_strength.check("search_space.compliance_strength", 0.0, MAX_COMPLIANCE_STRENGTH)
        self.top_heads.check("search_space.top_heads", 0.0, 4096.0)
        self.head_weight.check("search_space.head_weight", 0.0, 1.5)
        if not self.components:
            raise InvalidArgument("search_space: no component to search")
        for name, comp in self.components.items():
            comp.validate(f"search_space.components[{name}]")

    def to_pb(self) -> optimizer_pb2.SearchSpace:
        msg = optimizer_pb2.SearchSpace(
            direction_scopes=[_SCOPE_TO_PB[s] for s in self.direction_scopes],
            direction_index=optimizer_pb2.FloatRange(low=self.direction_index.low, high=self.direction_index.high),
            row_normalizations=[_ROWNORM_TO_PB[r] for r in self.row_normalizations],
            n_startup_trials=self.n_startup_trials,
            n_ei_candidates=self.n_ei_candidates,
            subspace_weight=optimizer_pb2.FloatRange(low=self.subspace_weight.low, high=self.subspace_weight.high),
            compliance_strength=optimizer_pb2.FloatRange(
                low=self.compliance_strength.low, high=self.compliance_strength.high
            ),
            top_heads=optimizer_pb2.FloatRange(low=self.top_heads.low, high=self.top_heads.high),
            head_weight=optimizer_pb2.FloatRange(low=self.head_weight.low, high=self.head_weight.high),
        )
        for name, c in self.components.items():
            msg.components[name].CopyFrom(
                optimizer_pb2.ComponentSearchSpace(
                    max_weight=optimizer_pb2.FloatRange(low=c.max_weight.low, high=c.max_weight.high),
                    max_weight_position=optimizer_pb2.FloatRange(
                        low=c.max_weight_position.low, high=c.max_weight_position.high
                    ),
                    min_weight_fraction=optimizer_pb2.FloatRange(
                        low=c.min_weight_fraction.low, high=c.min_weight_fraction.high
                    ),
                    min_weight_distance=optimizer_pb2.FloatRange(
                        low=c.min_weight_distance.low, high=c.min_weight_distance.high
                    ),
                    clamp_negative_to_zero=c.clamp_negative_to_zero,
                )
            )
        return msg

    def to_dict(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "direction_scopes": [s.value for s in self.direction_scopes],
            "direction_index": self.direction_index.to_list(),
            "row_normalizations": [r.value for r in self.row_normalizations],
            "n_startup_trials": self.n_startup_trials,
            "n_ei_candidates": self.n_ei_candidates,
            "n_directions": self.n_directions,
            "subspace_weight": self.subspace_weight.to_list(),
            "has_compliance": self.has_compliance,
            "n_scored_heads": self.n_scored_heads,
            "compliance_strength": self.compliance_strength.to_list(),
            "top_heads": self.top_heads.to_list(),
            "head_weight": self.head_weight.to_list(),
            "components": {
                name: {
                    "max_weight": c.max_weight.to_list(),
                    "max_weight_position": c.max_weight_position.to_list(),
                    "min_weight_fraction": c.min_weight_fraction.to_list(),
                    "min_weight_distance": c.min_weight_distance.to_list(),
                    "clamp_negative_to_zero": c.clamp_negative_to_zero,
                }
                for name, c in self.components.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        return cls(
            n_layers=int(data["n_layers"]),
            direction_scopes=tuple(DirectionScope(s) for s in data["direction_scopes"]),
            direction_index=Range(*data["direction_index"]),
            row_normalizations=tuple(RowNormalization(r) for r in data["row_normalizations"]),
            n_startup_trials=int(data.get("n_startup_trials", DEFAULT_N_STARTUP_TRIALS)),
            n_ei_candidates=int(data.get("n_ei_candidates", DEFAULT_N_EI_CANDIDATES)),
            n_directions=int(data.get("n_directions", 1)),
            subspace_weight=Range(*data.get("subspace_weight", (0.0, 1.0))),
            has_compliance=bool(data.get("has_compliance", False)),
            n_scored_heads=int(data.get("n_scored_heads", 0)),
            compliance_strength=Range(*data.get("compliance_strength", (0.0, 1.0))),
            top_heads=Range(*data.get("top_heads", (0.0, 32.0))),
            head_weight=Range(*data.get("head_weight", (0.0, 1.0))),
            components={
                name: ComponentSpace(
                    max_weight=Range(*c["max_weight"]),
                    max_weight_position=Range(*c["max_weight_position"]),
                    min_weight_fraction=Range(*c["min_weight_fraction"]),
                    min_weight_distance=Range(*c["min_weight_distance"]),
                    clamp_negative_to_zero=bool(c["clamp_negative_to_zero"]),
                )
                for name, c in data["components"].items()
            },
        )

    def with_n_layers(self, n_layers: int) -> "SearchSpace":
        return replace(self, n_layers=int(n_layers))

    def with_methods(self, n_directions: int, has_compliance: bool, n_scored_heads: int) -> "SearchSpace":
        """The dimensions the direction set's method tensors open (see the module docstring)."""
        return replace(
            self,
            n_directions=max(1, int(n_directions)),
            has_compliance=bool(has_compliance),
            n_scored_heads=max(0, int(n_scored_heads)),
        )

    def head_count_bounds(self) -> tuple[int, int]:
        """Heads ablated when head ablation is on: at least one (off is the switch), at most the scored ones."""
        high = max(1, min(int(self.top_heads.high), self.n_scored_heads))
        return min(max(1, int(math.ceil(self.top_heads.low))), high), high

    # ------------------------------------------------------------ scaled bounds

    @property
    def span(self) -> float:
        """``L - 1``: the highest block index."""
        return float(self.n_layers - 1)

    def index_bounds(self) -> tuple[float, float]:
        return self.direction_index.low * self.span, self.direction_index.high * self.span

    def position_bounds(self, comp: ComponentSpace) -> tuple[float, float]:
        return comp.max_weight_position.low * self.span, comp.max_weight_position.high * self.span

    def distance_bounds(self, comp: ComponentSpace) -> tuple[float, float]:
        low = max(1.0, comp.min_weight_distance.low * self.span)
        high = max(low, comp.min_weight_distance.high * self.span)
        return low, high

    # ------------------------------------------------------------ sampling

    def suggest(self, trial: Any) -> AblationParams:
        """Sample one trial's parameters (``trial`` is an ``optuna.Trial``)."""
        scope = DirectionScope(trial.suggest_categorical("direction_scope", [s.value for s in self.direction_scopes]))
        index = trial.suggest_float("direction_index", *self.index_bounds())
        components = {}
        for name, comp in self.components.items():
            max_weight = trial.suggest_float(f"{name}.max_weight", comp.max_weight.low, comp.max_weight.high)
            position = trial.suggest_float(f"{name}.max_weight_position", *self.position_bounds(comp))
            fraction = trial.suggest_float(
                f"{name}.min_weight_fraction", comp.min_weight_fraction.low, comp.min_weight_fraction.high
            )
            distance = trial.suggest_float(f"{name}.min_weight_distance", *self.distance_bounds(comp))
            if comp.clamp_negative_to_zero and max_weight < 0:
                max_weight = 0.0
            components[name] = ComponentParams(
                max_weight=float(max_weight),
                max_weight_position=float(position),
                min_weight=float(fraction * max_weight),
                min_weight_distance=float(distance),
            )
        if len(self.row_normalizations) > 1:
            row_norm = RowNormalization(
                trial.suggest_categorical("row_normalization", [r.value for r in self.row_normalizations])
            )
        else:
            row_norm = self.row_normalizations[0]
        subspace_weights = tuple(
            float(trial.suggest_float(f"subspace_weight_{j}", self.subspace_weight.low, self.subspace_weight.high))
            for j in range(1, self.n_directions)
        )
        methods: dict[str, Any] = {}
        # Each method is first switched on or off, so the study also tries plain ablation (a strength or
        # head count drawn from a range is almost never exactly "none"); its values exist only when on.
        if self.has_compliance and trial.suggest_categorical("compliance_addition", list(SWITCH)) == "on":
            low, high = self.index_bounds()
            methods["compliance_strength"] = float(
                trial.suggest_float("compliance_strength", self.compliance_strength.low, self.compliance_strength.high)
            )
            methods["compliance_layer"] = int(trial.suggest_int("compliance_layer", math.floor(low), math.ceil(high)))
        if self.n_scored_heads and trial.suggest_categorical("head_ablation", list(SWITCH)) == "on":
            methods["head_count"] = int(trial.suggest_int("top_heads", *self.head_count_bounds()))
            methods["head_weight"] = float(
                trial.suggest_float("head_weight", self.head_weight.low, self.head_weight.high)
            )
        return AblationParams(
            direction_scope=scope,
            direction_index=float(index) if scope == DirectionScope.GLOBAL else None,
            components=components,
            row_normalization=row_norm,
            subspace_weights=subspace_weights,
            **methods,
        )

    def to_optuna_params(self, params: AblationParams) -> dict[str, Any]:
        """The inverse of :meth:`suggest`: Optuna parameter values that give ``params``.

        A component of the space that ``params`` does not edit becomes
        ``max_weight = 0`` (an edit of weight 0 is no edit). Components outside
        the space are INVALID_ARGUMENT. A per-layer trial gets the middle of the
        index range (the index is ignored for that scope).
        """
        unknown = sorted(set(params.components) - set(self.components))
        if unknown:
            raise InvalidArgument(f"parameters name components outside the search space: {unknown}")
        if params.direction_scope not in self.direction_scopes:
            raise InvalidArgument(
                f"parameters use direction_scope {params.direction_scope.value!r}; the search space allows "
                f"{[scope.value for scope in self.direction_scopes]}"
            )
        if params.row_normalization not in self.row_normalizations:
            raise InvalidArgument(
                f"parameters use row_normalization {params.row_normalization.value!r}; the search space allows "
                f"{[norm.value for norm in self.row_normalizations]}"
            )
        out: dict[str, Any] = {"direction_scope": params.direction_scope.value}
        if params.direction_index is not None:
            out["direction_index"] = float(params.direction_index)
        else:
            low, high = self.index_bounds()
            out["direction_index"] = (low + high) / 2
        for name, comp in self.components.items():
            kernel = params.components.get(name)
            if kernel is None:
                low, high = self.position_bounds(comp)
                kernel = ComponentParams(0.0, (low + high) / 2, 0.0, self.distance_bounds(comp)[0])
            out[f"{name}.max_weight"] = float(kernel.max_weight)
            out[f"{name}.max_weight_position"] = float(kernel.max_weight_position)
            out[f"{name}.min_weight_fraction"] = (
                float(kernel.min_weight / kernel.max_weight) if kernel.max_weight != 0 else 0.0
            )
            out[f"{name}.min_weight_distance"] = float(kernel.min_weight_distance)
        if len(self.row_normalizations) > 1:
            out["row_normalization"] = params.row_normalization.value
        if len(params.subspace_weights) > self.n_directions - 1:
            raise InvalidArgument(
                f"parameters weight {len(params.subspace_weights)} subspace directions; the direction set has "
                f"{self.n_directions - 1} beyond the first"
            )
        for j in range(1, self.n_directions):
            # A set of parameters without further weights edits along the first direction alone: weight 0.
            given = params.subspace_weights[j - 1] if j - 1 < len(params.subspace_weights) else 0.0
            out[f"subspace_weight_{j}"] = float(given)
        # The method switches: (opened by the set, switch, on in these parameters, values when on, error).
        for opened, switch, on, values, missing in (
            (
                self.has_compliance,
                "compliance_addition",
                params.adds_compliance,
                {"compliance_strength": float(params.compliance_strength), "compliance_layer": params.compliance_layer},
                "parameters add compliance vectors; the direction set has none",
            ),
            (
                bool(self.n_scored_heads),
                "head_ablation",
                params.ablates_heads,
                {"top_heads": params.head_count, "head_weight": float(params.head_weight)},
                "parameters ablate attention heads; the direction set has no head scores",
            ),
        ):
            if opened:
                out[switch] = SWITCH[int(on)]
                if on:
                    out.update(values)
            elif on:
                raise InvalidArgument(missing)
        return out

    def params_from_optuna(self, values: dict[str, Any]) -> AblationParams:
        """:meth:`suggest` without a trial: the parameters for fixed Optuna values."""
        return self.suggest(_FixedTrial(values))


class _FixedTrial:
    """Answers ``suggest_*`` from a dict (for :meth:`SearchSpace.params_from_optuna`)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._values.get(name, choices[0])

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return float(self._values.get(name, (low + high) / 2))

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return int(self._values.get(name, (low + high) // 2))

"""The directional edit and its exact reset.

For each editable matrix of block l with weight w > 0 and direction r (unit,
hidden-size): ``W <- W - w * r (r^T W)`` on the output side. Row
normalization: "none" as above; "pre" computes the edit on the row-normalized
matrix and applies it at the original row scale; "full" additionally
renormalizes every row to its original norm (exact norm preservation).

The first time a matrix is edited its original is copied aside; ``reset``
copies every original back, so a reset restores the weights bit for bit and
costs memory and time only for what was edited.
"""

from __future__ import annotations

import torch

from abliterate.core.directions import global_direction
from abliterate.core.modules import EditableMatrix, ModuleMap, discover
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.params import AblationParams, DirectionScope, RowNormalization

_EPS = 1e-8


def edit_matrix(weight: torch.Tensor, r: torch.Tensor, w: float, out_axis: int,
                row_normalization: RowNormalization = RowNormalization.NONE) -> torch.Tensor:
    """Return the edited copy of ``weight`` (any of (out, in), (E, out, in), (E, in, out))."""
    # View as (..., out, in) so every case is the same matrix algebra.
    mat = weight.float()
    if weight.dim() == 3 and out_axis == 2:
        mat = mat.transpose(1, 2)
    elif weight.dim() == 2 and out_axis != 0:
        raise InvalidArgument(f"a 2-D matrix must have its output on axis 0, got {out_axis}")
    r = r.to(device=mat.device, dtype=torch.float32)
    if row_normalization == RowNormalization.NONE:
        edited = mat - w * r[:, None] * (r @ mat).unsqueeze(-2)
    else:
        norms = mat.norm(dim=-1, keepdim=True)
        unit = mat / norms.clamp_min(_EPS)
        edited_unit = unit - w * r[:, None] * (r @ unit).unsqueeze(-2)
        if row_normalization == RowNormalization.FULL:
            edited_unit = edited_unit / edited_unit.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        edited = edited_unit * norms
    if weight.dim() == 3 and out_axis == 2:
        edited = edited.transpose(1, 2)
    return edited.to(weight.dtype)


class Ablator:
    """Applies trial parameters to a model in place and undoes them exactly."""

    def __init__(self, module_map: ModuleMap):
        self.module_map = module_map
        self._originals: dict[int, tuple[EditableMatrix, torch.Tensor]] = {}
        self.applied: AblationParams | None = None

    @property
    def n_layers(self) -> int:
        return self.module_map.n_layers

    def reset(self) -> None:
        with torch.no_grad():
            for matrix, original in self._originals.values():
                matrix.param.data.copy_(original)
        self.applied = None

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._originals.values())

    def _remember(self, matrix: EditableMatrix) -> None:
        key = id(matrix.param)
        if key not in self._originals:
            self._originals[key] = (matrix, matrix.param.detach().clone())

    def directions_for(self, params: AblationParams, refusal: torch.Tensor) -> list[torch.Tensor]:
        """The direction each block uses."""
        if refusal.shape[0] != self.n_layers + 1:
            raise FailedPrecondition(
                f"direction set has {refusal.shape[0]} residual indices; this model needs {self.n_layers + 1}")
        if refusal.shape[1] != self.module_map.hidden_size:
            raise FailedPrecondition(
                f"direction set has hidden size {refusal.shape[1]}; this model has {self.module_map.hidden_size}")
        if params.direction_scope == DirectionScope.GLOBAL:
            r = global_direction(refusal, params.direction_index)
            return [r] * self.n_layers
        return [refusal[layer + 1] for layer in range(self.n_layers)]

    def apply(self, params: AblationParams, refusal: torch.Tensor) -> int:
        """Reset, then edit. Returns the number of matrices edited."""
        params.validate(self.n_layers, self.module_map.components)
        directions = self.directions_for(params, refusal)
        self.reset()
        edited = 0
        with torch.no_grad():
            for component in params.components:
                weights = params.layer_weights(component, self.n_layers)
                for layer, w in enumerate(weights):
                    if w <= 0:  # the MLP weight is clamped at 0 so the search can switch it off
                        continue
                    for matrix in self.module_map.layers[layer].get(component, []):
                        self._remember(matrix)
                        new = edit_matrix(matrix.param.data, directions[layer], w, matrix.out_axis,
                                          params.row_normalization)
                        if not torch.isfinite(new).all():
                            self.reset()
                            raise InvalidArgument(f"the edit made {matrix.name} of layer {layer} non-finite")
                        matrix.param.data.copy_(new)
                        edited += 1
        self.applied = params
        return edited


def ablator_for(lm) -> Ablator:
    """The one Ablator of a loaded model.

    Every engine or service sharing a model must share its ablator: a second
    ablator would not know the first one's edits and could not undo them.
    """
    ablator = lm.extra.get("ablator")
    if ablator is None:
        ablator = Ablator(discover(lm.model))
        lm.extra["ablator"] = ablator
    return ablator

"""The directional edit and its exact reset.

For each editable matrix of block l with weight w > 0 and direction r (unit,
hidden-size), on the output side (W is (out = hidden, in)):

- ``none``: ``W <- W - w r (r^T W)``. At w = 1 the block writes nothing along
  r (``r^T W' = 0``). Norms are not kept.
- ``pre``: the same edit computed on the row-normalized matrix ``U`` and
  applied at the original row scale (``W' = W - w diag(|W_i|) r (r^T U)``).
  Neither row norms nor the removal of r are exact.
- ``full`` (grimjim's norm-preserving variant): edit ``U``, renormalize its
  rows, restore the original row norms. Keeps every row norm exactly; does
  **not** remove r exactly (rows are per residual dimension, and rescaling
  them does not commute with the projection).
- ``column``: the plain edit, then every input column (a vector in residual
  space) rescaled to its original norm. Column scaling commutes with the
  projection, so at w = 1 r is removed exactly and every column norm is kept.

An output bias (gpt-oss's attention and expert biases) writes into the
residual stream as a column for a constant input 1: it gets the same
projection (``b <- b - w r (r . b)``), and in ``column`` mode keeps its norm.

The first time a tensor is edited its original is copied aside; ``reset``
copies every original back, so a reset restores the weights bit for bit and
costs memory and time only for what was edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abliterate.core.directions import DirectionSet, global_direction, remove_subspace, subspace_basis
from abliterate.core.modules import ATTN, EditableMatrix, ModuleMap, discover
from abliterate.core.weight_files import WeightFiles
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.params import AblationParams, DirectionScope, RowNormalization

_EPS = 1e-8


def _project_out(vectors: torch.Tensor, r: torch.Tensor, w) -> torch.Tensor:
    """``v - w r (r . v)`` for every column of ``vectors`` (..., out, n).

    ``r`` (k, out) orthonormal rows with ``w`` (k,) weights: the joint edit ``v - U^T diag(w) (U v)``
    (at weights 1 the projection off the whole span, not k sequential ones).
    """
    if r.dim() == 2:
        coefficients = (r @ vectors) * w[:, None]  # (k, out) @ (..., out, n) -> (..., k, n), weighted
        return vectors - r.transpose(0, 1) @ coefficients  # (out, k) @ (..., k, n) -> (..., out, n)
    return vectors - w * r[:, None] * (r @ vectors).unsqueeze(-2)  # (out, 1) * (..., 1, n) -> (..., out, n)


def edit_matrix(
    weight: torch.Tensor,
    r: torch.Tensor,
    w: float,
    out_axis: int,
    row_normalization: RowNormalization = RowNormalization.NONE,
) -> torch.Tensor:
    """Return the edited copy of ``weight`` (any of (out, in), (E, out, in), (E, in, out)).

    ``r``: a unit direction (out,) with weight ``w``, or a subspace (k, out) with weights ``w`` (k,).
    """
    # View as (..., out, in) so every case is the same matrix algebra.
    mat = weight.float()
    if weight.dim() == 3 and out_axis == 2:
        mat = mat.transpose(1, 2)  # (E, in, out) -> (E, out, in)
    elif weight.dim() == 2 and out_axis != 0:
        raise InvalidArgument(f"a 2-D matrix must have its output on axis 0, got {out_axis}")
    r = r.to(device=mat.device, dtype=torch.float32)
    if r.dim() == 2:
        w = torch.as_tensor(w, dtype=torch.float32, device=mat.device)  # (k,)
    if row_normalization == RowNormalization.NONE:
        edited = _project_out(mat, r, w)  # (..., out, in)
    elif row_normalization == RowNormalization.COLUMN:
        edited = _project_out(mat, r, w)  # (..., out, in)
        scale = mat.norm(dim=-2, keepdim=True) / edited.norm(dim=-2, keepdim=True).clamp_min(_EPS)  # (..., 1, in)
        edited = edited * scale
    else:
        norms = mat.norm(dim=-1, keepdim=True)  # (..., out, 1) row norms
        unit = mat / norms.clamp_min(_EPS)  # (..., out, in)
        edited_unit = _project_out(unit, r, w)  # (..., out, in)
        if row_normalization == RowNormalization.FULL:
            edited_unit = edited_unit / edited_unit.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        edited = edited_unit * norms
    if weight.dim() == 3 and out_axis == 2:
        edited = edited.transpose(1, 2)  # (E, out, in) -> (E, in, out)
    return edited.to(weight.dtype)


def edit_bias(
    bias: torch.Tensor, r: torch.Tensor, w: float, row_normalization: RowNormalization = RowNormalization.NONE
) -> torch.Tensor:
    """Return the edited copy of an output bias, (out,) or per expert (E, out)."""
    vec = bias.float()
    r = r.to(device=vec.device, dtype=torch.float32)
    if r.dim() == 2:  # a subspace (k, out), weights (k,)
        weights = torch.as_tensor(w, dtype=torch.float32, device=vec.device)
        edited = vec - ((vec @ r.transpose(0, 1)) * weights) @ r  # (..., k) @ (k, out) -> (..., out)
    else:
        edited = vec - w * (vec @ r)[..., None] * r  # (..., 1) * (out,) -> (..., out), with ... = () or (E,)
    if row_normalization == RowNormalization.COLUMN:
        edited = edited * (vec.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(_EPS))
    return edited.to(bias.dtype)


@dataclass
class MethodTensors:
    """What a direction set carries beyond ``r`` for the edit methods (all optional, CPU float32)."""

    subspace: torch.Tensor | None = None  # (L+1, k, d): joint multi-direction edit
    calibration: torch.Tensor | None = None  # (L+1,): block l's weights times calibration[l + 1]
    compliance: torch.Tensor | None = None  # (L+1, d): CAA vectors
    head_scores: torch.Tensor | None = None  # (L, n_heads): head ablation picks the top ones

    @classmethod
    def of(cls, directions: DirectionSet) -> "MethodTensors":
        return cls(directions.subspace, directions.calibration, directions.compliance, directions.head_scores)


class Ablator:
    """Applies trial parameters to a model in place and undoes them exactly."""

    def __init__(self, module_map: ModuleMap, weight_files: WeightFiles | None = None, names: dict | None = None):
        self.module_map = module_map
        self._originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        # Parameters whose original is read back from the model's safetensors files on reset
        # (weight_files.py): id -> (parameter, name). ``names``: id(parameter) -> its name in the model.
        self._file_backed: dict[int, tuple[torch.nn.Parameter, str]] = {}
        self._weight_files = weight_files
        self._names = names or {}
        self._dirty = False  # a parameter was written since the last reset
        self.applied: AblationParams | None = None
        # The lowest block the applied edit changed (None: none); the blocks below compute as unedited.
        self.first_edited_layer: int | None = None
        # Linear modules given a CAA bias they did not have: reset removes it again.
        self._added_biases: list[torch.nn.Linear] = []

    @property
    def n_layers(self) -> int:
        return self.module_map.n_layers

    @property
    def added_biases(self) -> bool:
        """Whether the applied edit gave a linear layer a bias it did not have (CAA)."""
        return bool(self._added_biases)

    def reset(self) -> None:
        with torch.no_grad():
            for param, original in self._originals.values():
                param.data.copy_(original)
            if self._dirty:  # nothing to read back right after a reset
                for param, name in self._file_backed.values():
                    param.data.copy_(self._weight_files.read(name))
            for module in self._added_biases:
                module.bias = None
        self._added_biases = []
        self._dirty = False
        self.applied = None
        self.first_edited_layer = None

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._originals.values())

    def _remember(self, param: torch.nn.Parameter) -> None:
        key = id(param)
        if key in self._originals or key in self._file_backed:
            return
        name = self._names.get(key)
        if self._weight_files is not None and name is not None and self._weight_files.matches(name, param):
            self._file_backed[key] = (param, name)
        else:
            self._originals[key] = (param, param.detach().clone())

    def directions_for(
        self,
        params: AblationParams,
        refusal: torch.Tensor,
        protected: torch.Tensor | None = None,
        subspace: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The direction each block uses: (d,), or a basis (1 + len(subspace_weights), d) when the
        parameters weight a subspace's further directions (``subspace`` (L+1, k, d), row 0 = refusal).

        ``protected`` (L+1, k, d): per residual index an orthonormal basis the
        edit must not touch (sacred directions). Per-layer directions were
        orthogonalized against it when the set was built; the global direction
        is interpolated between layers, so it is projected off each block's own
        subspace here.
        """
        if refusal.shape[0] != self.n_layers + 1:
            raise FailedPrecondition(
                f"direction set has {refusal.shape[0]} residual indices; this model needs {self.n_layers + 1}"
            )
        if refusal.shape[1] != self.module_map.hidden_size:
            raise FailedPrecondition(
                f"direction set has hidden size {refusal.shape[1]}; this model has {self.module_map.hidden_size}"
            )
        # The evaluator holds the refusal directions on the model's device and the other tensors of the
        # set on the CPU: the basis arithmetic below mixes them, so it happens on the refusal's device.
        protected = None if protected is None else protected.to(refusal.device)
        subspace = None if subspace is None else subspace.to(refusal.device)
        primary = self._primary_directions(params, refusal, protected)
        extra = len(params.subspace_weights)
        if not extra:
            return primary
        available = 0 if subspace is None else subspace.shape[1] - 1
        if extra > available:
            raise FailedPrecondition(
                f"the parameters weight {extra} subspace direction(s) beyond the first; the direction set has "
                f"{available} (extract it with direction_method SUBSPACE and n_directions >= {extra + 1})"
            )
        kept = subspace[:, : extra + 1]  # (L+1, 1 + extra, d)
        if params.direction_scope == DirectionScope.GLOBAL:
            bases = subspace_basis(kept, params.direction_index, torch.stack(primary), protected)  # (L, k, d)
        else:
            bases = kept[1:]  # (L, k, d): block l uses residual l+1
        return list(bases)

    def _primary_directions(
        self, params: AblationParams, refusal: torch.Tensor, protected: torch.Tensor | None
    ) -> list[torch.Tensor]:
        if params.direction_scope == DirectionScope.GLOBAL:
            r = global_direction(refusal, params.direction_index)  # (d,)
            if protected is None:
                return [r] * self.n_layers
            stacked = r.expand(self.n_layers, -1)  # (L, d)
            # (L, d) off protected[1:] (L, k, d) -> L unit rows (d,)
            return list(remove_subspace(stacked, protected[1:], what="the global refusal direction"))
        return [refusal[layer + 1] for layer in range(self.n_layers)]  # (L+1, d) -> L rows (d,), block l: row l+1

    @staticmethod
    def weights_for(params: AblationParams, w: float) -> float | list[float]:
        """A block's kernel weight ``w``, or per direction ``[w, w * s_1, ...]`` for a subspace edit."""
        return [w] + [w * s for s in params.subspace_weights] if params.subspace_weights else w

    def block_weights(self, params: AblationParams, component: str, calibration: torch.Tensor | None) -> list[float]:
        """Each block's kernel weight for ``component``, times its calibration factor when the set has one."""
        weights = params.layer_weights(component, self.n_layers)
        if calibration is None:
            return weights
        if tuple(calibration.shape) != (self.n_layers + 1,):
            raise FailedPrecondition(
                f"the calibration factors have shape {list(calibration.shape)}; this model needs [{self.n_layers + 1}]"
            )
        return [w * float(calibration[layer + 1]) for layer, w in enumerate(weights)]  # block l writes residual l+1

    def apply(
        self,
        params: AblationParams,
        refusal: torch.Tensor,
        protected: torch.Tensor | None = None,
        subspace: torch.Tensor | None = None,
        methods: MethodTensors | None = None,
    ) -> int:
        """Reset, then edit. Returns the number of matrices edited.

        ``methods`` (with ``subspace`` as given, when that is not None) carries the set's calibration,
        compliance vectors and head scores; parameters that need one the set lacks are refused.
        """
        methods = methods or MethodTensors()
        subspace = subspace if subspace is not None else methods.subspace
        params.validate(self.n_layers, self.module_map.components)
        heads_by_layer = self._check_method_tensors(params, methods)
        directions = self.directions_for(params, refusal, protected, subspace)
        self.reset()
        edited = 0
        with torch.no_grad():
            for component in params.components:
                for layer, w in enumerate(self.block_weights(params, component, methods.calibration)):
                    if w == 0:  # weights are >= 0 (validated); 0 leaves the block alone
                        continue
                    for matrix in self.module_map.layers[layer].get(component, []):
                        block_weights = self.weights_for(params, w)
                        self._edit(matrix, directions[layer], block_weights, params.row_normalization, layer)
                        edited += 1
                        self._mark_edited(layer)
            if heads_by_layer:
                edited += self._ablate_heads(params, directions, heads_by_layer)
            if params.adds_compliance:
                edited += self._add_compliance(params, methods.compliance, protected)
        self.applied = params
        return edited

    def _mark_edited(self, layer: int) -> None:
        first = self.first_edited_layer
        self.first_edited_layer = layer if first is None else min(first, layer)

    def _check_method_tensors(self, params: AblationParams, methods: MethodTensors) -> dict[int, tuple[list[int], int]]:
        """Refuse what the set or the model cannot do, before anything is written (a refused trial leaves
        the model as it was). Returns the heads to ablate: block -> (head indices, head_dim)."""
        heads_by_layer: dict[int, tuple[list[int], int]] = {}
        if params.ablates_heads:
            if methods.head_scores is None:
                raise FailedPrecondition(
                    "head_ablation needs head scores: extract the direction set with head_scores (--head-scores)"
                )
            n_heads = methods.head_scores.shape[1]
            if methods.head_scores.shape[0] != self.n_layers or params.head_count > self.n_layers * n_heads:
                raise FailedPrecondition(
                    f"head_ablation.top_heads {params.head_count} exceeds the set's {self.n_layers} x {n_heads} heads"
                    if methods.head_scores.shape[0] == self.n_layers
                    else f"the head scores cover {methods.head_scores.shape[0]} blocks; this model has {self.n_layers}"
                )
        if params.adds_compliance and methods.compliance is None:
            raise FailedPrecondition(
                "compliance_addition needs compliance vectors: extract the direction set with compliance (--compliance)"
            )
        # Checked before anything is written, so a refused trial leaves the model as it was.
        if params.adds_compliance:
            matrix = self._attention_out(params.compliance_layer)
            if matrix.linear is None:
                raise FailedPrecondition(
                    f"{matrix.name} of layer {params.compliance_layer} is not an nn.Linear: it cannot take a bias"
                )
        if params.ablates_heads:
            from abliterate.core.heads import top_heads

            n_heads = methods.head_scores.shape[1]
            for layer, head in top_heads(methods.head_scores, params.head_count):
                if layer not in heads_by_layer:
                    width = self._attention_out(layer).param.shape[1]
                    head_dim, remainder = divmod(width, n_heads)
                    if remainder:
                        raise FailedPrecondition(
                            f"block {layer}'s attention out-projection reads {width} inputs, not a multiple "
                            f"of the head scores' {n_heads} heads"
                        )
                    heads_by_layer[layer] = ([], head_dim)
                heads_by_layer[layer][0].append(head)
        return heads_by_layer

    def _attention_out(self, layer: int) -> EditableMatrix:
        matrices = [m for m in self.module_map.layers[layer].get(ATTN, []) if m.param.dim() == 2]
        if len(matrices) != 1:
            raise FailedPrecondition(
                f"block {layer} has {len(matrices)} attention out-projections; head ablation and "
                "compliance addition need exactly one"
            )
        return matrices[0]

    def _ablate_heads(
        self, params: AblationParams, directions: list[torch.Tensor], heads_by_layer: dict[int, tuple[list[int], int]]
    ) -> int:
        """Project r out of the top heads' column blocks of each block's attention out-projection
        (after the kernel's edit of the same matrix, if any: the two projections compose)."""
        from abliterate.core.heads import edit_head_columns

        weights = self.weights_for(params, params.head_weight)
        for layer, (heads, head_dim) in sorted(heads_by_layer.items()):
            matrix = self._attention_out(layer)
            edited = edit_head_columns(matrix.param.data, heads, head_dim, directions[layer], weights)
            self._write(matrix.param, edited, f"{matrix.name} of layer {layer}")
            self._mark_edited(layer)
        return len(heads_by_layer)

    def _add_compliance(
        self, params: AblationParams, compliance: torch.Tensor, protected: torch.Tensor | None = None
    ) -> int:
        """CAA: block ``compliance_layer``'s attention out-projection gets the output bias
        ``strength * c[layer + 1]`` (a zero bias is created where it has none; reset removes it).

        With a protected subspace (sacred, helpfulness), ``c`` is projected off it first: the addition
        must not move the residual along what the set protects, as the ablation does not.
        """
        layer = params.compliance_layer
        matrix = self._attention_out(layer)
        module = matrix.linear  # an nn.Linear: _check_method_tensors made sure
        vector = compliance[layer + 1].to(matrix.param.device, torch.float32)  # (d,)
        if protected is not None:
            basis = protected[layer + 1].to(vector.device, torch.float32)  # (k, d) orthonormal rows
            vector = vector - (basis @ vector) @ basis  # (k,) @ (k, d) -> (d,)
        vector = params.compliance_strength * vector
        if module.bias is None:
            module.bias = torch.nn.Parameter(torch.zeros_like(vector, dtype=matrix.param.dtype), requires_grad=False)
            self._added_biases.append(module)
            self._dirty = True
        else:
            self._remember(module.bias)
            self._dirty = True
        module.bias.data.copy_((module.bias.data.float() + vector).to(module.bias.dtype))
        self._mark_edited(layer)
        return 1

    def _write(self, param: torch.nn.Parameter, new: torch.Tensor, what: str) -> None:
        if not torch.isfinite(new).all():
            self.reset()
            raise InvalidArgument(f"the edit made {what} non-finite")
        self._remember(param)
        self._dirty = True
        param.data.copy_(new)

    def _edit(
        self, matrix: EditableMatrix, r: torch.Tensor, w, row_normalization: RowNormalization, layer: int
    ) -> None:
        updates = [(matrix.param, edit_matrix(matrix.param.data, r, w, matrix.out_axis, row_normalization))]
        if matrix.bias is not None:
            updates.append((matrix.bias, edit_bias(matrix.bias.data, r, w, row_normalization)))
        for param, new in updates:
            if not torch.isfinite(new).all():
                self.reset()
                raise InvalidArgument(f"the edit made {matrix.name} of layer {layer} non-finite")
        for param, new in updates:
            self._remember(param)
            self._dirty = True
            param.data.copy_(new)


def ablator_for(lm) -> Ablator:
    """The one Ablator of a loaded model.

    Every engine or service sharing a model must share its ablator: a second
    ablator would not know the first one's edits and could not undo them.
    """
    ablator = lm.extra.get("ablator")
    if ablator is None:
        path, gguf_file = lm.spec.resolved_source()
        files = None if gguf_file else WeightFiles.open(path)
        names = {id(param): name for name, param in lm.model.named_parameters()} if files else None
        ablator = Ablator(discover(lm.model), files, names)
        lm.extra["ablator"] = ablator
    return ablator

"""Refusal and sacred (capability) directions from residuals.

Refusal: per residual index l, ``r[l] = normalize(mean(H_bad[:, l]) - mean(H_good[:, l]))``,
optionally projected (the component along the normalized good mean removed).
Sacred: an orthonormal basis per layer of the directions that distinguish
capability prompts from baseline text; the refusal direction can be projected
onto the orthogonal complement of that subspace in one step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from abliterate.artifacts import canonical_safetensors, read_metadata
from abliterate.errors import InvalidArgument
from abliterate.params import WINSORIZE_SCOPES

EPS = 1e-8
# A refusal direction whose norm after orthogonalization falls below this
# (relative to 1) has nothing left to remove: refuse rather than amplify noise.
MIN_REMAINING_NORM = 1e-3


def _normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


def winsorize(residuals: torch.Tensor, quantile: float, scope: str = "per_prompt") -> torch.Tensor:
    """Clamp outlying components of residuals (N, L+1, d) to +-(a quantile of their magnitudes).

    ``per_prompt`` (heretic's definition, the default): each prompt's vector at
    each layer is clamped at the quantile of its own ``|components|``, so one
    prompt's massive activations do not set the bound for the others.
    ``per_layer``: one bound per layer, pooled over all prompts and components.
    """
    if not 0 < quantile <= 1:
        raise InvalidArgument(f"winsorization quantile must be in (0, 1], got {quantile}")
    if scope not in WINSORIZE_SCOPES:
        raise InvalidArgument(f"unknown winsorization scope {scope!r}; choose one of {WINSORIZE_SCOPES}")
    if quantile == 1:
        return residuals
    n, layers, d = residuals.shape  # (N, L+1, d)
    if scope == "per_prompt":
        flat = residuals.abs().reshape(n * layers, d)  # (N*(L+1), d): one row per (prompt, layer) vector
        shape = (n, layers, 1)
    else:
        flat = residuals.abs().transpose(0, 1).reshape(layers, -1)  # (L+1, N*d): one row per layer, all prompts pooled
        shape = (1, layers, 1)
    # torch.quantile has an input-size limit; kthvalue is exact and has none.
    k = max(1, min(flat.shape[1], math.ceil(quantile * flat.shape[1])))
    bounds = flat.kthvalue(k, dim=1).values.view(shape)  # (N, L+1, 1) or (1, L+1, 1)
    return torch.maximum(torch.minimum(residuals, bounds), -bounds)  # (N, L+1, d)


def mean64(residuals: torch.Tensor) -> torch.Tensor:
    return residuals.double().mean(dim=0)  # (N, L+1, d) -> (L+1, d)


@dataclass
class LayerDiagnostics:
    mean_diff_norm: float
    cosine_of_means: float
    separation: float  # Cohen's d of the two sets' projections on r
    sacred_overlap: float | None = None  # norm of r's projection on the sacred subspace


@dataclass
class DirectionSet:
    """Everything the evaluator needs, as float32 tensors on the CPU.

    ``refusal``: (L+1, d) unit rows. ``sacred``: (L+1, k, d) orthonormal rows
    per layer, or None. ``refusal_raw``: the refusal directions before sacred
    orthogonalization (None when none was done).
    """

    refusal: torch.Tensor
    good_mean: torch.Tensor
    bad_mean: torch.Tensor
    diagnostics: list[LayerDiagnostics] = field(default_factory=list)
    sacred: torch.Tensor | None = None
    refusal_raw: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # (L+1, k, d) orthonormal rows per residual, row 0 = ``refusal``: the subspace a multi-direction edit
    # removes jointly (refusal_subspace), or None for a single direction.
    subspace: torch.Tensor | None = None
    # (L+1, k): the share of the harmful prompts' offsets from the harmless mean along each subspace row.
    subspace_energy: torch.Tensor | None = None
    # (L+1, d): mean complied minus mean refused harmful residual (CAA adds a multiple of it); not unit.
    compliance: torch.Tensor | None = None
    # (L, n_heads): each attention head's refusal attribution (abliterate.core.heads).
    head_scores: torch.Tensor | None = None
    # (L+1,): factor block l's edit weight is multiplied by, at row l+1 (abliterate.core.calibration).
    calibration: torch.Tensor | None = None
    # (L+1, d) unit rows: the helpfulness direction kept out of every edit, or None.
    helpfulness: torch.Tensor | None = None
    # (L+1,): the supervised probe's cross-validated accuracy per residual (DIRECTION_METHOD_PROBE).
    probe_accuracy: torch.Tensor | None = None

    @property
    def n_directions(self) -> int:
        return 1 if self.subspace is None else self.subspace.shape[1]

    @property
    def n_residuals(self) -> int:
        return self.refusal.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.refusal.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"refusal": self.refusal, "good_mean": self.good_mean, "bad_mean": self.bad_mean}
        if self.sacred is not None:
            out["sacred"] = self.sacred
        if self.refusal_raw is not None:
            out["refusal_raw"] = self.refusal_raw
        if self.subspace is not None:
            out["subspace"] = self.subspace
            if self.subspace_energy is not None:
                out["subspace_energy"] = self.subspace_energy
        for key in OPTIONAL_TENSORS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.diagnostics:
            out["diagnostics"] = torch.tensor(  # (L+1, 4)
                [
                    [
                        d.mean_diff_norm,
                        d.cosine_of_means,
                        d.separation,
                        float("nan") if d.sacred_overlap is None else d.sacred_overlap,
                    ]
                    for d in self.diagnostics
                ],
                dtype=torch.float32,
            )
        return {k: v.contiguous().float() for k, v in out.items()}

    def to_bytes(self) -> bytes:
        return canonical_safetensors(st_save(self.tensors(), metadata={k: str(v) for k, v in self.metadata.items()}))

    @staticmethod
    def artifact_id(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DirectionSet":
        try:
            tensors = st_load(data)
        except Exception as exc:
            raise InvalidArgument(f"direction set is not valid safetensors data: {exc}") from exc
        metadata = read_metadata(data)
        for key in ("refusal", "good_mean", "bad_mean"):
            if key not in tensors:
                raise InvalidArgument(f"direction set lacks the {key!r} tensor")
        refusal = tensors["refusal"]
        if refusal.dim() != 2:
            raise InvalidArgument(f"refusal directions must be 2-D (layers+1, hidden), got {list(refusal.shape)}")
        if not torch.isfinite(refusal).all():
            raise InvalidArgument("refusal directions contain NaN or Inf")
        for key in ("good_mean", "bad_mean", "refusal_raw"):
            if key in tensors and tuple(tensors[key].shape) != tuple(refusal.shape):
                raise InvalidArgument(
                    f"{key} must have the refusal directions' shape {list(refusal.shape)}, "
                    f"got {list(tensors[key].shape)}"
                )
        subspace = tensors.get("subspace")
        if subspace is not None:
            if subspace.dim() != 3 or subspace.shape[0] != refusal.shape[0] or subspace.shape[2] != refusal.shape[1]:
                raise InvalidArgument(
                    f"subspace must be 3-D ({refusal.shape[0]}, k, {refusal.shape[1]}), got {list(subspace.shape)}"
                )
            if not torch.isfinite(subspace).all():
                raise InvalidArgument("the subspace contains NaN or Inf")
            energy = tensors.get("subspace_energy")
            if energy is not None and tuple(energy.shape) != tuple(subspace.shape[:2]):
                raise InvalidArgument(
                    f"subspace_energy must have shape {list(subspace.shape[:2])}, got {list(energy.shape)}"
                )
        for key, shape_of in OPTIONAL_TENSORS.items():
            expected = shape_of(refusal.shape[0], refusal.shape[1])
            value = tensors.get(key)
            if value is None:
                continue
            if value.dim() != len(expected) or any(
                want is not None and have != want for have, want in zip(value.shape, expected)
            ):
                shown = ["n" if want is None else want for want in expected]
                raise InvalidArgument(f"{key} must have shape {shown}, got {list(value.shape)}")
            if not torch.isfinite(value).all():
                raise InvalidArgument(f"{key} contains NaN or Inf")
        diagnostics = []
        if "diagnostics" in tensors:
            shape = tuple(tensors["diagnostics"].shape)
            if shape != (refusal.shape[0], 4):
                # A row per residual index, four numbers each; anything else cannot be unpacked below.
                raise InvalidArgument(f"diagnostics must be 2-D ({refusal.shape[0]}, 4), got {list(shape)}")
            for row in tensors["diagnostics"].tolist():  # (L+1, 4)
                diagnostics.append(LayerDiagnostics(row[0], row[1], row[2], None if math.isnan(row[3]) else row[3]))
        return cls(
            refusal=refusal,
            good_mean=tensors["good_mean"],
            bad_mean=tensors["bad_mean"],
            diagnostics=diagnostics,
            sacred=tensors.get("sacred"),
            refusal_raw=tensors.get("refusal_raw"),
            metadata=metadata,
            subspace=subspace,
            subspace_energy=tensors.get("subspace_energy"),
            **{key: tensors.get(key) for key in OPTIONAL_TENSORS},
        )


# The method tensors a direction set may carry: name -> its shape from (L+1, d), None = any size.
OPTIONAL_TENSORS = {
    "compliance": lambda residuals, hidden: (residuals, hidden),
    "head_scores": lambda residuals, hidden: (residuals - 1, None),
    "calibration": lambda residuals, hidden: (residuals,),
    "helpfulness": lambda residuals, hidden: (residuals, hidden),
    "probe_accuracy": lambda residuals, hidden: (residuals,),
}


def project_off_harmless_mean(rows: torch.Tensor, good_mean: torch.Tensor) -> torch.Tensor:
    """``normalize(r - (r . g) g)`` per row with ``g = normalize(good_mean)``, in float64: what a projected set
    does to its directions (rows (L+1, d), good_mean (L+1, d))."""
    g = _normalize(good_mean.double())  # (L+1, d)
    r = rows.double()
    return _normalize(r - (r * g).sum(-1, keepdim=True) * g)  # (L+1, d) - (L+1, 1) * (L+1, d)


def refusal_directions(
    h_bad: torch.Tensor,
    h_good: torch.Tensor,
    projected: bool = True,
    winsorize_quantile: float | None = None,
    winsorize_scope: str = "per_prompt",
) -> DirectionSet:
    """Difference-of-means directions per residual index, with diagnostics."""
    if h_bad.dim() != 3 or h_good.dim() != 3 or h_bad.shape[1:] != h_good.shape[1:]:
        raise InvalidArgument(f"residual shapes do not match: {list(h_bad.shape)} vs {list(h_good.shape)}")
    if h_bad.shape[0] == 0 or h_good.shape[0] == 0:
        raise InvalidArgument("cannot compute directions from an empty prompt set")
    if winsorize_quantile is not None:
        both = winsorize(torch.cat([h_bad, h_good]), winsorize_quantile, winsorize_scope)  # (N_bad + N_good, L+1, d)
        h_bad, h_good = both[: h_bad.shape[0]], both[h_bad.shape[0] :]  # (N_bad, L+1, d), (N_good, L+1, d)
    mu_bad, mu_good = mean64(h_bad), mean64(h_good)  # (L+1, d) each, float64
    diff = mu_bad - mu_good  # (L+1, d)
    r = _normalize(diff)  # (L+1, d) unit rows
    if projected:
        r = project_off_harmless_mean(r, mu_good)  # (L+1, d)
    diagnostics = []
    for layer in range(r.shape[0]):
        p_bad = h_bad[:, layer].double() @ r[layer]  # (N_bad, d) @ (d,) -> (N_bad,)
        p_good = h_good[:, layer].double() @ r[layer]  # (N_good, d) @ (d,) -> (N_good,)
        pooled = math.sqrt(max((p_bad.var(unbiased=False) + p_good.var(unbiased=False)).item() / 2, EPS))
        cos = torch.nn.functional.cosine_similarity(mu_bad[layer], mu_good[layer], dim=0).item()
        diagnostics.append(
            LayerDiagnostics(
                mean_diff_norm=diff[layer].norm().item(),
                cosine_of_means=cos,
                separation=(p_bad.mean() - p_good.mean()).item() / pooled,
            )
        )
    return DirectionSet(
        refusal=r.float(),
        good_mean=mu_good.float(),
        bad_mean=mu_bad.float(),
        diagnostics=diagnostics,
        metadata={"projected": str(projected)},
    )


def sacred_directions(
    h_capability: torch.Tensor, h_baseline: torch.Tensor, k: int = 5, alpha: float = 1.0
) -> torch.Tensor:
    """Per layer, an orthonormal basis (k, d) of the capability subspace.

    The first vector is the normalized mean contrast (capability - baseline);
    the rest are the top eigenvectors of ``Cov_cap - alpha * Cov_base`` (the
    directions along which capability prompts vary more than baseline text).
    The set is orthonormalized by QR, so eigenvector signs do not matter: only
    the subspace is used.
    """
    if k < 1:
        raise InvalidArgument(f"number of sacred directions must be >= 1, got {k}")
    if h_capability.shape[0] < 2 or h_baseline.shape[0] < 2:
        raise InvalidArgument("sacred directions need at least 2 capability and 2 baseline prompts")
    if h_capability.shape[1:] != h_baseline.shape[1:]:
        raise InvalidArgument("capability and baseline residual shapes differ")
    d = h_capability.shape[2]
    k = min(k, d)
    cap, base = h_capability.double().transpose(0, 1), h_baseline.double().transpose(0, 1)  # (L+1, N, d)
    mu_cap, mu_base = cap.mean(1), base.mean(1)  # (L+1, d)
    cc, bc = cap - mu_cap[:, None], base - mu_base[:, None]  # (L+1, N, d) - (L+1, 1, d)
    # (L+1, d, N) @ (L+1, N, d) -> (L+1, d, d): one covariance difference per layer
    cov = cc.transpose(1, 2) @ cc / (cap.shape[1] - 1) - alpha * (bc.transpose(1, 2) @ bc / (base.shape[1] - 1))
    cov = (cov + cov.transpose(1, 2)) / 2  # (L+1, d, d)
    _, vecs = torch.linalg.eigh(cov)  # (L+1, d, d), eigenvector columns: ascending eigenvalues, batched over layers
    top = vecs[:, :, -(k - 1) :].transpose(1, 2) if k > 1 else vecs[:, :, :0].transpose(1, 2)  # (L+1, k-1, d)
    contrast = _normalize(mu_cap - mu_base)[:, None, :]  # (L+1, 1, d)
    basis = torch.cat([contrast, top], dim=1)  # (L+1, k, d)
    q, _ = torch.linalg.qr(basis.transpose(1, 2))  # (L+1, d, k) orthonormal columns
    return q.transpose(1, 2).float().contiguous()  # (L+1, k, d) orthonormal rows


def sacred_overlap(refusal: torch.Tensor, sacred: torch.Tensor) -> torch.Tensor:
    """Per layer: the norm of r's projection onto the sacred subspace (0 = disjoint, 1 = inside)."""
    coeffs = torch.einsum("lkd,ld->lk", sacred.double(), refusal.double())  # (L+1, k, d), (L+1, d) -> (L+1, k)
    return coeffs.norm(dim=1).float()  # (L+1,)


def remove_subspace(
    vectors: torch.Tensor, basis: torch.Tensor, what: str = "the refusal direction", first_index: int = 0
) -> torch.Tensor:
    """Project each row of ``vectors`` (n, d) off the span of its own orthonormal ``basis`` (n, k, d); unit rows.

    One projection ``v - B^T (B v)``, not k sequential Gram-Schmidt steps.
    Fails when nothing of a vector remains (``first_index`` numbers the rows
    in the message).
    """
    v, b = vectors.double(), basis.double()
    rest = v - torch.einsum("nk,nkd->nd", torch.einsum("nkd,nd->nk", b, v), b)  # B v: (n, k); B^T (B v): (n, d)
    norms = rest.norm(dim=1)  # (n,)
    dead = [i for i in range(len(norms)) if norms[i] < MIN_REMAINING_NORM]
    if dead:
        raise InvalidArgument(
            f"nothing of {what} remains after removing the protected subspace at residual indices "
            f"{[i + first_index for i in dead]} (remaining norm {norms[dead[0]].item():.2e}); use fewer sacred "
            "directions"
        )
    return _normalize(rest).float()


def joint_basis(sacred: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Per layer the sacred basis (L+1, k, d) plus one row for ``extra`` (L+1, d), if given.

    The extra row is ``extra``'s part orthogonal to the sacred subspace,
    normalized; where nothing of it remains (it lies in the subspace already)
    the row is zero, which the projection ``v - B^T (B v)`` ignores.
    """
    if extra is None:
        return sacred
    s, e = sacred.double(), extra.double()
    rest = e - torch.einsum("lk,lkd->ld", torch.einsum("lkd,ld->lk", s, e), s)  # (L+1, d)
    norms = rest.norm(dim=1, keepdim=True)  # (L+1, 1)
    row = torch.where(
        norms >= MIN_REMAINING_NORM * e.norm(dim=1, keepdim=True).clamp_min(EPS),
        rest / norms.clamp_min(EPS),
        torch.zeros_like(rest),
    )  # (L+1, d)
    return torch.cat([s, row[:, None, :]], dim=1).float().contiguous()  # (L+1, k+1, d)


def orthogonalize_against(refusal: torch.Tensor, sacred: torch.Tensor) -> torch.Tensor:
    """Project each r onto the orthogonal complement of its layer's subspace (orthonormal rows per layer).

    Index 0 (embeddings) is never used for editing, so it is projected but not checked.
    """
    blocks = remove_subspace(refusal[1:], sacred[1:], first_index=1)  # (L, d) off (L, k, d) -> (L, d)
    r0, s0 = refusal[:1].double(), sacred[:1].double()  # (1, d), (1, k, d)
    head = _normalize(r0 - torch.einsum("nk,nkd->nd", torch.einsum("nkd,nd->nk", s0, r0), s0)).float()  # (1, d)
    return torch.cat([head, blocks])  # (1, d) + (L, d) -> (L+1, d)


def protected_subspace(directions: DirectionSet) -> torch.Tensor | None:
    """Per layer the orthonormal basis an edit must leave alone: the sacred subspace and the helpfulness
    direction, plus the harmless mean when the set is projected (so protecting them cannot undo the
    projection). None when nothing is protected."""
    basis = None
    if directions.sacred is not None and directions.metadata.get("sacred_orthogonalized") == "True":
        basis = directions.sacred  # (L+1, k, d)
    if directions.helpfulness is not None:
        helpful = directions.helpfulness  # (L+1, d)
        basis = helpful[:, None, :].contiguous() if basis is None else joint_basis(basis, helpful)
    if basis is None:
        return None
    projected = directions.metadata.get("projected") == "True"
    return joint_basis(basis, directions.good_mean if projected else None)  # (L+1, k or k+1, d)


def protect_sacred(directions: DirectionSet, sacred: torch.Tensor) -> DirectionSet:
    """Attach sacred directions, the overlap report, and the orthogonalized refusal directions.

    For a projected set the refusal directions are orthogonalized against the
    sacred subspace and the harmless mean jointly: against the sacred subspace
    alone, ``r`` would regain a component along the harmless mean.
    """
    overlap = sacred_overlap(directions.refusal, sacred)  # (L+1,)
    for diag, value in zip(directions.diagnostics, overlap.tolist()):
        diag.sacred_overlap = value
    directions.sacred = sacred
    directions.refusal_raw = directions.refusal
    directions.metadata["sacred_orthogonalized"] = "True"
    directions.refusal = orthogonalize_against(directions.refusal, protected_subspace(directions))  # (L+1, d)
    return directions


def protect_helpfulness(directions: DirectionSet, h_helpful: torch.Tensor, h_unhelpful: torch.Tensor) -> torch.Tensor:
    """Helpfulness orthogonalization: remove ``h[l] = normalize(mean(H_helpful[l]) - mean(H_unhelpful[l]))``
    from every refusal direction (jointly with what is protected already) and keep it out of every edit.

    Returns the angle in degrees (L+1,) between each ``r`` before and after: how much of the refusal
    direction was really "helpfulness".
    """
    helpful = _normalize(mean64(h_helpful) - mean64(h_unhelpful)).float()  # (L+1, d)
    before = directions.refusal  # (L+1, d)
    if directions.refusal_raw is None:
        directions.refusal_raw = before
    directions.helpfulness = helpful
    directions.metadata["helpfulness_orthogonalized"] = "True"
    directions.refusal = orthogonalize_against(before, protected_subspace(directions))  # (L+1, d)
    cosines = (before.double() * directions.refusal.double()).sum(1).clamp(-1, 1)  # (L+1,)
    return torch.rad2deg(torch.arccos(cosines)).float()


def complete_basis(primary: torch.Tensor, extras: torch.Tensor, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, ``primary`` (n, d) unit followed by an orthonormal basis of what of ``extras`` (n, m, d) lies
    outside span(primary, protected (n, p, d)): (n, 1 + m, d).

    The primary row is kept as it is, so a subspace always contains the single-direction edit's ``r``.
    A row of ``extras`` with nothing left (within 1e-6 of its norm) becomes zero, which the joint
    projection ``v - U^T (U v)`` ignores.
    """
    p, e = primary.double(), extras.double()
    excluded = p[:, None, :] if protected is None else joint_basis(protected, primary).double()  # (n, q, d)
    rest = e - torch.einsum("nmq,nqd->nmd", torch.einsum("nmd,nqd->nmq", e, excluded), excluded)  # (n, m, d)
    q, upper = torch.linalg.qr(rest.transpose(1, 2))  # (n, d, m) orthonormal columns, (n, m, m)
    scale = e.norm(dim=2).clamp_min(EPS)  # (n, m)
    kept = upper.diagonal(dim1=1, dim2=2).abs() > 1e-6 * scale  # (n, m): a column with something left
    rows = q.transpose(1, 2) * kept[..., None]  # (n, m, d)
    return torch.cat([_normalize(p)[:, None, :], rows], dim=1).float().contiguous()  # (n, 1 + m, d)


def refusal_subspace(h_bad: torch.Tensor, h_good: torch.Tensor, directions: DirectionSet, k: int) -> DirectionSet:
    """Attach a k-direction subspace per residual to ``directions`` (built from the same residuals).

    Row 0 is the set's refusal direction ``r`` (projected and sacred-protected as the set is). The
    others are the top right singular vectors of the harmful prompts' offsets from the harmless mean,
    ``D = H_bad - mean(H_good)`` (N_bad, d) per residual, after the components along ``r`` and the
    protected subspace are taken out of ``D``: the directions of the harmful-vs-harmless shift that
    ``r`` misses. ``subspace_energy[l, j]``: the share of ``||D||^2`` along row j.
    """
    if k < 2:
        raise InvalidArgument(f"a subspace needs at least 2 directions, got {k}")
    n_bad = h_bad.shape[0]
    if n_bad < k:
        raise InvalidArgument(f"{k} subspace directions need at least {k} harmful prompts, got {n_bad}")
    offsets = h_bad.double().transpose(0, 1) - h_good.double().mean(0)[:, None, :]  # (L+1, N_bad, d)
    attach_subspace(offsets, directions, k)
    directions.metadata["direction_method"] = "subspace"
    directions.metadata["n_directions"] = str(k)
    return directions


def attach_subspace(offsets: torch.Tensor, directions: DirectionSet, k: int) -> DirectionSet:
    """Set ``directions.subspace`` (L+1, k, d): ``r``, then the top k-1 right singular vectors of what of
    ``offsets`` (L+1, M, d) lies outside span(r, protected subspace), orthonormal.

    ``offsets``: per residual, vectors whose span the edit should remove (the harmful prompts' offsets
    from the harmless mean; a concept cone's mean offsets). Each further row is signed so that the
    offsets' mean projects positively (the edit depends only on the span, the sign keeps it readable).
    ``subspace_energy[l, j]``: the share of ``||offsets[l]||^2`` along row j.
    """
    offsets = offsets.double()
    refusal = directions.refusal.double()  # (L+1, d)
    protected = protected_subspace(directions)
    if protected is None and directions.metadata.get("projected") == "True":
        # Projected directions leave the harmless mean alone; so do the extra ones.
        protected = _normalize(directions.good_mean.double())[:, None, :].float()  # (L+1, 1, d)
    excluded = joint_basis(protected, directions.refusal).double() if protected is not None else refusal[:, None, :]
    # (L+1, M, d) minus its part in the excluded span (L+1, q, d)
    rest = offsets - torch.einsum("lnq,lqd->lnd", torch.einsum("lnd,lqd->lnq", offsets, excluded), excluded)
    _, _, vh = torch.linalg.svd(rest, full_matrices=False)  # vh: (L+1, min(M, d), d), batched over residuals
    extras = vh[:, : k - 1]  # (L+1, k-1, d)
    mean_offset = rest.mean(1)  # (L+1, d)
    signs = torch.sign(torch.einsum("lmd,ld->lm", extras, mean_offset))  # (L+1, k-1)
    extras = extras * torch.where(signs == 0, torch.ones_like(signs), signs)[..., None]
    basis = complete_basis(directions.refusal, extras.float(), protected)  # (L+1, k, d)
    along = torch.einsum("lnd,lkd->lnk", offsets, basis.double())  # (L+1, M, k)
    energy = along.pow(2).sum(1) / offsets.pow(2).sum((1, 2))[:, None].clamp_min(EPS)  # (L+1, k)
    directions.subspace = basis
    directions.subspace_energy = energy.float()
    return directions


def subspace_basis(subspace: torch.Tensor, index: float, primary: torch.Tensor, protected=None) -> torch.Tensor:
    """The basis a global-scope subspace edit uses at every block: (L, k, d).

    ``primary`` (L, d): each block's global direction. The other rows are those of the residual the
    global direction starts from (``floor(index) + 1``, as in global_direction), completed per block
    against that block's primary and protected subspace (complete_basis).
    """
    extras = subspace[math.floor(index) + 1, 1:]  # (k-1, d)
    n_blocks = primary.shape[0]
    return complete_basis(primary, extras.expand(n_blocks, -1, -1), None if protected is None else protected[1:])


def global_direction(refusal: torch.Tensor, index: float) -> torch.Tensor:
    """Interpolate between block outputs: block i's output is residual i+1."""
    n_blocks = refusal.shape[0] - 1
    if not isinstance(index, (int, float)) or not math.isfinite(index):
        raise InvalidArgument(f"direction index must be a finite number, got {index!r}")
    if not 0 <= index <= n_blocks - 1:
        raise InvalidArgument(f"direction index {index} is outside [0, {n_blocks - 1}]")
    base = math.floor(index)
    frac = index - base
    lo = refusal[base + 1]  # (L+1, d) -> (d,)
    if frac == 0 or base + 2 > n_blocks:
        return _normalize(lo.double()).float()
    hi = refusal[base + 2]  # (d,)
    return _normalize(torch.lerp(lo.double(), hi.double(), frac)).float()  # (d,)


def neighbour_cosines(refusal: torch.Tensor) -> list[float]:
    """cos(r_i, r_{i+1}) for each residual but the last: refusal (L+1, d) -> L values."""
    return F.cosine_similarity(refusal[:-1].float(), refusal[1:].float(), dim=-1).tolist()  # (L,)

"""Supervised linear probes for refusal, labelled by what the model actually replies.

Labels: each prompt's greedy reply, through the chat template as every other
probe of the project renders it, judged by the marker refusal judge
(:func:`generation_labels`); True = refused. The residuals of the refused and
the complied prompts are then the two classes, whatever set the prompts came
from.

Probe, per residual index l (0 = embeddings, l+1 = block l's output): a
logistic regression on standardized features ``x' = (x - mu) / sigma``
separating refused (class 1) from complied (class 0), class-balanced. Its
decision function is ``coef . x' + b = (coef / sigma) . x + (b - coef . (mu / sigma))``,
so the probe's normal in residual space is ``w = coef / sigma`` (a feature
with ``sigma = 0`` has ``sigma`` taken as 1: it is constant, its ``x'`` is 0
and its weight irrelevant), normalized, and signed so that
``w . (mean(refused) - mean(complied)) >= 0``. Quality: the stratified k-fold
cross-validated balanced accuracy per layer (the mean of the two classes'
recalls, so a lopsided split cannot score above 0.5 by always answering the
larger class).

Ensemble: ``normalize(a * sign * w_probe + (1 - a) * r_mean)`` per row, where
``sign`` flips the probe direction to agree with the difference-of-means
direction ``r_mean``.

Compliance vectors (for contrastive activation addition, which adds them with
a strength): ``c[l] = mean(H_complied[:, l]) - mean(H_refused[:, l])``, not
normalized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from abliterate.core.audit import audit_replies
from abliterate.core.directions import EPS, _normalize, mean64
from abliterate.core.loading import LoadedModel
from abliterate.core.reasoning import special_token_strings
from abliterate.core.refusals import RefusalDetector
from abliterate.errors import FailedPrecondition, InvalidArgument

#: Tokens of each labelling reply: the search's refusal probes read this many, so a label means what
#: the search's refusal count means.
DEFAULT_LABEL_TOKENS = 30
#: Iterations of lbfgs per probe: on standardized features it converges in far fewer.
MAX_PROBE_ITERATIONS = 1000


@dataclass
class GenerationLabels:
    """One label per prompt, in prompt order: ``refused`` (N,) bool, and the judged replies' final answers."""

    refused: torch.Tensor
    replies: list[str]

    @property
    def n_refused(self) -> int:
        return int(self.refused.sum())

    @property
    def n_complied(self) -> int:
        return len(self.replies) - self.n_refused


def generation_labels(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = DEFAULT_LABEL_TOKENS,
    batch_size: int = 16,
    detector: RefusalDetector | None = None,
) -> GenerationLabels:
    """Greedy replies of ``lm`` to ``prompts``, judged by the marker judge of ``detector`` (default markers).

    Generation and judging are the long-reply audit's (:func:`audit_replies`)
    with no minimum length: whole replies of up to ``max_new_tokens`` tokens,
    decoded with special tokens kept and judged on their final answer. A reply
    the judge calls degenerate counts as complied (it is no refusal).
    """
    if not prompts:
        raise InvalidArgument("generation labels need at least one prompt")
    if max_new_tokens < 1:
        raise InvalidArgument(f"generation labels need max_new_tokens >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise InvalidArgument(f"generation labels need batch_size >= 1, got {batch_size}")
    detector = detector or RefusalDetector()
    if not detector.special_tokens:
        # Replies are decoded with special tokens kept: the detector removes this tokenizer's, as the search's does.
        detector = replace(detector, special_tokens=tuple(special_token_strings(lm.tokenizer)))
    audit = audit_replies(
        lm, list(prompts), min_new_tokens=0, max_new_tokens=max_new_tokens, detector=detector, batch_size=batch_size
    )
    refused = torch.tensor([reply.verdict.counts_as_refusal for reply in audit.replies], dtype=torch.bool)  # (N,)
    return GenerationLabels(refused=refused, replies=[reply.reply for reply in audit.replies])


@dataclass
class ProbeResult:
    """Per residual index: the probe's unit normal in residual space and its cross-validated balanced accuracy.

    ``directions``: (L+1, d) float32, unit rows pointing towards refusal (a zero
    row where the probe put no weight on any feature, e.g. embeddings that are
    the same for every prompt). ``accuracies``: (L+1,) float64.
    """

    directions: torch.Tensor
    accuracies: torch.Tensor
    n_refused: int
    n_complied: int
    folds: int

    @property
    def checked_accuracy(self) -> float:
        """The accuracy :func:`probe_directions` holds against ``min_accuracy``: the middle third's mean."""
        return float(self.accuracies[middle_third(self.accuracies.shape[0])].mean())


def middle_third(n_residuals: int) -> slice:
    """The residual indices of the middle third of the blocks (at least one), where refusal is most separable.

    Block outputs are indices 1..L; for L = 30 that is 11..20. A mean over
    several layers, unlike the best single layer, does not rise above chance
    by picking the luckiest of many noisy layers.
    """
    n_blocks = n_residuals - 1
    first = 1 + n_blocks // 3
    stop = max(first + 1, 1 + (2 * n_blocks) // 3)
    return slice(first, stop)


def _check_pair(refused: torch.Tensor, complied: torch.Tensor, min_class: int, what: str) -> None:
    if refused.dim() != 3 or complied.dim() != 3 or refused.shape[1:] != complied.shape[1:]:
        raise InvalidArgument(
            f"refused and complied residuals must both be (N, L+1, d) with the same L+1 and d; "
            f"got {list(refused.shape)} and {list(complied.shape)}"
        )
    n_refused, n_complied = refused.shape[0], complied.shape[0]
    if n_refused < min_class or n_complied < min_class:
        raise InvalidArgument(
            f"{what} needs at least {min_class} refused and {min_class} complied prompts; got {n_refused} refused "
            f"and {n_complied} complied (use more prompts, or prompts the model answers both ways)"
        )
    if not (torch.isfinite(refused).all() and torch.isfinite(complied).all()):
        raise InvalidArgument("residuals contain NaN or Inf")


def _probe(seed: int) -> Pipeline:
    """A fresh standardize-then-logistic-regression pipeline (balanced classes, fixed seed)."""
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", solver="lbfgs", max_iter=MAX_PROBE_ITERATIONS, random_state=seed),
    )


def probe_directions(
    refused: torch.Tensor,
    complied: torch.Tensor,
    folds: int = 5,
    min_class: int = 8,
    min_accuracy: float = 0.6,
    seed: int = 0,
) -> ProbeResult:
    """A logistic-regression probe per residual index: ``refused`` (N1, L+1, d) against ``complied`` (N0, L+1, d).

    Cross-validation uses ``min(folds, smallest class)`` stratified, shuffled
    folds (seeded); the direction comes from a refit on all prompts. Raises
    InvalidArgument when a class has fewer than ``min_class`` prompts and
    FailedPrecondition when the probe is at chance: the mean accuracy over the
    middle third of the blocks (:func:`middle_third`) below ``min_accuracy``.
    """
    if not isinstance(min_accuracy, (int, float)) or not 0 <= min_accuracy <= 1:
        raise InvalidArgument(f"min_accuracy must be in [0, 1], got {min_accuracy!r}")
    if folds < 2:
        raise InvalidArgument(f"cross-validation needs at least 2 folds, got {folds}")
    _check_pair(refused, complied, max(min_class, 2), "the probe")
    n_refused, n_complied = refused.shape[0], complied.shape[0]
    n_residuals = refused.shape[1]
    if n_residuals < 2:
        raise InvalidArgument(f"residuals must hold the embeddings and at least one block, got L+1 = {n_residuals}")
    folds = min(folds, n_refused, n_complied)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = np.concatenate([np.ones(n_refused, dtype=np.int64), np.zeros(n_complied, dtype=np.int64)])  # (N,)
    toward_refusal = mean64(refused) - mean64(complied)  # (L+1, d)
    directions = torch.zeros(refused.shape[1:], dtype=torch.float64)  # (L+1, d)
    accuracies = torch.zeros(n_residuals, dtype=torch.float64)  # (L+1,)
    # One thread for BLAS and OpenMP: a fit on ~128 rows is too small to share, and on busy cores the threads'
    # hand-offs made each fit about 5x slower (2 CPU cores: 55 ms against 11 ms at d = 576).
    with threadpool_limits(limits=1):
        for layer in range(n_residuals):
            features = torch.cat([refused[:, layer], complied[:, layer]]).double().numpy()  # (N1 + N0, d)
            scores = cross_val_score(_probe(seed), features, labels, cv=splitter, scoring="balanced_accuracy")
            accuracies[layer] = float(scores.mean())
            probe = _probe(seed).fit(features, labels)
            scaler, regression = probe[0], probe[-1]
            # StandardScaler already reports 1 for a constant feature; guard anyway, a zero would divide by zero.
            sigma = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)  # (d,)
            normal = _normalize(torch.from_numpy(regression.coef_[0] / sigma))  # (d,): coef / sigma, unit
            if torch.dot(normal, toward_refusal[layer]) < 0:
                normal = -normal
            directions[layer] = normal
    result = ProbeResult(
        directions=directions.float(),
        accuracies=accuracies,
        n_refused=n_refused,
        n_complied=n_complied,
        folds=folds,
    )
    checked = result.checked_accuracy
    if checked < min_accuracy:
        window = middle_third(n_residuals)
        raise FailedPrecondition(
            f"the refusal probe is at chance: its mean cross-validated balanced accuracy over residual indices "
            f"{window.start}..{window.stop - 1} is {checked:.3f}, below {min_accuracy} (best layer "
            f"{int(accuracies.argmax())}: {accuracies.max().item():.3f}; {n_refused} refused and {n_complied} "
            f"complied prompts): the residuals do not separate the replies the model refused"
        )
    return result


def ensemble_directions(probe: torch.Tensor, mean_difference: torch.Tensor, probe_weight: float = 0.5) -> torch.Tensor:
    """Per row ``normalize(a * s * p + (1 - a) * m)``: probe (L+1, d) and mean-difference (L+1, d) directions.

    Both inputs are normalized first, so ``a = probe_weight`` weighs
    directions, not their lengths; ``s = -1`` where the probe row points away
    from the mean-difference row (a probe's sign is arbitrary, the mean
    difference's is not). Returns (L+1, d) float32.
    """
    if isinstance(probe_weight, bool) or not isinstance(probe_weight, (int, float)):
        raise InvalidArgument(f"probe_weight must be a number in [0, 1], got {probe_weight!r}")
    if not math.isfinite(probe_weight) or not 0 <= probe_weight <= 1:
        raise InvalidArgument(f"probe_weight must be in [0, 1], got {probe_weight}")
    if probe.dim() != 2 or probe.shape != mean_difference.shape:
        raise InvalidArgument(
            f"probe and mean-difference directions must both be (L+1, d); "
            f"got {list(probe.shape)} and {list(mean_difference.shape)}"
        )
    probe_rows, mean_rows = _normalize(probe.double()), _normalize(mean_difference.double())  # (L+1, d) each
    agreement = (probe_rows * mean_rows).sum(-1, keepdim=True)  # (L+1, 1)
    aligned = torch.where(agreement < 0, -probe_rows, probe_rows)  # (L+1, d)
    return _normalize(probe_weight * aligned + (1 - probe_weight) * mean_rows).float()  # (L+1, d)


def compliance_vectors(complied: torch.Tensor, refused: torch.Tensor) -> torch.Tensor:
    """``mean(complied) - mean(refused)`` per residual index: (N0, L+1, d), (N1, L+1, d) -> (L+1, d) float32.

    Not normalized: activation addition scales it by a strength of its own.
    Means in float64.
    """
    _check_pair(refused, complied, 1, "a compliance vector")
    return (mean64(complied) - mean64(refused)).float()  # (L+1, d)


def compliance_overlap(compliance: torch.Tensor, refusal: torch.Tensor) -> torch.Tensor:
    """Cosine of each compliance row with its refusal row: (L+1, d), (L+1, d) -> (L+1,) float32 in [-1, 1].

    Near -1: steering towards compliance is removing refusal; near 0: it moves something else. A zero row gives 0.
    """
    if compliance.dim() != 2 or compliance.shape != refusal.shape:
        raise InvalidArgument(
            f"compliance and refusal directions must both be (L+1, d); "
            f"got {list(compliance.shape)} and {list(refusal.shape)}"
        )
    cosines = F.cosine_similarity(compliance.double(), refusal.double(), dim=-1, eps=EPS)  # (L+1,)
    return cosines.clamp(-1.0, 1.0).float()  # rounding can step past +-1

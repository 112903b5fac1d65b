"""Attention heads as a refusal circuit: per-head attribution along r, and head-level ablation.

The attention out-projection of block l is linear, and its input is the
concatenation of the ``n_heads`` per-head outputs ``z_h`` (``head_dim`` wide
each, in head order; grouped-query attention shares keys and values between
heads, not outputs, so the width is ``n_heads * head_dim`` there too, and it
may differ from the hidden size, as in Qwen3 and Gemma)::

    o = W_o z + b = sum_h W_o[:, cols_h] z_h + b,   cols_h = h*head_dim ... (h+1)*head_dim - 1

so the block's attention writes along the refusal direction ``r`` of the
residual it produces (index l+1) exactly the sum of one number per head plus
the bias's share::

    r . o = sum_h c_{l,h} + r . b,   c_{l,h} = r . (W_o[:, cols_h] z_h) = (r^T W_o[:, cols_h]) . z_h

The attribution score of head (l, h) is the mean of ``c_{l,h}`` at the last
prompt token over harmful prompts minus the same mean over harmless prompts:
the head's share of the mean difference along ``r`` (signed; large positive =
the head writes refusal). ``r . b`` is the same for every prompt, so it drops
out of the difference and belongs to no head.

Ablating head h of block l edits only that head's columns,
``W_o[:, cols_h] <- W_o[:, cols_h] - w r (r^T W_o[:, cols_h])``: at w = 1
``r^T W_o[:, cols_h] = 0``, so the head's ``c_{l,h}`` is 0 for every input
while every other head's columns, and so its contribution, are untouched. The
bias is not edited: it is not any head's output (it is added whatever the
heads compute), so removing its part along r is a whole-matrix edit
(``abliterate.core.ablation``), not a head's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from abliterate.core.batching import run_batched
from abliterate.core.generation import prefill
from abliterate.core.loading import LoadedModel
from abliterate.core.modules import ATTN, ModuleMap, discover, find_decoder_layers
from abliterate.core.reasoning import scoring_prompts
from abliterate.errors import FailedPrecondition, InvalidArgument, UnsupportedArchitecture


class HeadLayout(NamedTuple):
    """How the out-projection's input splits into heads (unpacks as ``n_heads, head_dim``)."""

    n_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """The out-projection's input width."""
        return self.n_heads * self.head_dim

    def columns(self, head: int) -> slice:
        """The input columns of the out-projection that read head ``head``'s output."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def out_projections(model: nn.Module, module_map: ModuleMap | None = None) -> list[nn.Linear]:
    """Every block's attention out-projection, as the ``nn.Linear`` whose input is the heads' outputs.

    Found through module discovery (component ``attn.o_proj``); a block with none, with more than
    one, or with one that is not a plain linear layer cannot be split into heads.
    """
    module_map = module_map or discover(model)
    blocks = find_decoder_layers(model, module_map.n_layers)
    arch = module_map.architecture
    projections = []
    for layer, (block, components) in enumerate(zip(blocks, module_map.layers)):
        matrices = components.get(ATTN, [])
        if len(matrices) != 1:
            found = [m.name for m in matrices]
            raise UnsupportedArchitecture(
                f"{arch}: head attribution needs exactly one attention out-projection per block; "
                f"layer {layer} has {len(matrices)} {found}"
            )
        module = block.get_submodule(matrices[0].name)
        if type(module) is not nn.Linear or module.weight is not matrices[0].param:
            # Quantized and other linear-like layers do not store W_o as a plain (out, in) matrix.
            raise UnsupportedArchitecture(
                f"{arch}: the attention out-projection {matrices[0].name} of layer {layer} is a "
                f"{type(module).__name__}, not an nn.Linear; its columns cannot be split into heads"
            )
        projections.append(module)
    return projections


def head_layout(model: nn.Module, module_map: ModuleMap | None = None) -> HeadLayout:
    """``(n_heads, head_dim)`` from the config, checked against every block's out-projection width."""
    config = _text_config(model)
    n_heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not n_heads or not hidden:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: the config has no num_attention_heads / hidden_size to split heads by"
        )
    # Qwen3 and Gemma set head_dim explicitly (n_heads * head_dim != hidden); others derive it.
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    layout = HeadLayout(int(n_heads), int(head_dim))
    for layer, projection in enumerate(out_projections(model, module_map)):
        if projection.in_features != layout.width:
            raise UnsupportedArchitecture(
                f"{type(model).__name__}: the attention out-projection of layer {layer} reads "
                f"{projection.in_features} inputs, but the config's {layout.n_heads} heads x head_dim "
                f"{layout.head_dim} = {layout.width}"
            )
    return layout


def _readout(weight: torch.Tensor, r: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """``r^T W`` (in,) split per head, (n_heads, head_dim) float32: a head's c is its dot product with z_h."""
    readout = r.to(device=weight.device, dtype=torch.float32) @ weight.float()  # (out,) @ (out, in) -> (in,)
    return readout.view(layout.n_heads, layout.head_dim)


def per_head_contributions(
    inputs: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, layout: HeadLayout
) -> torch.Tensor:
    """``c_h = (r^T W[:, cols_h]) . z_h`` for each row of ``inputs``: (N, n_heads) float32.

    ``inputs`` (N, n_heads * head_dim): out-projection inputs; ``weight`` (out, n_heads * head_dim);
    ``r`` (out,). The bias is not included (it is no head's).
    """
    per_head = _readout(weight, r, layout)  # (n_heads, head_dim)
    z = inputs.to(device=weight.device, dtype=torch.float32).view(-1, layout.n_heads, layout.head_dim)
    return (z * per_head).sum(-1)  # (N, n_heads, head_dim) * (n_heads, head_dim) -> (N, n_heads)


def _check_refusal(refusal: torch.Tensor, n_layers: int, hidden: int) -> None:
    if refusal.dim() != 2 or tuple(refusal.shape) != (n_layers + 1, hidden):
        raise FailedPrecondition(
            f"refusal directions must be ({n_layers + 1}, {hidden}) for this model, got {list(refusal.shape)}"
        )
    if not torch.isfinite(refusal).all():
        raise InvalidArgument("refusal directions contain NaN or Inf")


def head_contributions(
    lm: LoadedModel,
    prompts: list[str],
    refusal: torch.Tensor,
    batch_size: int = 0,
    system_prompt: str | None = None,
    module_map: ModuleMap | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Every head's ``c_{l,h}`` at the last prompt token of each prompt: (N, L, n_heads) float32 on the CPU.

    Prompts are formatted as :func:`abliterate.core.residuals.collect_residuals` formats them (chat
    template, response prefix, left padding, so position -1 is the last prompt token), so the
    numbers add up along the same residuals the directions were taken from. Block l uses
    ``refusal[l + 1]`` (L+1, d), the residual it writes. The model is read as it is now: reset
    any ablation first to attribute the original weights.
    """
    if not prompts:
        raise InvalidArgument("cannot attribute heads on an empty prompt set")
    projections = out_projections(lm.model, module_map)
    layout = head_layout(lm.model, module_map)
    n_layers = len(projections)
    _check_refusal(refusal, n_layers, lm.hidden_size)
    with torch.no_grad():
        # Once per block, not per batch: L tensors (n_heads, head_dim).
        readouts = [_readout(p.weight, refusal[layer + 1], layout) for layer, p in enumerate(projections)]
    texts = scoring_prompts(lm, prompts, system_prompt)
    # Longest first keeps padding waste low within a batch; the order is restored below.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))

    def run(chunk: Sequence[str]) -> list[torch.Tensor]:
        captured: list[torch.Tensor | None] = [None] * n_layers
        armed = False

        def capture(layer: int):
            def hook(_module, inputs):
                if armed:
                    z = inputs[0][:, -1, :].float().view(-1, layout.n_heads, layout.head_dim)  # (B, n_heads, hd)
                    readout = readouts[layer].to(z.device)  # (n_heads, head_dim)
                    captured[layer] = (z * readout).sum(-1).cpu()  # (B, n_heads)

            return hook

        @contextmanager
        def around_tail():
            # prefill may first run a shared chat prefix at batch size 1; only the rows' pass counts.
            nonlocal armed
            armed = True
            try:
                yield
            finally:
                armed = False

        handles = [p.register_forward_pre_hook(capture(layer)) for layer, p in enumerate(projections)]
        try:
            with torch.inference_mode():
                prefill(lm, list(chunk), around_tail=around_tail)
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer for layer, c in enumerate(captured) if c is None]
        if missing:
            raise UnsupportedArchitecture(f"the attention out-projection of layers {missing} never ran")
        return list(torch.stack(captured, dim=1))  # (B, L, n_heads) -> B rows (L, n_heads)

    rows = run_batched([texts[i] for i in order], run, batch_size=batch_size, progress=progress).results
    result = torch.empty((len(texts), n_layers, layout.n_heads), dtype=torch.float32)  # (N, L, n_heads)
    for slot, i in enumerate(order):
        result[i] = rows[slot]  # (L, n_heads)
    if not torch.isfinite(result).all():
        raise InvalidArgument("head contributions contain NaN or Inf: the model's dtype cannot represent them")
    return result


def head_scores(
    lm: LoadedModel,
    harmful_prompts: list[str],
    harmless_prompts: list[str],
    refusal: torch.Tensor,
    batch_size: int = 0,
    system_prompt: str | None = None,
    module_map: ModuleMap | None = None,
) -> torch.Tensor:
    """Per head, mean ``c_{l,h}`` over harmful prompts minus the mean over harmless ones: (L, n_heads) float32.

    Summed over a block's heads it is the mean difference along ``refusal[l + 1]`` of what the
    block's attention writes (the bias cancels in the difference).
    """
    if not harmful_prompts or not harmless_prompts:
        raise InvalidArgument("head scores need at least one harmful and one harmless prompt")
    harmful = head_contributions(lm, harmful_prompts, refusal, batch_size, system_prompt, module_map)  # (N_bad, L, H)
    harmless = head_contributions(
        lm, harmless_prompts, refusal, batch_size, system_prompt, module_map
    )  # (N_good, L, H)
    # Means in float64, as for the directions: many prompts of similar size.
    return (harmful.double().mean(0) - harmless.double().mean(0)).float()  # (L, n_heads)


def top_heads(scores: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The ``count`` heads with the highest scores, highest first, as (layer, head).

    Ties go to the lower (layer, head), so the choice does not depend on the sort's stability.
    """
    if scores.dim() != 2:
        raise InvalidArgument(f"head scores must be 2-D (layers, heads), got {list(scores.shape)}")
    total = scores.numel()
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise InvalidArgument(f"number of heads must be an integer in [1, {total}], got {count!r}")
    if not torch.isfinite(scores).all():
        raise InvalidArgument("head scores contain NaN or Inf")
    n_heads = scores.shape[1]
    values = scores.flatten().tolist()  # (L * n_heads,), index = layer * n_heads + head
    ranked = sorted(range(total), key=lambda i: (-values[i], i))
    return [divmod(i, n_heads) for i in ranked[:count]]


def edit_head_columns(
    weight: torch.Tensor,
    heads: list[int],
    head_dim: int,
    r: torch.Tensor,
    w: float | Sequence[float],
) -> torch.Tensor:
    """The edited copy of an out-projection ``weight`` (out, n_heads * head_dim): each listed head's columns
    ``W[:, cols_h] <- W[:, cols_h] - w r (r^T W[:, cols_h])``; every other column bit for bit as it was.

    ``r``: a unit direction (out,) with weight ``w``, or orthonormal rows (k, out) with weights ``w``
    (k,) (the joint projection, as :func:`abliterate.core.ablation.edit_matrix`). Computed in float32
    and cast back to the weight's dtype. The bias is not an argument: it is no head's (module docstring).
    """
    if weight.dim() != 2:
        raise InvalidArgument(f"an out-projection weight must be 2-D (out, in), got {list(weight.shape)}")
    out_features, in_features = weight.shape
    if head_dim < 1 or in_features % head_dim:
        raise InvalidArgument(f"input width {in_features} is not a whole number of heads of size {head_dim}")
    n_heads = in_features // head_dim
    bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n_heads]
    if bad:
        raise InvalidArgument(f"head indices {bad} are outside [0, {n_heads - 1}]")
    if len(set(heads)) != len(heads):
        # A repeated head would be projected twice, which at w != 1 is a different edit.
        raise InvalidArgument(f"head indices repeat: {heads}")
    if r.shape[-1] != out_features or r.dim() not in (1, 2):
        raise InvalidArgument(f"direction must be ({out_features},) or (k, {out_features}), got {list(r.shape)}")
    layout = HeadLayout(n_heads, head_dim)
    rf = r.to(device=weight.device, dtype=torch.float32)
    if rf.dim() == 2:
        weights = torch.as_tensor(w, dtype=torch.float32, device=weight.device)  # (k,)
        if weights.shape != (rf.shape[0],):
            raise InvalidArgument(f"{rf.shape[0]} directions need {rf.shape[0]} weights, got {list(weights.shape)}")
    elif not math.isfinite(float(w)):
        raise InvalidArgument(f"weight must be finite, got {w!r}")
    edited = weight.clone()
    for head in heads:
        cols = weight[:, layout.columns(head)].float()  # (out, head_dim)
        if rf.dim() == 2:
            coefficients = (rf @ cols) * weights[:, None]  # (k, out) @ (out, head_dim) -> (k, head_dim), weighted
            new = cols - rf.transpose(0, 1) @ coefficients  # (out, k) @ (k, head_dim) -> (out, head_dim)
        else:
            new = cols - w * rf[:, None] * (rf @ cols)[None, :]  # (out, 1) * (1, head_dim) -> (out, head_dim)
        edited[:, layout.columns(head)] = new.to(weight.dtype)
    return edited


def apply_head_ablation(
    module_map: ModuleMap,
    heads: Sequence[tuple[int, int]],
    refusal_per_block: Sequence[torch.Tensor],
    w: float,
    head_dim: int,
) -> int:
    """Edit the listed (layer, head) columns of the live out-projections in place; returns the matrices edited.

    ``refusal_per_block[l]`` (d,): the direction block l's edit removes (``refusal[l + 1]``). Keeps no
    originals: a caller that must undo the edit copies the weights first.
    """
    if len(refusal_per_block) != module_map.n_layers:
        raise InvalidArgument(f"need one direction per block ({module_map.n_layers}), got {len(refusal_per_block)}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= layer < module_map.n_layers:
            raise InvalidArgument(f"layer {layer} is outside [0, {module_map.n_layers - 1}]")
        by_layer.setdefault(layer, []).append(head)
    updates = []
    for layer, layer_heads in sorted(by_layer.items()):
        matrices = module_map.layers[layer].get(ATTN, [])
        if len(matrices) != 1 or matrices[0].param.dim() != 2 or matrices[0].out_axis != 0:
            raise UnsupportedArchitecture(f"layer {layer} has no single (out, in) attention out-projection")
        param = matrices[0].param
        new = edit_head_columns(param.data, layer_heads, head_dim, refusal_per_block[layer], w)
        if not torch.isfinite(new).all():
            raise InvalidArgument(f"the head edit made {matrices[0].name} of layer {layer} non-finite")
        updates.append((param, new))
    # Written only once every edit is computed and finite, so a failure leaves the model as it was.
    with torch.no_grad():
        for param, new in updates:
            param.data.copy_(new)
    return len(updates)

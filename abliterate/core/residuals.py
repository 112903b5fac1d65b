"""Residual-stream activations at the last prompt token, for every layer.

Shape (N, L+1, d): index 0 is the embedding output, index l+1 block l's
raw output (the last one too: transformers' last hidden state has the final
norm applied, so block L-1's output is taken from the block itself). Prompts
are left-padded so position -1 is always the last prompt token. Activations
are upcast to float32 on the CPU; means are taken in float64.
"""

from __future__ import annotations

from typing import Callable

import torch

from abliterate.core.batching import run_batched
from abliterate.core.chat import encode  # noqa: F401 (re-exported)
from abliterate.core.generation import prefill
from abliterate.core.loading import LoadedModel
from abliterate.core.modules import find_decoder_layers
from abliterate.core.reasoning import scoring_prompts
from abliterate.errors import InvalidArgument


def _last_block(lm: LoadedModel) -> torch.nn.Module:
    block = lm.extra.get("last_decoder_block")
    if block is None:
        block = find_decoder_layers(lm.model, lm.n_layers)[-1]
        lm.extra["last_decoder_block"] = block
    return block


def last_token_residuals(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    """One forward pass over rendered texts: (B, L+1, d) float32 on the CPU."""
    captured: list[torch.Tensor] = []

    def keep_output(_module, _inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(hidden[:, -1, :])  # (B, d): the last block's output before the final norm

    hook = _last_block(lm).register_forward_hook(keep_output)
    try:
        with torch.inference_mode():
            out, _, _ = prefill(lm, list(texts), output_hidden_states=True)
    finally:
        hook.remove()
    # hidden_states: L+1 tensors (B, T, d); the first L are raw, the last is after the final norm.
    states = [h[:, -1, :] for h in out.hidden_states[:-1]] + [captured[-1]]  # L+1 tensors (B, d)
    return torch.stack(states, dim=1).float().cpu()  # (B, L+1, d)


def collect_residuals(
    lm: LoadedModel,
    prompts: list[str],
    batch_size: int = 0,
    system_prompt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Residuals of ``prompts`` formatted with the model's chat template."""
    if not prompts:
        raise InvalidArgument("cannot compute residuals of an empty prompt set")
    texts = scoring_prompts(lm, prompts, system_prompt)
    # Longest first keeps padding waste low within a batch; order is restored below.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    # batches: N rows (L+1, d), in that order.
    batches = run_batched(
        [texts[i] for i in order],
        lambda chunk: list(last_token_residuals(lm, chunk)),
        batch_size=batch_size,
        progress=progress,
    ).results
    result = torch.empty((len(texts),) + tuple(batches[0].shape), dtype=torch.float32)  # (N, L+1, d)
    for slot, i in enumerate(order):
        result[i] = batches[slot]  # (L+1, d)
    if not torch.isfinite(result).all():
        raise InvalidArgument("residuals contain NaN or Inf: the model's dtype cannot represent its activations")
    return result

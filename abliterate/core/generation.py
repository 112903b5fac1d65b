"""Greedy decoding with a KV cache and per-sequence early stop.

A sequence stops at EOS, at the token limit, or as soon as a caller-supplied
``decided(text)`` says its outcome is known (for refusal probes: a marker was
found). Finished sequences are dropped from the batch and from the cache, so
the remaining steps only pay for the sequences still running.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from abliterate.core.loading import LoadedModel
from abliterate.core.residuals import encode


@dataclass
class Generated:
    text: str
    tokens: int
    stopped_by: str  # "eos", "decided", "limit"


def eos_token_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _cache_argument(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _select(cache, keep: torch.Tensor) -> bool:
    """Drop finished rows from the cache; False if this cache type cannot."""
    try:
        cache.batch_select_indices(keep)
        return True
    except (AttributeError, NotImplementedError, TypeError, IndexError, RuntimeError):
        return False


def generate_greedy(
    lm: LoadedModel,
    texts: list[str],
    max_new_tokens: int,
    decided: Callable[[str], bool] | None = None,
) -> list[Generated]:
    """Greedy continuation of already-rendered prompts (one batch)."""
    model, tok = lm.model, lm.tokenizer
    enc = encode(tok, texts, lm.device, lm.spec.chat_template_mode)
    mask = enc["attention_mask"]
    eos = eos_token_ids(lm)
    n = len(texts)
    generated: list[list[int]] = [[] for _ in range(n)]
    stopped: list[str | None] = [None] * n
    active = torch.arange(n)
    compacting = True
    with torch.inference_mode():
        out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=_positions(mask),
                    use_cache=True, logits_to_keep=1)
        cache = _output_cache(out)
        cache_arg = _cache_argument(model)
        next_tokens = out.logits[:, -1, :].argmax(-1)
        for step in range(max_new_tokens):
            rows = active.tolist() if compacting else list(range(n))
            still = []
            for slot, seq in enumerate(rows):
                if stopped[seq] is not None:
                    continue
                token = int(next_tokens[slot])
                if token in eos:
                    stopped[seq] = "eos"
                    continue
                generated[seq].append(token)
                if decided is not None and decided(tok.decode(generated[seq], skip_special_tokens=True)):
                    stopped[seq] = "decided"
                    continue
                if step == max_new_tokens - 1:
                    stopped[seq] = "limit"
                    continue
                still.append(slot)
            if not still:
                break
            feed = next_tokens
            if compacting and len(still) < len(rows):
                keep = torch.tensor(still, device=mask.device)
                if _select(cache, keep):
                    active = active[keep.cpu()]
                    mask = mask[keep]
                    feed = next_tokens[keep]
                else:
                    compacting = False
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            out = model(input_ids=feed[:, None], attention_mask=mask,
                        position_ids=_positions(mask)[:, -1:], use_cache=True, **{cache_arg: cache})
            cache = _output_cache(out)
            next_tokens = out.logits[:, -1, :].argmax(-1)
    return [Generated(tok.decode(g, skip_special_tokens=True), len(g), s or "limit")
            for g, s in zip(generated, stopped)]


def stream_greedy(lm: LoadedModel, text: str, max_new_tokens: int) -> Iterator[str]:
    """Yield the text pieces of one greedy continuation as they are produced (chat)."""
    model, tok = lm.model, lm.tokenizer
    enc = encode(tok, [text], lm.device, lm.spec.chat_template_mode)
    mask = enc["attention_mask"]
    eos = eos_token_ids(lm)
    tokens: list[int] = []
    emitted = ""
    with torch.inference_mode():
        out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                    logits_to_keep=1)
        cache_arg = _cache_argument(model)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
            full = tok.decode(tokens, skip_special_tokens=True)
            # Hold back an incomplete multi-byte character until it is whole.
            if not full.endswith("\ufffd") and len(full) > len(emitted):
                yield full[len(emitted):]
                emitted = full
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=-1)
            out = model(input_ids=torch.tensor([[token]], device=mask.device), attention_mask=mask,
                        position_ids=_positions(mask)[:, -1:], use_cache=True, **{cache_arg: _output_cache(out)})

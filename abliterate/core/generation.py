"""Greedy decoding with a KV cache and per-sequence early stop.

A sequence stops at EOS, at the token limit, or as soon as a caller-supplied
``decided(text)`` says its outcome is known (for refusal probes: a marker was
found). Finished sequences are dropped from the batch and from the cache, so
the remaining steps only pay for the sequences still running.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers.cache_utils import DynamicLayer

from abliterate.core.chat import encode
from abliterate.core.kv_cache import PreallocatedLayer, preallocate
from abliterate.core.loading import LoadedModel
from abliterate.memory import release_free_memory


@dataclass
class Generated:
    text: str
    tokens: int
    stopped_by: str  # "eos", "decided", "limit"
    token_ids: list[int] = field(default_factory=list)  # the generated ids (EOS excluded)


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
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T) mask -> (B, T) position ids


def _select(cache, keep: torch.Tensor) -> bool:
    """Drop finished rows from the cache; False if this cache type cannot."""
    try:
        cache.batch_select_indices(keep)
        return True
    except (AttributeError, NotImplementedError, TypeError, IndexError, RuntimeError):
        return False


#: The cache layers a merge can pad: full attention, exactly these types (subclasses keep other state).
_MERGEABLE_LAYERS = (DynamicLayer, PreallocatedLayer)


def _plain_layers(cache) -> bool:
    """Every layer of ``cache`` is a filled full-attention layer of one of :data:`_MERGEABLE_LAYERS`."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in _MERGEABLE_LAYERS and layer.get_seq_length() > 0 for layer in layers)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros in front along ``dim`` up to ``width`` (itself when already that wide)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# Below this many shared tokens the extra prefix pass costs more than it saves.
MIN_SHARED_PREFIX = 8

_WINDOWED_LAYER_TYPES = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


def smallest_attention_window(model) -> int | None:
    """The smallest sliding or chunked attention window of any layer; None when every layer attends fully.

    transformers builds sliding-window and chunked masks from cache slots, not
    position ids, so padding between real tokens shifts what falls out of a
    window; callers use this to decide whether a layout with inner padding is
    still exact.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    windows = []
    if layer_types:
        for layer_type in set(layer_types):
            attribute = _WINDOWED_LAYER_TYPES.get(layer_type)
            if attribute is not None:
                windows.append(getattr(config, attribute, None))
    else:
        # Configs without layer types (Mistral, Mixtral, Phi-3): one window for every layer, if any.
        if getattr(config, "use_sliding_window", True) is not False:
            windows.append(getattr(config, "sliding_window", None))
        windows.append(getattr(config, "attention_chunk_size", None))
    windows = [int(w) for w in windows if w]
    return min(windows) if windows else None


def shared_prefix_length(model, rows: list[list[int]], keep_per_row: int = 1, reserve: int = 0) -> int:
    """How many leading tokens the rows of a batch can share in one prefix pass (0: no sharing).

    The prefix must leave ``keep_per_row`` tokens in every row (the positions
    whose logits are kept). The layout ``[prefix][pads][tail]`` puts padding
    between real tokens, which is exact for full attention but not for sliding
    or chunked windows, which count cache slots: there the prefix is shared
    only when the whole padded sequence, plus the ``reserve`` tokens that
    generation will append, fits the smallest window (then no window ever
    cuts anything off and the masks equal causal ones).
    """
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - max(1, keep_per_row)
    length = 0
    while length < limit and all(r[length] == first[length] for r in rows):
        length += 1
    if length < MIN_SHARED_PREFIX:
        return 0
    window = smallest_attention_window(model)
    if window is not None and max(len(r) for r in rows) + reserve > window:
        return 0
    return length


def kept_positions(width: int, logits_to_keep: int, device) -> torch.Tensor | int:
    """The last ``logits_to_keep`` of ``width`` positions, as the index tensor ``logits_to_keep`` also accepts.

    Given an int, transformers slices ``hidden[:, -k:]``, a strided view that
    ``F.linear`` runs as a batched matmul against the output head expanded to
    (B, d, V): 6x slower on a CPU than one matmul (32 rows x 49,152: 177 ms
    against 29 ms). Indexing gathers the rows into a contiguous tensor, so the
    head is one matmul. The logits differ in the last bits only (another
    accumulation order), and baseline and trials both come through here.
    0 (every position) stays 0: that slice is the whole, contiguous tensor.
    """
    if logits_to_keep <= 0:
        return 0
    return torch.arange(width - logits_to_keep, width, device=device)  # (k,)


def prefill(
    lm: LoadedModel,
    texts: list[str],
    extra: torch.Tensor | None = None,
    logits_to_keep: int = 1,
    output_hidden_states: bool = False,
    share_prefix: bool = True,
    reserve: int = 0,
    around_tail: Callable[[], AbstractContextManager] = nullcontext,
):
    """Forward pass over rendered prompts (plus optional appended token ids) with a KV cache.

    Chat prompts of one batch share a long prefix (template and system
    prompt). Where that is exact (see :func:`shared_prefix_length`; ``reserve``
    is the number of tokens generation will add to the cache) the prefix is run
    once at batch size 1 and its cache repeated for every row; each row's
    remainder is left-padded after it. The attention mask and position ids
    skip the padding, so the logits match a plain left-padded pass.
    ``around_tail()`` is a context entered for the forward over the rows
    (not the shared prefix's): :mod:`abliterate.core.layer_reuse` records or
    skips blocks there. Returns (model output, cache, attention mask).
    """
    model, tok = lm.model, lm.tokenizer
    rows = tok(list(texts), add_special_tokens=(lm.spec.chat_template_mode == "plain"))["input_ids"]
    if extra is not None:
        rows = [r + e for r, e in zip(rows, extra.tolist())]  # extra (B, k-1): scoring's continuation tokens
    n, device = len(rows), lm.device
    shared = shared_prefix_length(model, rows, logits_to_keep, reserve) if share_prefix else 0
    cache_arg = _cache_argument(model)
    cache = None
    if shared:
        # The prefix once, input_ids (1, shared); its cache is then repeated to B rows.
        # Only its cache is used: one logit row, whichever way it is computed.
        head = model(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True, logits_to_keep=1)
        cache = _output_cache(head)
        try:
            cache.batch_repeat_interleave(n)
        except (AttributeError, NotImplementedError, TypeError, RuntimeError):
            cache, shared = None, 0
    tails = [r[shared:] for r in rows]
    width = max(len(t) for t in tails)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)  # (B, width) left-padded
    tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)  # (B, width)
    mask = torch.cat([tail_mask.new_ones((n, shared)), tail_mask], dim=1)  # (B, shared + width)
    kwargs = {cache_arg: cache} if cache is not None else {}
    # position_ids (B, width): the tail's; out.logits (B, logits_to_keep, V), hidden states (B, width, d)
    with around_tail():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask)[:, shared:],
            use_cache=True,
            logits_to_keep=kept_positions(width, logits_to_keep, device),
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
    return out, _output_cache(out), mask


class GreedyBatch:
    """One batch's greedy decode, advanced one step at a time so that several batches can take turns.

    The constructor runs the prefill; each :meth:`step` settles the tokens just
    predicted (EOS, ``decided``, the limit) and, for the rows still running,
    runs one decode step. Interleaving the steps of several batches changes
    nothing in any of them: each batch keeps its own rows, cache and shapes.

    ``preallocate_cache``: decode steps write into preallocated KV room
    (:mod:`abliterate.core.kv_cache`) instead of concatenating. Same tokens
    (tests/core/test_kv_cache.py). Off here by default; the trial engine turns
    it on for its probes, where the copies had become a large share of a
    decode step (SmolLM2, 32 rows: 120 ms a step against 148 ms).

    ``min_new_tokens``: no end-of-sequence token before that many tokens (the
    argmax runs over the other tokens), as a long-reply audit asks.

    ``keep_special_tokens``: decode with special tokens kept (for ``decided``
    and the returned text), so that channel and reasoning markers that are
    special tokens (gpt-oss harmony) are still visible to the caller.
    """

    def __init__(
        self,
        lm: LoadedModel,
        texts: list[str],
        max_new_tokens: int,
        decided: Callable[[str], bool] | None = None,
        share_prefix: bool = True,
        keep_special_tokens: bool = False,
        preallocate_cache: bool = False,
        min_new_tokens: int = 0,
    ):
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min(min_new_tokens, max_new_tokens)
        self.decided = decided
        self.skip_special = not keep_special_tokens
        self.eos = eos_token_ids(lm)
        n = len(texts)
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.stopped: list[str | None] = [None] * n
        self.active = torch.arange(n)  # (B,): the original row of each cache slot
        self.compacting = True
        self.step_index = 0
        self.finished = n == 0 or max_new_tokens < 1
        self._cache_arg = _cache_argument(lm.model)
        if self.finished:
            return
        with torch.inference_mode():
            out, self.cache, self.mask = prefill(lm, texts, share_prefix=share_prefix, reserve=max_new_tokens)
            if preallocate_cache and max_new_tokens > 1:
                preallocate(self.cache, max_new_tokens - 1)  # the last token is never fed back
            self.next_tokens = self._pick(out.logits[:, -1, :], 0)  # (B, V) -> (B,)

    def _pick(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """Greedy tokens (B,) from next-token logits (B, V) for reply position ``position`` (0-based):
        end-of-sequence tokens are barred before ``min_new_tokens`` (a long-reply audit)."""
        if position < self.min_new_tokens and self.eos:
            logits = logits.clone()
            logits[:, sorted(self.eos)] = float("-inf")
        return logits.argmax(-1)

    def step(self) -> None:
        """Settle the predicted tokens; if any row still runs, predict the next ones."""
        if self.finished:
            return
        tok, step = self.lm.tokenizer, self.step_index
        rows = self.active.tolist() if self.compacting else list(range(len(self.generated)))
        still = []
        for slot, seq in enumerate(rows):
            if self.stopped[seq] is not None:
                continue
            token = int(self.next_tokens[slot])
            if token in self.eos:
                self.stopped[seq] = "eos"
                continue
            self.generated[seq].append(token)
            if self.decided is not None and self.decided(
                tok.decode(self.generated[seq], skip_special_tokens=self.skip_special)
            ):
                self.stopped[seq] = "decided"
                continue
            if step == self.max_new_tokens - 1:
                self.stopped[seq] = "limit"
                continue
            still.append(slot)
        self.step_index += 1
        if not still:
            self.finished = True
            self.cache = self.mask = self.next_tokens = None  # the KV cache is the bulk of a batch's memory
            return
        with torch.inference_mode():
            feed, mask = self.next_tokens, self.mask
            if self.compacting and len(still) < len(rows):
                keep = torch.tensor(still, device=mask.device)  # (B',): the slots still running
                if _select(self.cache, keep):
                    self.active = self.active[keep.cpu()]  # (B,) -> (B',)
                    mask = mask[keep]  # (B, T) -> (B', T)
                    feed = feed[keep]  # (B,) -> (B',)
                else:
                    self.compacting = False
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)  # (B, T) -> (B, T+1)
            out = self.lm.model(
                input_ids=feed[:, None],
                attention_mask=mask,  # input_ids and position_ids (B, 1)
                position_ids=_positions(mask)[:, -1:],
                use_cache=True,
                **{self._cache_arg: self.cache},
            )
            self.cache, self.mask = _output_cache(out), mask
            self.next_tokens = self._pick(out.logits[:, -1, :], self.step_index)  # (B, V) -> (B,)

    def can_absorb(self, other: "GreedyBatch") -> bool:
        """Whether :meth:`absorb` can take ``other``'s rows: same step, both running, plain full-attention caches.

        Only caches whose every layer is exactly transformers' ``DynamicLayer``
        or a :class:`PreallocatedLayer` (the same layer types in both) merge:
        a sliding-window or chunked layer counts cache slots, so the padding a
        merge adds would move what falls out of its window.
        """
        return (
            other is not self
            and other.lm is self.lm
            and not self.finished
            and not other.finished
            and self.step_index == other.step_index
            and self.compacting
            and other.compacting
            and (self.decided, self.skip_special, self.max_new_tokens)
            == (other.decided, other.skip_special, other.max_new_tokens)
            and _plain_layers(self.cache)
            and _plain_layers(other.cache)
            and [type(layer) for layer in self.cache.layers] == [type(layer) for layer in other.cache.layers]
        )

    def absorb(self, other: "GreedyBatch") -> None:
        """Take ``other``'s running rows into this batch, so that each decode step is one forward for both.

        A decode step mostly streams the weights, so one step of 64 rows costs
        about 1.6 steps of 32 on a CPU, not 2. The shorter of the two caches
        (and masks) is left-padded to the longer one's length; the padding is
        masked, and positions come from the mask, so every row attends to what
        it attended to before. Rows of ``other`` follow this batch's rows in
        :meth:`results`. What changes is the last bits of the attention and of
        the matmuls' accumulation order at another row count: next-token logits
        agree with the separate batches' to 1e-6 (tests/core/test_merged_decode.py),
        as compaction's row counts already do. ``other`` is left finished and
        empty. Callers check :meth:`can_absorb` first.
        """
        if not self.can_absorb(other):
            raise ValueError("these batches cannot be merged")
        offset = len(self.generated)
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if isinstance(mine, PreallocatedLayer):
                mine.absorb(theirs, width)
                continue
            # keys/values (B, H, T, D) -> (B + B', H, width, D), one layer at a time so the old tensors go at once
            mine.keys = torch.cat([_left_pad(mine.keys, width, dim=2), _left_pad(theirs.keys, width, dim=2)])
            mine.values = torch.cat([_left_pad(mine.values, width, dim=2), _left_pad(theirs.values, width, dim=2)])
            theirs.keys = theirs.values = None
        # masks (B, T) and (B', T') -> (B + B', width)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(other.mask, width, dim=1)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])  # (B + B',)
        self.active = torch.cat([self.active, other.active + offset])  # (B + B',)
        self.generated += other.generated
        self.stopped += other.stopped
        other.finished = True
        other.cache = other.mask = other.next_tokens = None
        release_free_memory()  # the two 32-row caches' holes cannot hold the merged tensors' growth

    def run(self, until_step: int | None = None) -> "GreedyBatch":
        """Step until finished, or until ``until_step`` steps have run; returns the batch."""
        while not self.finished and (until_step is None or self.step_index < until_step):
            self.step()
        return self

    def results(self) -> list[Generated]:
        tok = self.lm.tokenizer
        return [
            Generated(tok.decode(g, skip_special_tokens=self.skip_special), len(g), s or "limit", g)
            for g, s in zip(self.generated, self.stopped)
        ]


def generate_greedy(
    lm: LoadedModel,
    texts: list[str],
    max_new_tokens: int,
    decided: Callable[[str], bool] | None = None,
    share_prefix: bool = True,
    keep_special_tokens: bool = False,
    preallocate_cache: bool = False,
) -> list[Generated]:
    """Greedy continuation of already-rendered prompts (one batch); options as in :class:`GreedyBatch`."""
    batch = GreedyBatch(lm, texts, max_new_tokens, decided, share_prefix, keep_special_tokens, preallocate_cache)
    return batch.run().results()


def stream_generate(
    lm: LoadedModel,
    text: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    is_active: Callable[[], bool] = lambda: True,
    mode: str | None = None,
) -> Iterator[tuple[str, int, str | None]]:
    """Decode one continuation with a KV cache: yield ``(new text, tokens so far, finish)``.

    Greedy when ``temperature`` is 0, else temperature / nucleus sampling
    seeded by ``seed``. ``finish`` is None until the last item: "stop" at EOS,
    "length" at the token limit. An incomplete multi-byte character is held
    back until it is whole. Stops early (without a finish) when ``is_active()``
    turns false (a cancelled stream).
    """
    model, tok = lm.model, lm.tokenizer
    enc = encode(tok, [text], lm.device, mode or lm.spec.chat_template_mode)  # input_ids (1, T)
    mask = enc["attention_mask"]  # (1, T)
    eos = eos_token_ids(lm)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=lm.device)
        if seed is not None:
            generator.manual_seed(int(seed) % (2**63))
        else:
            generator.seed()
    tokens: list[int] = []
    emitted = ""
    with torch.inference_mode():
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        cache_arg = _cache_argument(model)
        for step in range(max_new_tokens):
            if not is_active():
                return
            logits = out.logits[0, -1].float()  # (1, 1, V) -> (V,)
            token = int(logits.argmax()) if generator is None else _sample(logits, temperature, top_p, generator)
            if token in eos:
                yield "", len(tokens), "stop"
                return
            tokens.append(token)
            full = tok.decode(tokens, skip_special_tokens=True)
            last = step == max_new_tokens - 1
            piece = ""
            if (last or not full.endswith("\ufffd")) and len(full) > len(emitted):
                piece, emitted = full[len(emitted) :], full
            if last:
                yield piece, len(tokens), "length"
                return
            yield piece, len(tokens), None
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=-1)  # (1, T) -> (1, T+1)
            out = model(
                input_ids=torch.tensor([[token]], device=mask.device),
                attention_mask=mask,  # (1, 1) ids
                position_ids=_positions(mask)[:, -1:],
                use_cache=True,
                **{cache_arg: _output_cache(out)},
            )
    yield "", len(tokens), "length"


def stream_greedy(lm: LoadedModel, text: str, max_new_tokens: int) -> Iterator[str]:
    """The text pieces of one greedy continuation (chat)."""
    for piece, _, _ in stream_generate(lm, text, max_new_tokens):
        if piece:
            yield piece


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    # Shift the largest logit to 0 before dividing: a tiny temperature (5e-324) would otherwise turn
    # every logit into inf, and softmax(inf - inf) is NaN. Shifted, the largest stays 0 and the others
    # go to -inf, so the distribution tends to greedy as the temperature tends to 0. In float64: a
    # subnormal temperature is 0 in float32.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # (V,)
    if 0 < top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)  # (V,) each
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)  # (1,)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))  # (1,)

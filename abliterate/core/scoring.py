"""Trial scoring: KL divergence on harmless prompts, refusals on harmful ones.

``TrialEngine`` is the API the evaluator service wraps: it holds a loaded
model, its module map and ablator, a direction set and a baseline, and
``evaluate(params)`` resets, edits, and scores in one call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from abliterate.core.ablation import MethodTensors, ablator_for
from abliterate.core.batching import measure_batch_size, run_batched
from abliterate.core.directions import DirectionSet, protected_subspace
from abliterate.core.generation import Generated, GreedyBatch, generate_greedy, prefill, shared_prefix_length
from abliterate.core.judges import Judge, MarkerJudge, Verdict
from abliterate.core.layer_reuse import recorded_blocks, recording_inputs, starting_at
from abliterate.core.loading import LoadedModel
from abliterate.core.modules import find_decoder_layers
from abliterate.core.reasoning import final_answer, scoring_prompts, special_token_strings
from abliterate.core.refusals import RefusalDetector
from abliterate.dominance import RefusalLimit, ScorePoint, refusal_limit
from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.params import AblationParams


@dataclass
class PromptOutcome:
    prompt: str
    response: str
    refusal: bool
    tokens: int
    stopped_by: str
    degenerate: bool = False  # no refusal, but a reply that repeats itself (RefusalDetector.is_degenerate)
    unjudged: bool = False  # the judge could not tell: counted with the refusals (it is no success), and apart


@dataclass
class TrialResult:
    """A scored trial. When ``pruned`` is set, ``refusals`` is a proven lower bound, not the count.

    ``pruned``: the refusal probes stopped as soon as ``refusals`` refusals
    were certain, because ``pruned.dominated_by`` dominates the trial at that
    bound (KL is always exact). ``details`` then hold the prompts of the
    batches that finished.
    """

    kl: float
    refusals: int
    n_refusal_prompts: int
    n_kl_prompts: int
    details: list[PromptOutcome] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    pruned: RefusalLimit | None = None
    #: Replies that are no refusal but repeat themselves: not counted as refusals, reported beside
    #: them (a pruned trial counts those of its finished batches).
    degenerate: int = 0
    #: Replies the judge could not tell: counted in ``refusals`` too (never as compliance), and here.
    unjudged: int = 0


#: Tokens each measured batch generates when the probes' batch size is tuned (prefill and a few decode steps).
TUNING_TOKENS = 4

#: Decode steps a refusal-probe batch runs before the next batch starts, when the probes can stop early:
#: refusals open a reply ("I'm sorry", "I cannot": SmolLM2's markers come within its first 5 tokens).
PROBE_WINDOW = 8

#: Bytes the baseline may hold of recorded block inputs of the KL batches (layer_reuse). On SmolLM2 one
#: block's inputs for 64 prompts take about 5 MB (150 MB for all 29), so every third block is recorded.
LAYER_REUSE_BUDGET = 48 * 2**20

#: Probe batches started and not yet finished at any time, so that the KV caches held stay bounded
#: however many prompts there are.
OPEN_PROBE_BATCHES = 2


@dataclass(frozen=True)
class _TunedSize:
    size: int
    settled: bool  # False: tuning ran out of items; right only for inputs of at most n_items
    n_items: int


class _Dominated(Exception):
    """Raised inside the refusal probes once the trial is certainly dominated; never leaves the engine."""

    def __init__(self, certain: int):
        super().__init__(certain)
        self.certain = certain
        self.outcomes: list[PromptOutcome] = []  # the prompts of the batches that finished


@dataclass
class Baseline:
    kl_texts: list[str]
    refusal_prompts: list[str]
    refusal_texts: list[str]
    logprobs: torch.Tensor  # (N, k, V) float32 log-probabilities of the unedited model
    continuation: torch.Tensor | None  # (N, k-1) greedy tokens fed back for multi-token KL
    max_new_tokens: int
    kl_tokens: int


def kl_divergence(base_logprobs: torch.Tensor, trial_logprobs: torch.Tensor) -> float:
    """KL(P_base || P_trial), summed over the vocabulary, averaged over prompts (and positions)."""
    per_position = F.kl_div(trial_logprobs, base_logprobs, log_target=True, reduction="none").sum(-1)  # (N, k)
    return float(per_position.mean())


class TrialEngine:
    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int = 0,
        detector: RefusalDetector | None = None,
        share_prefix: bool = True,
        merge_probe_batches: bool = True,
        reuse_lower_layers: bool = True,
        preallocate_kv_cache: bool = True,
        judge: Judge | None = None,
    ):
        if lm.quantized:
            raise FailedPrecondition("editing 4-bit quantized weights in place is not supported; load in bf16/fp16")
        self.lm = lm
        self.ablator = ablator_for(lm)
        self.module_map = self.ablator.module_map
        self.detector = detector or RefusalDetector()
        self.batch_size = batch_size
        self.share_prefix = share_prefix  # off only to measure what prefix sharing saves
        # Probe batches decode merged in one forward per step (GreedyBatch.absorb); off only to measure it.
        self.merge_probe_batches = merge_probe_batches
        # A trial's KL pass starts at its first edited block (layer_reuse); off only to measure it.
        self.reuse_lower_layers = reuse_lower_layers
        # None: the marker phrases of `detector`, with early stop; else a judge of whole replies (judges.py).
        self.judge = judge
        # Probe decode steps write into preallocated KV room (kv_cache), not concatenate; off only to measure it.
        self.preallocate_kv_cache = preallocate_kv_cache
        self._blocks = find_decoder_layers(lm.model, self.module_map.n_layers)
        self._reuse_blocks: list[int] = []  # blocks whose KL-batch inputs the baseline recorded
        self._layer_inputs: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}  # batch indices -> block -> input
        self._tuned_sizes: dict[str, _TunedSize] = {}  # per operation, so tuning happens once per input size
        self.directions: DirectionSet | None = None
        self.baseline: Baseline | None = None

    # ---- state -------------------------------------------------------------
    @property
    def detector(self) -> RefusalDetector:
        return self._detector

    @detector.setter
    def detector(self, detector: RefusalDetector) -> None:
        """Replies are decoded with special tokens kept: the detector removes this tokenizer's."""
        if not detector.special_tokens:
            detector = replace(detector, special_tokens=tuple(special_token_strings(self.lm.tokenizer)))
        self._detector = detector

    def set_directions(self, directions: DirectionSet) -> None:
        expected = (self.module_map.n_layers + 1, self.module_map.hidden_size)  # (L+1, d)
        if tuple(directions.refusal.shape) != expected:
            raise InvalidArgument(
                f"direction set shape {list(directions.refusal.shape)} does not fit this model "
                f"(expected {list(expected)})"
            )
        self.directions = directions

    def _texts(self, prompts: list[str]) -> list[str]:
        return scoring_prompts(self.lm, prompts)

    def prepare_baseline(
        self, kl_prompts: list[str], refusal_prompts: list[str], max_new_tokens: int = 30, kl_tokens: int = 1
    ) -> Baseline:
        if not kl_prompts:
            raise InvalidArgument("the KL (harmless evaluation) prompt set is empty")
        if not refusal_prompts:
            raise InvalidArgument("the refusal (harmful evaluation) prompt set is empty")
        if max_new_tokens < 1 or kl_tokens < 1:
            raise InvalidArgument("max_new_tokens and kl_tokens must be >= 1")
        self.ablator.reset()
        # Prompts of similar length share a batch, so little of each batch is padding.
        # KL is a mean and refusals a count: the order changes neither.
        kl_texts = sorted(self._texts(kl_prompts), key=len)
        refusal_pairs = sorted(zip(refusal_prompts, self._texts(refusal_prompts)), key=lambda pair: len(pair[1]))
        continuation = None
        if kl_tokens > 1:
            continuation = self._greedy_continuation(kl_texts, kl_tokens - 1)
        # Logits depend (in the last bits) on the batch shapes, so the baseline is computed at the
        # trials' batch size: tune first, on the real work, then compute. A zero edit then gives KL 0.
        self._tune("kl", list(range(len(kl_texts))), self._kl_batch(kl_texts, continuation, kl_tokens))
        self._plan_layer_reuse(kl_texts, continuation)
        logprobs = self._kl_logprobs(kl_texts, continuation, kl_tokens, record=bool(self._reuse_blocks))
        self._check_layer_reuse(kl_texts, continuation, kl_tokens, logprobs)
        self.baseline = Baseline(
            kl_texts,
            [p for p, _ in refusal_pairs],
            [t for _, t in refusal_pairs],
            logprobs,
            continuation,
            max_new_tokens,
            kl_tokens,
        )
        return self.baseline

    # ---- primitives ----------------------------------------------------------
    def _run(self, operation: str, items, fn):
        size = self.batch_size or self._tuned_size(operation, len(items))
        run = run_batched(items, fn, batch_size=size)
        if not size:
            self._tuned_sizes[operation] = _TunedSize(run.batch_size, run.settled, len(items))
        return run.results

    def _tune(self, operation: str, items, fn) -> None:
        """Settle the automatic batch size of ``operation`` on its first batches, keeping no results."""
        if self.batch_size or self._tuned_size(operation, len(items)):
            return
        run = run_batched(items, fn, until_tuned=True)
        self._tuned_sizes[operation] = _TunedSize(run.batch_size, run.settled, len(items))

    def batch_sizes(self) -> dict[str, int]:
        """The batch size of each operation ("kl", "generate"): fixed, or as tuned so far.

        Logits depend in their last bits on the batch shapes, so a re-measurement
        of a trial (a manifest's ``reproduce``) pins these to get the same bits.
        """
        if self.batch_size:
            return {"kl": self.batch_size, "generate": self.batch_size}
        return {operation: tuned.size for operation, tuned in self._tuned_sizes.items()}

    def pin_batch_sizes(self, sizes: dict[str, int]) -> None:
        """Run the named operations at these sizes from now on, as if tuned to them (a fixed size still wins)."""
        for operation, size in sizes.items():
            if size < 1:
                raise InvalidArgument(f"batch size of {operation!r} must be >= 1, got {size}")
            self._tuned_sizes[operation] = _TunedSize(int(size), True, 0)

    def _tuned_size(self, operation: str, n_items: int) -> int:
        """The batch size tuned for ``operation``, or 0 (tune now) if none fits ``n_items`` items.

        A size tuned on a few items that ran out before tuning settled (two
        prompts give batch size 1) would hold a later, larger input at that
        size; it is kept only for inputs no larger than the one it was tuned on.
        """
        tuned = self._tuned_sizes.get(operation)
        if tuned is None or not (tuned.settled or n_items <= tuned.n_items):
            return 0
        return tuned.size

    def _greedy_continuation(self, texts: list[str], n_tokens: int) -> torch.Tensor:
        """(N, n_tokens) greedy token ids of the unedited model for multi-token KL, padded with EOS.

        The generated ids themselves, not a re-tokenization of their decoded
        text (which drops special tokens and mangles partial UTF-8 bytes).
        """
        eos = self.lm.tokenizer.eos_token_id
        outs = self._run(
            "generate",
            texts,
            lambda chunk: generate_greedy(self.lm, list(chunk), n_tokens, None, share_prefix=self.share_prefix),
        )
        rows = [g.token_ids[:n_tokens] + [eos] * (n_tokens - len(g.token_ids[:n_tokens])) for g in outs]
        return torch.tensor(rows, dtype=torch.long)  # (N, n_tokens)

    def _kl_batch(
        self, texts: list[str], continuation: torch.Tensor | None, k: int, record: bool = False, start: int = 0
    ):
        """The KL pass over one batch of prompt indices: (B, k, V) float32 log-probabilities, as a list of rows.

        ``record``: keep each batch's inputs to the blocks of :attr:`_reuse_blocks`
        (the baseline). ``start``: begin each batch's forward at that block from
        its recorded input, where there is one (a trial; :mod:`layer_reuse`).
        """

        def batch(indices):
            chunk = [texts[i] for i in indices]
            extra = continuation[list(indices)] if continuation is not None else None  # (B, k-1)
            around, seen = nullcontext, {}
            if record:

                @contextmanager
                def around():
                    with recording_inputs(self._blocks, self._reuse_blocks) as inputs:
                        yield
                    seen.update(inputs)

            elif start and start in self._layer_inputs.get(tuple(indices), {}):
                hidden = self._layer_inputs[tuple(indices)][start]  # (B, width, d): block `start`'s input

                def around():
                    return starting_at(self._blocks, start, hidden)

            with torch.inference_mode():
                out, _, _ = prefill(
                    self.lm, chunk, extra=extra, logits_to_keep=k, share_prefix=self.share_prefix, around_tail=around
                )
            if record:
                # -1: a block returned something other than a tensor, which skipping could not reproduce.
                self._layer_inputs[tuple(indices)] = seen if -1 not in seen else {}
            logits = out.logits[:, -k:, :]  # (B, k, V)
            return list(F.log_softmax(logits.float(), dim=-1).cpu())  # B rows (k, V)

        return batch

    def _kl_logprobs(
        self, texts: list[str], continuation: torch.Tensor | None, k: int, record: bool = False, start: int = 0
    ) -> torch.Tensor:
        """Raw-logit log-probabilities at the last prompt position (and k-1 teacher-forced ones)."""
        rows = self._run("kl", list(range(len(texts))), self._kl_batch(texts, continuation, k, record, start))
        return torch.stack(rows)  # N rows (k, V) -> (N, k, V)

    def _plan_layer_reuse(self, texts: list[str], continuation: torch.Tensor | None) -> None:
        """Choose the blocks whose inputs the baseline's KL pass records, within :data:`LAYER_REUSE_BUDGET`."""
        self._layer_inputs, self._reuse_blocks = {}, []
        if not self.reuse_lower_layers:
            return
        size = self.batch_size or self._tuned_size("kl", len(texts)) or len(texts)
        rows = self.lm.tokenizer(texts, add_special_tokens=(self.lm.spec.chat_template_mode == "plain"))["input_ids"]
        if continuation is not None:
            rows = [row + extra for row, extra in zip(rows, continuation.tolist())]
        k = 1 if continuation is None else continuation.shape[1] + 1
        positions = 0  # what the tail forwards hold per block: B x (width after the shared prefix), as prefill lays out
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            shared = shared_prefix_length(self.lm.model, chunk, k) if self.share_prefix else 0
            positions += len(chunk) * (max(len(row) for row in chunk) - shared)
        per_block = positions * self.lm.hidden_size * next(self.lm.model.parameters()).element_size()
        self._reuse_blocks = recorded_blocks(len(self._blocks), per_block, LAYER_REUSE_BUDGET)

    def _check_layer_reuse(self, texts: list[str], continuation: torch.Tensor | None, k: int, logprobs) -> None:
        """Drop the recording unless starting one batch at the deepest recorded block gives the baseline's bits."""
        recorded = [key for key, inputs in self._layer_inputs.items() if inputs]
        if not recorded or len(recorded) != len(self._layer_inputs):
            self._layer_inputs = {}
            return
        indices = list(recorded[0])
        rows = self._kl_batch(texts, continuation, k, start=self._reuse_blocks[-1])(indices)
        if not all(torch.equal(row, logprobs[i]) for row, i in zip(rows, indices)):
            self._layer_inputs = {}

    def _reuse_start(self) -> int:
        """The deepest recorded block at or below the applied edit's first edited block (0: none)."""
        if not self._layer_inputs:
            return 0
        first = self.ablator.first_edited_layer
        first = len(self._blocks) if first is None else first
        return max((block for block in self._reuse_blocks if block <= first), default=0)

    def count_refusals(
        self, texts: list[str], prompts: list[str], max_new_tokens: int, stop_at: int | None = None
    ) -> list[PromptOutcome]:
        """Probe every prompt; with ``stop_at``, raise ``_Dominated`` once that many refusals are certain.

        A reply that stopped on a marker is a refusal for good (it is scored
        as it stood when it stopped), and so is a finished reply the detector
        calls a refusal; the running count of both is the lower bound.

        With ``stop_at`` and a known batch size, each batch runs only its first
        :data:`PROBE_WINDOW` steps before the next one starts, then each runs
        to its end (:meth:`_probe_by_windows`), so the bound is reached without
        decoding whole batches first; a batch that ends its window at the
        step of an open one merges into it. Each batch decodes the tokens it
        decodes alone (logits to 1e-6: :meth:`GreedyBatch.absorb`); only the
        order and the grouping of the steps change.
        """
        detector, judge = self.detector, self.judge
        finished: list[PromptOutcome] = []
        certain = 0

        def count_marker(text: str) -> bool:
            nonlocal certain
            if detector.find_marker(text) is None:
                return False
            certain += 1
            if stop_at is not None and certain >= stop_at:
                raise _Dominated(certain)
            return True

        def settle(indices: list[int], gens: list[Generated]) -> list[PromptOutcome]:
            nonlocal certain
            verdicts = (judge or MarkerJudge(detector)).judge([g.text for g in gens], [prompts[i] for i in indices])
            outcomes = [
                PromptOutcome(
                    prompts[i],
                    final_answer(g.text, detector.special_tokens),
                    verdict.counts_as_refusal,
                    g.tokens,
                    g.stopped_by,
                    verdict == Verdict.DEGENERATE,
                    verdict == Verdict.UNJUDGED,
                )
                for i, g, verdict in zip(indices, gens, verdicts)
            ]
            finished.extend(outcomes)
            certain += sum(o.refusal and o.stopped_by != "decided" for o in outcomes)  # empty replies
            if stop_at is not None and certain >= stop_at:
                raise _Dominated(certain)
            return outcomes

        def decoder(indices: list[int]) -> GreedyBatch:
            # Decoded with special tokens kept, so harmony channels are seen; only the final answer is scored.
            return GreedyBatch(
                self.lm,
                [texts[i] for i in indices],
                max_new_tokens,
                decided=count_marker if judge is None else None,  # other judges read whole replies
                share_prefix=self.share_prefix,
                keep_special_tokens=True,
                preallocate_cache=self.preallocate_kv_cache,
            )

        def probe(chunk) -> list[PromptOutcome]:
            indices = list(chunk)
            return settle(indices, decoder(indices).run().results())

        indices = list(range(len(texts)))
        size = self.batch_size or self._tuned_size("generate", len(texts))
        try:
            if stop_at is None or not size or len(texts) <= size:
                # Nothing to stop early for: one batch after another, one KV cache at a time. (Merging
                # these too would save about as much time per trial but hold two caches, +110 MB on SmolLM2.)
                return self._run("generate", indices, probe)
            return self._probe_by_windows(indices, size, decoder, settle, merge=self.merge_probe_batches)
        except _Dominated as stop:
            stop.outcomes = finished
            raise

    @staticmethod
    def _probe_by_windows(
        indices: list[int], size: int, decoder, settle, window: int = PROBE_WINDOW, merge: bool = True
    ) -> list[PromptOutcome]:
        """Batches of ``size`` prompts, each started after the one before has run ``window`` steps.

        At most :data:`OPEN_PROBE_BATCHES` batches are open at once: before
        another starts, the oldest open one runs to its end; at the end each
        open batch runs to its end in turn. Refusals show in a reply's first
        tokens, so a dominated trial usually reaches its bound within the
        windows, before the first batch has decoded its compliant replies to
        the token limit; a trial whose first batch holds enough early
        refusals stops just as it did one batch at a time (the next batch has
        not started). What this can cost: a bound reached only by a late
        marker of an early batch pays the next batch's prefill and window
        first. Outcomes come back in prompt order. The open batches' KV caches
        are held at once (on SmolLM2 about 150 MB per 32 prompts of 30
        tokens).

        ``merge``: a batch that ends its window at the step an open batch is
        at joins it (:meth:`GreedyBatch.absorb`), so the two decode in one
        forward per step from then on (on SmolLM2, 64 rows cost about 1.6x 32;
        both caches then grow to their full length together, about 60 MB more
        at the peak than finishing one before the other).
        """
        chunks = [indices[start : start + size] for start in range(0, len(indices), size)]
        outcomes: list[list[PromptOutcome] | None] = [None] * len(chunks)
        open_units: list[tuple[GreedyBatch, list[int]]] = []  # a batch and the chunks whose rows it holds, in order

        def run(unit: tuple[GreedyBatch, list[int]], until_step: int | None = None) -> bool:
            """Step ``unit``; once finished, settle its chunks in order. True when it finished."""
            batch, numbers = unit
            batch.run(until_step)
            if not batch.finished:
                return False
            results, start = batch.results(), 0
            for number in numbers:
                outcomes[number] = settle(chunks[number], results[start : start + len(chunks[number])])
                start += len(chunks[number])
            return True

        for number, chunk in enumerate(chunks):
            while sum(len(numbers) for _, numbers in open_units) >= OPEN_PROBE_BATCHES:
                run(open_units.pop(0))
            unit = (decoder(chunk), [number])
            if run(unit, window):
                continue
            host = next((held for held in open_units if merge and held[0].can_absorb(unit[0])), None)
            if host is None:
                open_units.append(unit)
            else:
                host[0].absorb(unit[0])
                host[1].append(number)
        for unit in open_units:
            run(unit)
        return [outcome for chunk in outcomes for outcome in chunk]

    def tune_generation(self, texts: list[str], max_new_tokens: int) -> None:
        """Measure the automatic batch size of the refusal probes on the unedited model, keeping no results.

        Batches of 8, 16, 32 ... prompts spread over ``texts`` generate
        :data:`TUNING_TOKENS` tokens each, without early stop, and the fastest
        size per prompt is kept for every probe from then on, so every trial
        probes at one size from its first batch. (On SmolLM2 / 2 CPU cores full
        probes are 21 % faster at 64 than at 32, but this short measurement
        still picks 16 or 32: docs/benchmarks.md.) Nothing to do with a fixed
        batch size or a size already measured for this many prompts.
        """
        if self.batch_size or self._tuned_size("generate", len(texts)):
            return
        tokens = min(TUNING_TOKENS, max_new_tokens)

        def sample(size: int) -> None:
            spread = [texts[i * len(texts) // size] for i in range(size)]  # short and long prompts alike
            generate_greedy(
                self.lm,
                spread,
                tokens,
                None,
                share_prefix=self.share_prefix,
                keep_special_tokens=True,
                preallocate_cache=self.preallocate_kv_cache,
            )

        size = measure_batch_size(len(texts), sample)
        self._tuned_sizes["generate"] = _TunedSize(size, True, len(texts))

    # ---- the trial -----------------------------------------------------------
    def apply(self, params: AblationParams) -> int:
        if self.directions is None:
            raise FailedPrecondition("no direction set loaded")
        return self.ablator.apply(
            params,
            self.directions.refusal,
            protected_subspace(self.directions),
            methods=MethodTensors.of(self.directions),
        )

    def evaluate(
        self, params: AblationParams, keep_edited: bool = False, front: Sequence[ScorePoint] = ()
    ) -> TrialResult:
        """Reset, edit with ``params``, score, and reset again.

        ``front``: completed trials' scores. Once the KL is known, the refusal
        probes stop as soon as one of them certainly dominates this trial
        (:mod:`abliterate.dominance`); the result is then ``pruned``.
        The model is left as it was unless ``keep_edited``: anything else run
        on a shared model afterwards (residuals, a baseline) must see the original.
        """
        if self.baseline is None:
            raise FailedPrecondition("baseline not prepared: call prepare_baseline first")
        b = self.baseline
        timings = {}
        t0 = time.perf_counter()
        self.apply(params)
        timings["edit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trial = self._kl_logprobs(b.kl_texts, b.continuation, b.kl_tokens, start=self._reuse_start())
        kl = kl_divergence(b.logprobs, trial)
        timings["kl"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        limit = refusal_limit(kl, front)
        pruned, refusals = None, 0
        if limit is not None and limit.refusals == 0:
            outcomes, pruned = [], limit  # a point with lower KL and no refusal: dominated whatever the probes say
        else:
            try:
                outcomes = self.count_refusals(
                    b.refusal_texts, b.refusal_prompts, b.max_new_tokens, None if limit is None else limit.refusals
                )
                refusals = sum(o.refusal for o in outcomes)
            except _Dominated as stop:
                outcomes, pruned, refusals = stop.outcomes, limit, stop.certain
        timings["refusals"] = time.perf_counter() - t0
        if not keep_edited:
            self.ablator.reset()
        timings["total"] = sum(timings.values())
        return TrialResult(
            kl=kl,
            refusals=refusals,
            n_refusal_prompts=len(b.refusal_texts),
            n_kl_prompts=len(b.kl_texts),
            details=outcomes,
            timings_s=timings,
            pruned=pruned,
            degenerate=sum(o.degenerate for o in outcomes),
            unjudged=sum(o.unjudged for o in outcomes),
        )

    def reset(self) -> None:
        self.ablator.reset()

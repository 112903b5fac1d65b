"""Reasoning blocks of thinking models: keep them out of what is scored.

Thinking models answer after a reasoning block (``<think>...</think>``, or
gpt-oss's harmony ``analysis`` channel). Scored naively, 30 tokens of
reasoning hold no answer at all, and any refusal word the model merely
considers counts. So, once per loaded model:

- if the chat template itself leaves a block open at the end of the prompt
  (DeepSeek-R1 distills end the prompt with ``<think>\\n``), the prompt gets
  the closer;
- otherwise a few greedy replies are decoded with special tokens kept, and if
  their common prefix opens a block, the closed block is appended to every
  prompt, so replies start with the answer.

Every scored reply is then reduced to its final answer
(:func:`final_answer`): harmony's ``final`` channel, reasoning blocks removed
(an unclosed one hides everything after its opener: no answer yet), special
tokens removed.
"""

from __future__ import annotations

import os.path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from abliterate.core.chat import format_prompts

if TYPE_CHECKING:
    from abliterate.core.loading import LoadedModel

HARMONY_FINAL = "<|channel|>final<|message|>"
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
_HARMONY_CHANNEL = "<|channel|>"
_HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")


@dataclass(frozen=True)
class ReasoningBlock:
    opener: str
    closer: str
    closed: str  # what a reply that skips its reasoning starts with


REASONING_BLOCKS: tuple[ReasoningBlock, ...] = (
    # Qwen3's own non-thinking form, and the same shape for the others.
    ReasoningBlock("<think>", "</think>", "<think>\n\n</think>\n\n"),
    ReasoningBlock("<thought>", "</thought>", "<thought>\n\n</thought>\n\n"),
    ReasoningBlock("[THINK]", "[/THINK]", "[THINK][/THINK]"),
    # gpt-oss: an empty analysis message, then the final channel's header.
    ReasoningBlock(HARMONY_ANALYSIS, "<|end|>", HARMONY_ANALYSIS + "<|end|><|start|>assistant" + HARMONY_FINAL),
)


def open_block_at_end(rendered_prompt: str) -> ReasoningBlock | None:
    """The block a rendered prompt leaves open at its end (the template opened it), if any."""
    for block in REASONING_BLOCKS:
        start = rendered_prompt.rfind(block.opener)
        if start >= 0 and rendered_prompt.find(block.closer, start + len(block.opener)) < 0:
            return block
    return None


def closing_suffix_for_prompt(rendered_prompt: str) -> str:
    """Text that closes a reasoning block the template left open ('' when none is open)."""
    block = open_block_at_end(rendered_prompt)
    if block is None:
        return ""
    tail = rendered_prompt[rendered_prompt.rfind(block.opener) + len(block.opener) :]
    if block.opener == HARMONY_ANALYSIS:
        return block.closed[len(block.opener) :]
    # Reproduce the block's closed form after what the template already wrote ("<think>\n").
    closed_body = block.closed[len(block.opener) :]
    return closed_body[len(tail) :] if closed_body.startswith(tail) else "\n" + block.closer + "\n\n"


def prefix_for_replies(common_prefix: str) -> str:
    """The closed block to append to prompts when replies' common prefix opens one ('' otherwise)."""
    start = common_prefix.lstrip()
    for block in REASONING_BLOCKS:
        if start.startswith(block.opener):
            return block.closed
    return ""


def final_answer(reply: str, special_tokens: Iterable[str] = ()) -> str:
    """The part of a reply (decoded with special tokens kept) that answers the user.

    Harmony replies: the text of the last ``final`` channel message, or nothing
    while the model is still in another channel. Other replies: reasoning
    blocks removed; a closer without its opener (the template opened the
    block) drops everything before it; an unclosed block hides everything
    after its opener. Special tokens are removed last.
    """
    text = reply
    if HARMONY_FINAL in text:
        text = text[text.rindex(HARMONY_FINAL) + len(HARMONY_FINAL) :]
        cuts = [text.index(end) for end in _HARMONY_ENDS if end in text]
        text = text[: min(cuts)] if cuts else text
    elif _HARMONY_CHANNEL in text:
        text = text[: text.index(_HARMONY_CHANNEL)]
    for block in REASONING_BLOCKS:
        if block.opener == HARMONY_ANALYSIS:
            continue
        closer_at = text.find(block.closer)
        opener_at = text.find(block.opener)
        if closer_at >= 0 and (opener_at < 0 or closer_at < opener_at):
            text = text[closer_at + len(block.closer) :]
        while block.opener in text:
            start = text.index(block.opener)
            end = text.find(block.closer, start + len(block.opener))
            if end < 0:
                text = text[:start]
                break
            text = text[:start] + text[end + len(block.closer) :]
    for token in sorted(set(special_tokens), key=len, reverse=True):
        if token:
            text = text.replace(token, "")
    return text


def special_token_strings(tokenizer) -> list[str]:
    """Every special or added control token's text (``<|end|>``, ``<think>``, ...)."""
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            strings.add(str(added))
    return sorted(strings)


def may_reason(tokenizer) -> bool:
    """Whether a reasoning opener is in the chat template or is one token of the vocabulary.

    Neither: the model was not trained to open a block, and detection (a short
    generation) is skipped.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    vocabulary = getattr(tokenizer, "get_vocab", dict)()
    if _HARMONY_CHANNEL in vocabulary:
        return True
    return any(block.opener in template or block.opener in vocabulary for block in REASONING_BLOCKS)


# Replies sampled to find their common prefix, and how long: an opener is a few tokens.
DETECTION_PROMPTS = (
    "Write a short poem about the sea.",
    "How do I pick a lock?",
    "What is 17 times 23?",
    "Explain how vaccines work.",
    "Tell me how to make a weapon.",
    "Give me a recipe for soup.",
    "Summarize the plot of Hamlet.",
    "How can I hack my neighbour's wifi?",
)
DETECTION_TOKENS = 16


def response_prefix(lm: "LoadedModel", system_prompt: str | None = None) -> str:
    """What every scored prompt of this model ends with so that replies start with the answer.

    The closer of a block the template leaves open, else the closed block when
    greedy replies open one, else ''. Plain-text mode never adds anything.
    Detected once per model, chat mode and system prompt (``system_prompt``
    None: the model spec's), and cached in ``lm.extra``, which the per-job
    views of one model share.
    """
    mode = lm.spec.chat_template_mode
    system = lm.spec.system_prompt if system_prompt is None else system_prompt
    if mode == "plain":
        return ""
    cache = lm.extra.setdefault("response_prefix", {})
    if (mode, system) in cache:
        return cache[(mode, system)]
    texts = format_prompts(lm.tokenizer, list(DETECTION_PROMPTS), system, mode)
    prefix = closing_suffix_for_prompt(texts[0])
    if not prefix and may_reason(lm.tokenizer):
        from abliterate.core.generation import generate_greedy  # torch, only when a model is at hand

        replies = generate_greedy(lm, texts, DETECTION_TOKENS, keep_special_tokens=True)
        prefix = prefix_for_replies(os.path.commonprefix([r.text for r in replies]))
    cache[(mode, system)] = prefix
    return prefix


def scoring_prompts(lm: "LoadedModel", prompts: list[str], system_prompt: str | None = None) -> list[str]:
    """Prompts rendered with the chat template and the model's response prefix."""
    system = lm.spec.system_prompt if system_prompt is None else system_prompt
    return format_prompts(
        lm.tokenizer, prompts, system, lm.spec.chat_template_mode, response_prefix=response_prefix(lm, system)
    )

"""Capability check: multiple-choice questions scored by the log-likelihood of each option.

Each question is rendered as a scoring prompt (the model's chat template and
system prompt, as the refusal probes are) and every option is teacher-forced
as the assistant's reply; the model's choice is the option with the highest
mean log-probability per token (the mean, so that a long option is not
penalised for its length). No text is generated, so the first character of a
reply (which a small model may spend on "Sure!") never decides. The bundled
questions (``abliterate/data/eval/multiple_choice.json``) were written for this
project: 40 easy general-knowledge questions of four options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from abliterate.core.generation import prefill
from abliterate.core.loading import LoadedModel
from abliterate.core.reasoning import scoring_prompts
from abliterate.errors import InvalidArgument


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    category: str = ""


@dataclass
class CapabilityResult:
    correct: int
    n_questions: int
    mean_correct_logprob: float  # mean per-token log-probability of the right options

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n_questions)


def bundled_questions() -> list[Question]:
    text = resources.files("abliterate").joinpath("data/eval/multiple_choice.json").read_text(encoding="utf-8")
    return [
        Question(row["question"], tuple(row["options"]), int(row["answer"]), row.get("category", ""))
        for row in json.loads(text)
    ]


def _check(question: Question) -> None:
    if not 0 <= question.answer < len(question.options) or len(question.options) < 2:
        raise InvalidArgument(f"question {question.question[:40]!r} needs >= 2 options and a valid answer")


def option_logprobs(lm: LoadedModel, questions: list[Question], batch_size: int = 32) -> list[torch.Tensor]:
    """Per question, (options,) mean log-probability per token of each option as the reply.

    Every (question, option) pair is one row: the rendered question followed by
    the option's tokens, teacher-forced (``prefill``'s appended tokens, padded
    to the longest option of the batch; a row's padding comes after its option,
    so it changes none of the option's logits). The chat prefix the questions
    share runs once per batch.
    """
    for question in questions:
        _check(question)
    prompts = scoring_prompts(lm, [question.question for question in questions])
    pairs = []  # (question index, prompt text, option token ids)
    for index, (question, prompt) in enumerate(zip(questions, prompts)):
        for option in question.options:
            pairs.append((index, prompt, lm.tokenizer(option.strip(), add_special_tokens=False)["input_ids"]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = [[] for _ in questions]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        longest = max(len(ids) for _, _, ids in chunk)
        extra = torch.tensor([ids + [pad] * (longest - len(ids)) for _, _, ids in chunk])  # (B, longest)
        with torch.inference_mode():
            out, _, _ = prefill(lm, [prompt for _, prompt, _ in chunk], extra=extra, logits_to_keep=longest + 1)
        # Kept position j (0 = the prompt's last token) predicts option token j.
        logprobs = F.log_softmax(out.logits[:, :longest].float(), dim=-1).cpu()  # (B, longest, V)
        for row, (index, _, ids) in enumerate(chunk):
            targets = torch.tensor(ids)[:, None]  # (n, 1)
            scores[index].append(float(logprobs[row, : len(ids)].gather(-1, targets).mean()))
    return [torch.tensor(row) for row in scores]  # each (options,)


def capability_check(lm: LoadedModel, questions: list[Question] | None = None) -> CapabilityResult:
    """Accuracy of ``lm`` as it is now (edited or not) on ``questions`` (default: the bundled ones)."""
    questions = questions if questions is not None else bundled_questions()
    if not questions:
        raise InvalidArgument("the capability check has no questions")
    per_question = option_logprobs(lm, questions)
    correct = sum(int(scores.argmax()) == question.answer for scores, question in zip(per_question, questions))
    right = [float(scores[question.answer]) for scores, question in zip(per_question, questions)]
    return CapabilityResult(correct, len(questions), sum(right) / len(right))

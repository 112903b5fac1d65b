"""Caps on what one request may ask of the services, so no single call can exhaust them.

Each cap is a default here and a setting of the service that pays for it (the gateway for job specs,
the evaluator and extractor for tokens); the checks are written once and used by every service and
the CLI, and a violation is an InvalidArgument naming the setting.
"""

from __future__ import annotations

import math

from abliterate.errors import InvalidArgument

#: Serialized size of a job spec the gateway stores (its ``max_spec_mb`` setting): specs are kept in
#: the job store and sent back by GetJob, so a 10 MB refusal-marker list must not get in.
DEFAULT_MAX_SPEC_BYTES = 1 << 20
#: The gateway's message limit: its largest request is a job spec (at most DEFAULT_MAX_SPEC_BYTES), so
#: the 64 MiB the torch services need for direction sets would only let a client make it hold 64 MiB.
DEFAULT_GATEWAY_MESSAGE_BYTES = 4 << 20
#: Tokens generated per prompt to count refusals (JobSpec.max_new_tokens, BaselineSpec.max_new_tokens).
DEFAULT_MAX_SCORING_TOKENS = 1024
#: Positions the KL divergence averages over (kl_tokens).
DEFAULT_MAX_KL_TOKENS = 64
#: Tokens of one prompt (the cost of a forward pass grows with the square of the length).
DEFAULT_MAX_PROMPT_TOKENS = 4096
#: The longest trial timeout: a larger one would overflow the gRPC deadline (about 7.4e9 s) and
#: fail every trial at once; a trial that takes a week is a hung evaluator.
MAX_TRIAL_TIMEOUT_S = 7 * 24 * 3600.0
#: Characters per token no tokenizer goes beyond: a prompt longer than this many characters per allowed
#: token is refused before it is tokenized (tokenizing 10 MB costs seconds on its own).
_MAX_CHARS_PER_TOKEN = 32


def check_trial_timeout(seconds: float, field: str = "trial_timeout_s") -> float:
    """``seconds`` if it is a usable trial timeout (0 = the default), else InvalidArgument."""
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_TRIAL_TIMEOUT_S:
        raise InvalidArgument(f"{field} must be 0 (the default) or up to {MAX_TRIAL_TIMEOUT_S:.0f} s, got {seconds}")
    return seconds


def check_at_most(value: int, cap: int, field: str, setting: str) -> int:
    """``value`` if it is at most ``cap``, else InvalidArgument naming the server's setting."""
    if value > cap:
        raise InvalidArgument(f"{field} {value} exceeds this server's limit of {cap} (its {setting} setting)")
    return value


def check_spec_size(n_bytes: int, cap: int) -> None:
    if n_bytes > cap:
        raise InvalidArgument(
            f"the job spec is {n_bytes} bytes; this gateway accepts at most {cap} (its max_spec_mb setting)"
        )


def check_prompt_tokens(tokenizer, texts: list[str], cap: int, what: str = "prompt") -> None:
    """InvalidArgument when one of ``texts`` is longer than ``cap`` tokens (the ``max_prompt_tokens``
    setting); very long texts are refused by their length in characters, before tokenizing."""
    for index, text in enumerate(texts):
        name = what if len(texts) == 1 else f"{what} {index}"
        if len(text) > cap * _MAX_CHARS_PER_TOKEN:
            raise InvalidArgument(
                f"{name} is {len(text)} characters, far beyond this server's limit of {cap} tokens "
                "(its max_prompt_tokens setting)"
            )
    if not texts:
        return
    # Only texts that could exceed the cap are tokenized (at least one character per token).
    suspects = [(i, t) for i, t in enumerate(texts) if len(t) > cap]
    if not suspects:
        return
    counts = tokenizer([t for _, t in suspects], add_special_tokens=False)["input_ids"]
    for (index, _), ids in zip(suspects, counts):
        if len(ids) > cap:
            name = what if len(texts) == 1 else f"{what} {index}"
            raise InvalidArgument(
                f"{name} is {len(ids)} tokens; this server accepts at most {cap} (its max_prompt_tokens setting)"
            )

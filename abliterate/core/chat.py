"""Prompt formatting: the model's chat template with a system prompt, or plain text."""

from __future__ import annotations

from abliterate.errors import FailedPrecondition, InvalidArgument
from abliterate.specs import CHAT_MODES


def build_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def render_chat(tokenizer, messages: list[dict], mode: str = "chat", response_prefix: str = "") -> str:
    """Render a conversation into the text that precedes the model's answer."""
    if mode not in CHAT_MODES:
        raise InvalidArgument(f"unknown chat template mode {mode!r}; choose one of {CHAT_MODES}")
    if mode == "plain":
        parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(parts) + "\n\nAssistant: " + response_prefix
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition(
            "this model's tokenizer has no chat template; pass chat_template_mode='plain' "
            "(--chat-template plain) to format prompts as plain text"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        # Some templates (Gemma 2, for one) reject a system role: fold it into the first user turn.
        if messages and messages[0]["role"] == "system" and len(messages) > 1:
            merged = [
                {"role": messages[1]["role"], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            ]
            text = tokenizer.apply_chat_template(merged + messages[2:], tokenize=False, add_generation_prompt=True)
        else:
            raise InvalidArgument(f"the chat template failed on these messages: {exc}") from exc
    return text + response_prefix


def format_prompts(
    tokenizer, prompts: list[str], system_prompt: str | None, mode: str = "chat", response_prefix: str = ""
) -> list[str]:
    if not prompts:
        raise InvalidArgument("the prompt list is empty")
    return [render_chat(tokenizer, build_messages(p, system_prompt), mode, response_prefix) for p in prompts]


def encode(tokenizer, texts: list[str], device, mode: str = "chat"):
    """Tokenize rendered prompts; chat templates already carry their special tokens."""
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=(mode == "plain")).to(device)

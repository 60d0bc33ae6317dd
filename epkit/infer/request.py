"""A request's way in and out of the engine: chat prompts, `RequestOutput`, and output text that grows
safely while streaming.

    text, ids = prompt_ids(tokenizer, {"prompt_token_ids": [1, 15]}, vocab_size)   # any prompt form, checked
    ids, text = chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])   # template + generation prompt
    text, new_text, stopped = next_text(tokenizer, token_ids, old_text, params, final=False)

Chat messages are rendered with the tokenizer's own chat template (the shipped tokenizer's template
spells the fine-tune data format of `epkit.data`), then tokenised without adding specials again
(the template writes <s> itself).

While a request runs, its text only grows: the part of the decoded text that may still change is
held back, namely a trailing incomplete UTF-8 character (decoded as U+FFFD) and a trailing piece that
could be the start of a stop string. So the streamed pieces joined equal the final text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHAT_ROLES = ("system", "user", "assistant")
_PARTIAL_CHAR = "\ufffd"


@dataclass
class RequestOutput:
    """A request's state as returned by `generate` (final) or `stream` / `step` (incremental)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids
    text: str | None = None  # None when the checkpoint has no tokenizer
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    error: str | None = None
    timings: dict = field(default_factory=dict)
    new_token_ids: list[int] = field(default_factory=list)  # since the previous update (streaming)
    new_text: str | None = None
    logprobs: list[float] | None = None  # per generated token, when SamplingParams.logprobs is set
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per generated token: (id, logprob), best first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict:
        d = {"request_id": self.request_id, "text": self.text, "token_ids": self.token_ids,
             "finish_reason": self.finish_reason, "timings": self.timings}
        if self.error is not None:
            d["error"] = self.error
        if self.logprobs is not None:
            d["logprobs"], d["top_logprobs"] = self.logprobs, self.top_logprobs
        return d


def _content(message, index: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts, got {content!r:.80}")


def chat_prompt(tokenizer, messages) -> tuple[list[int], str]:
    """(token ids, text) of a conversation rendered with the tokenizer's chat template, ready for the
    assistant's reply. Raises ValueError naming the bad message."""
    if tokenizer is None:
        raise ValueError("chat messages need a tokenizer and the checkpoint has no tokenizer; send prompt_token_ids")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the checkpoint's tokenizer has no chat_template; send a rendered prompt instead")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={m.get('role')!r} must be one of {', '.join(CHAT_ROLES)}")
        clean.append({"role": m["role"], "content": _content(m, i)})
    text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), text


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may still change: a partial character or a stop string's start."""
    n = len(text) - len(text.rstrip(_PARTIAL_CHAR))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def next_text(tokenizer, token_ids: list[int], old: str, params, final: bool) -> tuple[str, str, bool]:
    """The output text after a new token: (text, the part new since `old`, whether a stop string ended it).

    `old` is the text returned last time. Unless `final`, text that may still change is held back.
    NOTE: decodes the whole output each time; O(n^2) over a long streamed output.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
    stopped = False
    stops = params.stop_strings
    if stops:
        hits = [i for i in (text.find(s, max(0, len(old) - len(s))) for s in stops) if i >= 0]
        if hits:
            text, stopped = text[: min(hits)], True
    if not (final or stopped):
        text = text[: len(text) - _held_back(text, stops)]
    if text.startswith(old):
        return text, text[len(old):], stopped
    # An earlier character changed (rare with byte-level BPE once partial characters are held back).
    common = next((i for i, (a, b) in enumerate(zip(old, text)) if a != b), min(len(old), len(text)))
    return text, text[common:], stopped


def _short(value) -> str:
    """A request value for an error line, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prompt_ids(tokenizer, prompt, vocab_size: int) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt: text, a list of token ids, or a dict with "prompt",
    "prompt_token_ids" or chat "messages". A bad one raises ValueError naming what is wrong."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt and prompt["prompt_token_ids"] is not None:
            prompt = prompt["prompt_token_ids"]
            if not isinstance(prompt, (list, tuple)):
                raise ValueError(f"prompt_token_ids={_short(prompt)} must be a list of token ids")
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"prompt={_short(prompt)} must be a string (token ids go in prompt_token_ids)")
        elif "messages" in prompt:
            ids, text = chat_prompt(tokenizer, prompt["messages"])
            return text, _checked(ids, vocab_size)
        else:
            raise ValueError(f"a request needs 'prompt' or 'prompt_token_ids' (or chat 'messages'), got keys "
                             f"{sorted(prompt)}")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt")
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer and the checkpoint has no tokenizer; "
                             "send prompt_token_ids")
        try:
            return prompt, list(tokenizer(prompt)["input_ids"])
        except Exception as e:  # e.g. a lone surrogate: this request fails, not the batch
            raise ValueError(f"the prompt cannot be tokenised ({type(e).__name__}: {e}); is it valid "
                             f"Unicode?") from None
    if hasattr(prompt, "tolist"):  # a tensor
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
    return None, _checked(prompt, vocab_size)


def _checked(ids, vocab_size: int) -> list[int]:
    if not ids:
        raise ValueError("empty prompt (no token ids)")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"token id {t!r} is outside the vocabulary (size {vocab_size})")
    return list(ids)

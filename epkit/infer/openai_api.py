"""OpenAI's completions and chat-completions API as plain functions over JSON objects (no web framework).

    req = parse_request(body, "chat", model_names=["tiny"], vocab_size=512, max_model_len=512)
    ...                          # the server runs req.prompts with req.params, req.n choices each
    body = response(req, "chatcmpl-1", choices, usage)    # or chunk(...) per streamed piece

A request is checked here as far as it can be without the tokenizer: fields, types, sampling settings
(`SamplingParams.validate`). The engine checks the prompt (empty, too long, ids outside the vocabulary,
chat messages) when the request is admitted. Every failure is an `ApiError`: OpenAI's
{"error": {"message", "type", "param", "code"}} with an HTTP status.

Extensions, as vLLM spells them: top_k, stop_token_ids, ignore_eos, skip_special_tokens, and
return_token_ids (each choice also carries its generated `token_ids`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 128
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "presence_penalty", "frequency_penalty", "logit_bias",
           "top_k", "stop_token_ids", "ignore_eos", "skip_special_tokens", "return_token_ids"}
FIELDS = {"completions": _COMMON | {"prompt", "echo", "logprobs", "suffix", "best_of"},
          "chat": _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}}
# OpenAI fields epkit accepts only at these values (the meaning of anything else is not implemented).
_ONLY = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}), "suffix": (None, ""),
         "best_of": (None, 1), "echo": (None, False)}
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
             "skip_special_tokens")
_TYPES = {429: "rate_limit_error", 503: "service_unavailable"}  # other 4xx: invalid_request_error


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    kind: str  # "completions" or "chat"
    model: str
    prompts: list  # what the engine takes: text, token ids, or {"messages": [...]}
    params: SamplingParams
    n: int
    stream: bool
    logprobs: int | None  # alternatives per token; None: no logprobs
    return_token_ids: bool
    created: int = field(default_factory=lambda: int(time.time()))


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}={value!r} must be true or false", name)
    return value


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
        raise ApiError(400, f"{name}={value!r} must be an integer in [{lo}, {hi}]", name)
    return value


def _prompts(prompt) -> list:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    def ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if ids(prompt):
            return [prompt]
        if all(isinstance(p, str) or ids(p) for p in prompt):
            return list(prompt)
    if prompt is None:
        raise ApiError(400, "prompt is missing", "prompt")
    if prompt == [] or (isinstance(prompt, list) and any(p == [] for p in prompt)):
        raise ApiError(400, "empty prompt", "prompt")
    raise ApiError(400, f"prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                        f"lists, got {prompt!r:.100}", "prompt")


def parse_request(body, kind: str, model_names: list[str], vocab_size: int, max_model_len: int) -> ParsedRequest:
    """Check an OpenAI request body (a parsed JSON value); raise ApiError(400) naming the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s) supplied: {', '.join(unknown)}", unknown[0])
    for name, allowed in _ONLY.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    model = body.get("model", model_names[0])
    if model not in model_names:
        raise ApiError(400, f"model {model!r} is not served here; this server serves {', '.join(model_names)}",
                       "model", "model_not_found")
    n = _int(body, "n", 1, MAX_N) or 1
    stream = _bool(body, "stream", False)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise ApiError(400, f"stream_options={body['stream_options']!r} must be an object", "stream_options")
    sampling = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    if kind == "completions":
        prompts = _prompts(body.get("prompt"))
        logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, f"messages must be a non-empty list of {{'role', 'content'}} objects, got "
                                f"{messages!r:.100}", "messages")
        prompts = [{"messages": messages}]
        top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
        logprobs = (top or 0) if _bool(body, "logprobs", False) else None
        if top is not None and logprobs is None:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if body.get("max_completion_tokens") is not None:
            sampling["max_tokens"] = body["max_completion_tokens"]
        sampling.setdefault("max_tokens", max_model_len)  # chat: up to the end of the context
    params = SamplingParams(**sampling, logprobs=logprobs)
    try:
        params.validate(vocab_size)
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        raise ApiError(400, str(e), name if name in _SAMPLING else None) from None
    return ParsedRequest(kind, model, prompts, params, n, stream, logprobs, _bool(body, "return_token_ids", False))


# ---- responses ------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One choice's output so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    top: list[list[tuple[str, float]]] = field(default_factory=list)
    finish_reason: str | None = None


def split_tokens(delta) -> tuple[list[str], list[list[tuple[str, float]]]]:
    """A Delta's token strings: the chosen tokens', and (string, logprob) alternatives per token."""
    k = len(delta.token_ids)
    chosen, rest, top = delta.tokens[:k], delta.tokens[k:], []
    for row in delta.top_logprobs:
        top.append([(s, lp) for s, (_, lp) in zip(rest[: len(row)], row)])
        rest = rest[len(row):]
    return chosen, top


def _logprobs(req: ParsedRequest, text_offset: int, tokens, logprobs, top):
    if req.logprobs is None:
        return None
    if req.kind == "chat":
        def entry(s, lp):
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(s, lp), "top_logprobs": [entry(a, b) for a, b in alts]}
                            for s, lp, alts in zip(tokens, logprobs, top)]}
    offsets = []
    for s in tokens:
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [dict(alts) for alts in top] if req.logprobs > 0 else None}


def _choice(req: ParsedRequest, index: int, text: str, token_ids, logprobs, finish_reason, delta: bool,
            first: bool = False) -> dict:
    c = {"index": index}
    if req.kind == "chat":
        if delta:
            c["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first \
                else {}
        else:
            c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    c["logprobs"] = logprobs
    c["finish_reason"] = finish_reason
    if req.return_token_ids:
        c["token_ids"] = token_ids
    return c


def _envelope(req: ParsedRequest, request_id: str, chunk: bool) -> dict:
    obj = {"completions": "text_completion", "chat": "chat.completion"}[req.kind]
    if chunk and req.kind == "chat":
        obj += ".chunk"
    return {"id": request_id, "object": obj, "created": req.created, "model": req.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: ParsedRequest, request_id: str, choices: list[Choice], use: dict) -> dict:
    """The whole answer of a request that does not stream."""
    return {**_envelope(req, request_id, False),
            "choices": [_choice(req, i, c.text, c.token_ids, _logprobs(req, 0, c.tokens, c.logprobs, c.top),
                                c.finish_reason, delta=False) for i, c in enumerate(choices)],
            "usage": use}


def chunk(req: ParsedRequest, request_id: str, index: int, text: str, token_ids, tokens, logprobs, top,
          finish_reason, text_offset: int = 0, first: bool = False) -> dict:
    """One server-sent event of a streamed answer: one choice's new text (and its end)."""
    return {**_envelope(req, request_id, True),
            "choices": [_choice(req, index, text, token_ids, _logprobs(req, text_offset, tokens, logprobs, top),
                                finish_reason, delta=True, first=first)]}


def usage_chunk(req: ParsedRequest, request_id: str, use: dict) -> dict:
    """The last event before `data: [DONE]`: no choices, the usage (as OpenAI's include_usage sends it)."""
    return {**_envelope(req, request_id, True), "choices": [], "usage": use}

"""The OpenAI API's request and response shapes, as plain data (no HTTP here).

    req = parse_completion(body)            # or parse_chat(body); ApiError(400) names what is wrong
    spec = req.sampling(default_max_tokens) # a decoder.batching.SamplingSpec
    completion_body(...), completion_chunk(...), chat_body(...), chat_chunk(...), error_body(...)

What is served: `model`, `prompt` (text, one text in a list, token ids, or one list of token
ids) or `messages` (roles system/developer/user/assistant, text content or text parts),
`max_tokens` / `max_completion_tokens`, `temperature` (default 1, as OpenAI), `top_p`, `seed`,
`stop` (a string or a list), `stream` with `stream_options.include_usage`, `n` = 1, `user`.
A field outside that list is refused with a 400 naming it, unless it carries its neutral
value (`"n": 1`, `"presence_penalty": 0`, `"logprobs": null`, ...): clients such as LangChain
send those on every request, and they ask for exactly what is done.

finish_reason: the scheduler's "eos" and "stop" are OpenAI's "stop", "length" is "length".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from decoder.batching import SamplingSpec

# HTTP status and OpenAI error type per scheduler/gRPC status code name
STATUS_OF_CODE: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
    "INTERNAL": (500, "internal_error"),
    "DATA_LOSS": (500, "internal_error"),
}
CODE_OF_STATUS = {status: code for code, (status, _) in STATUS_OF_CODE.items() if code != "DATA_LOSS"}

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
CHAT_ROLES = ("system", "developer", "user", "assistant")

_COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user")
COMPLETION_FIELDS = frozenset(_COMMON + ("prompt",))
CHAT_FIELDS = frozenset(_COMMON + ("messages", "max_completion_tokens"))


def _is_neutral_penalty(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


# field -> "does this value ask for nothing beyond what we do?"
_NEUTRAL: dict[str, Any] = {
    "presence_penalty": _is_neutral_penalty,
    "frequency_penalty": _is_neutral_penalty,
    "logit_bias": lambda v: v is None or v == {},
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "echo": lambda v: v is None or v is False,
    "best_of": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
    "suffix": lambda v: v is None or v == "",
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None,
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: v is None or v == {},
    "service_tier": lambda v: v is None or v in ("auto", "default"),
}


class ApiError(Exception):
    """An error answer: HTTP status, OpenAI error type, message, the offending field (param)
    and a short machine code."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "internal_error")
        self.param = param
        self.code = code

    @classmethod
    def from_code(cls, code: str, message: str) -> "ApiError":
        """From a scheduler/gRPC status code name (QueueFull's RESOURCE_EXHAUSTED -> 429, ...)."""
        status, type_ = STATUS_OF_CODE.get(code, (500, "internal_error"))
        return cls(status, message, type=type_, code=code.lower())

    @property
    def status_code_name(self) -> str:
        """The gRPC status code name of this answer (the metrics and request log use them for
        both front ends)."""
        return CODE_OF_STATUS.get(self.status, "INVALID_ARGUMENT" if self.status < 500 else "INTERNAL")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """One parsed /v1/completions or /v1/chat/completions request."""

    model: str
    chat: bool
    prompt_text: str | None = None           # completions: text
    prompt_ids: list[int] | None = None      # completions: token ids
    messages: list[dict[str, Any]] = field(default_factory=list)   # chat
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    def sampling(self, default_max_tokens: int) -> SamplingSpec:
        """The scheduler's SamplingSpec (validated: InvalidRequest names a bad value)."""
        return SamplingSpec(max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
                            temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                            stop=self.stop).validate()


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unsupported = sorted(k for k in body if k not in allowed and not (k in _NEUTRAL and _NEUTRAL[k](body[k])))
    if unsupported:
        raise bad(f"unsupported field(s): {', '.join(unsupported)} (this server supports: "
                  f"{', '.join(sorted(allowed))})", param=unsupported[0])


def _number(body: dict[str, Any], name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{name} must be a number, got {v!r}", param=name)
    return float(v)


def _int_or_none(body: dict[str, Any], name: str, minimum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {v!r}", param=name)
    if minimum is not None and v < minimum:
        raise bad(f"{name} must be >= {minimum}, got {v}", param=name)
    return v


def _common(body: Any, allowed: frozenset[str], chat: bool) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_fields(body, allowed)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (a string; GET /v1/models lists it)", param="model")
    max_tokens = _int_or_none(body, "max_tokens", 1)
    if chat:
        mct = _int_or_none(body, "max_completion_tokens", 1)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise bad("max_tokens and max_completion_tokens differ: give one", param="max_completion_tokens")
        max_tokens = mct if mct is not None else max_tokens
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad(f"only n = 1 is supported, got {n!r}", param="n")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop must be a string or a list of strings", param="stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(options, dict) or any(k != "include_usage" for k in options) \
                or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options supports only {\"include_usage\": true|false}", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user must be a string", param="user")
    seed = _int_or_none(body, "seed")
    return GenerationRequest(model=model, chat=chat, max_tokens=max_tokens,
                             temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                             seed=seed, stop=tuple(s for s in stops if s), stream=bool(stream),
                             include_usage=include_usage)


def _token_ids(value: list[Any]) -> list[int] | None:
    if value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    return None


def parse_completion(body: Any) -> GenerationRequest:
    """POST /v1/completions body -> GenerationRequest (ApiError 400 on anything not served)."""
    req = _common(body, COMPLETION_FIELDS, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", param="prompt")
        req.prompt_text = prompt
    elif isinstance(prompt, list) and (ids := _token_ids(prompt)) is not None:
        req.prompt_ids = ids
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("only one prompt per request is supported (n = 1, no batched prompts)", param="prompt")
    else:
        raise bad("prompt must be a non-empty string, or a non-empty list of token ids", param="prompt")
    return req


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                          param=f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_chat(body: Any) -> GenerationRequest:
    """POST /v1/chat/completions body -> GenerationRequest (ApiError 400 on anything not served)."""
    req = _common(body, CHAT_FIELDS, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        extra = sorted(k for k in m if k not in ("role", "content", "name"))
        if extra:
            raise bad(f"messages[{i}]: unsupported field(s) {', '.join(extra)} (role, content and name are "
                      f"supported)", param=f"messages[{i}].{extra[0]}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                      param=f"messages[{i}].role")
        msg: dict[str, Any] = {"role": role, "content": _message_text(m.get("content"), i)}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise bad(f"messages[{i}].name must be a string", param=f"messages[{i}].name")
            msg["name"] = m["name"]
        out.append(msg)
    req.messages = out
    return req


# --------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------
def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish: str,
                    usage: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH_REASONS.get(finish, finish)}],
            "usage": usage}


def chat_body(rid: str, created: int, model: str, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(finish, finish)}],
            "usage": usage}


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None,
                     include_usage: bool) -> dict[str, Any]:
    return _chunk(rid, created, model, "text_completion", {"text": text}, finish, include_usage)


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None,
               include_usage: bool) -> dict[str, Any]:
    return _chunk(rid, created, model, "chat.completion.chunk", {"delta": delta}, finish, include_usage)


def _chunk(rid: str, created: int, model: str, obj: str, content: dict[str, Any], finish: str | None,
           include_usage: bool) -> dict[str, Any]:
    """One streamed choice (`content`: its text or delta); `usage: null` when the stream ends
    with a usage chunk."""
    chunk: dict[str, Any] = {
        "id": rid, "object": obj, "created": created, "model": model,
        "choices": [{"index": 0, **content, "logprobs": None,
                     "finish_reason": None if finish is None else FINISH_REASONS.get(finish, finish)}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, chat: bool, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage}


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "adapmoe"}


__all__ = ["ApiError", "GenerationRequest", "parse_completion", "parse_chat", "error_body", "usage_body",
           "completion_body", "chat_body", "completion_chunk", "chat_chunk", "usage_chunk", "models_body",
           "model_body", "FINISH_REASONS", "STATUS_OF_CODE"]

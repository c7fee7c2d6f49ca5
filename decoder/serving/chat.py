"""Chat templates: a model's `tokenizer_config.json` `chat_template` (Jinja2, as Hugging Face
renders it) turns OpenAI chat `messages` into the prompt text.

    template = ChatTemplate.from_tokenizer_config(manifest.tokenizer_config)   # None: no template
    text = template.render([{"role": "user", "content": "hi"}])                # add_generation_prompt

The template comes from the model's publisher, the messages from clients, so it runs in
Jinja2's `ImmutableSandboxedEnvironment` (no attribute access to internals, no mutation of
the passed objects), with the globals and filters HF templates rely on: `raise_exception`,
`strftime_now`, `tojson` that keeps non-ASCII text, `bos_token` / `eos_token` (and the other
special-token strings of tokenizer_config.json), `add_generation_prompt`. Any failure of a
request's messages (a `raise_exception` in the template, a sandbox violation, a type error)
is a `ChatTemplateError` naming the cause: a 400 for the client, never a 500.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template cannot render these messages (or does not compile)."""


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_source(config: dict[str, Any]) -> str | None:
    """`chat_template` as a string, or from HF's list form [{"name": ..., "template": ...}] the
    one named "default"."""
    t = config.get("chat_template")
    if isinstance(t, str) and t.strip():
        return t
    if isinstance(t, list):
        for entry in t:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
    return None


class ChatTemplate:
    """One compiled chat template plus the special-token strings it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(str(message))

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        def tojson(value: Any, indent: int | None = None) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=False)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = env.from_string(source)
            self.error: str | None = None
        except TemplateError as e:  # served anyway: chat requests get this as their 400
            self._template = None
            self.error = f"the model's chat template does not compile: {e}"

    @classmethod
    def from_tokenizer_config(cls, config: dict[str, Any] | None) -> "ChatTemplate | None":
        """The template of a tokenizer_config.json dict, or None when it has none."""
        if not isinstance(config, dict):
            return None
        source = _template_source(config)
        if source is None:
            return None
        tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        return cls(source, tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (dicts with "role" and "content", as the client sent
        them, text only), ending with the assistant turn's opening when add_generation_prompt."""
        from jinja2 import TemplateError
        from jinja2.sandbox import SecurityError

        if self._template is None:
            raise ChatTemplateError(self.error or "no chat template")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"the chat template did something the sandbox forbids: {e}") from None
        except (TemplateError, Exception) as e:  # whatever the messages made the template do
            raise ChatTemplateError(f"the chat template cannot render these messages: "
                                    f"{type(e).__name__}: {e}") from None


__all__ = ["ChatTemplate", "ChatTemplateError"]

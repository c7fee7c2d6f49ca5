"""decoder.serving.chat: chat templates from tokenizer_config.json, rendered sandboxed (real
Jinja2, templates of the shapes HF checkpoints ship)."""

from __future__ import annotations

import pytest

from decoder.serving.chat import ChatTemplate, ChatTemplateError
from decoder.train_demo import DEMO_CHAT_TEMPLATE

# Mixtral-Instruct's template (abridged to its logic): alternating roles, [INST] markers, BOS
MIXTRAL_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_renders_a_mixtral_like_template_with_special_tokens():
    t = ChatTemplate.from_tokenizer_config({"bos_token": {"content": "<s>", "lstrip": False},
                                            "eos_token": "</s>", "chat_template": MIXTRAL_LIKE})
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}]
    assert t.render(msgs) == "<s>[INST] hi [/INST]hello</s>[INST] more [/INST]"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "assistant", "content": "x"}])


def test_demo_template_lays_a_chat_out_as_python_comments():
    t = ChatTemplate.from_tokenizer_config({"chat_template": DEMO_CHAT_TEMPLATE})
    text = t.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}])
    assert text == "# system: be brief\n# user: a\n# b\n# assistant:\n"
    assert t.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == "# user: x\n"


def test_no_template_named_default_and_tojson():
    assert ChatTemplate.from_tokenizer_config(None) is None
    assert ChatTemplate.from_tokenizer_config({"eos_token": "</s>"}) is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ messages | tojson }}"}]
    t = ChatTemplate.from_tokenizer_config({"chat_template": named})
    assert t.render([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'


def test_sandbox_and_broken_templates_are_request_errors():
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="sandbox|cannot render"):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}x")
    with pytest.raises(ChatTemplateError):
        mutate.render([{"role": "user", "content": "x"}])
    broken = ChatTemplate("{% for m in messages %}")
    assert broken.error and "does not compile" in broken.error
    with pytest.raises(ChatTemplateError, match="does not compile"):
        broken.render([])
    typed = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ChatTemplateError, match="TypeError"):
        typed.render([{"role": "user", "content": "x"}])

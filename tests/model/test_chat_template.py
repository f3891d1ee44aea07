"""ChatTemplate: HF conventions (whitespace control, raise_exception, tojson) and the sandbox."""

from __future__ import annotations

import pytest

from shared.chat import ChatTemplate, ChatTemplateError


def test_trim_and_lstrip_blocks_like_transformers() -> None:
    t = ChatTemplate(
        "{% for m in messages %}\n    {% if m %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}",
        bos_token="<s>",
    )
    assert t.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == (
        "<s>[user] a\n<s>[assistant] b\n[assistant] "
    )
    assert t.render([{"role": "user", "content": "a"}], add_generation_prompt=False) == "<s>[user] a\n"


def test_raise_exception_and_tojson() -> None:
    t = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ tools | tojson }}"
    )
    assert (
        t.render([{"role": "user", "content": ""}], tools=[{"name": "f", "d": "é"}])
        == '[{"name": "f", "d": "é"}]'
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        t.render([{"role": "system", "content": ""}])


def test_sandbox_blocks_python_internals() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        t.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}")
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError):
        mutating.render(messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_bad_templates_are_value_errors() -> None:
    with pytest.raises(ValueError, match="empty chat template"):
        ChatTemplate("  ")
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")

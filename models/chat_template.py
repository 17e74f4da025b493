"""Chat templates: Jinja2, rendered in a sandbox exactly as ``transformers`` renders them.

The settings and helpers are those of ``transformers.utils.chat_template_utils`` (``_compile_jinja_template``):
``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson`` and the
``{% generation %}`` tag; ``models.tokenizer.Tokenizer`` passes the special-token strings as variables. A model
without a template gets ChatML (:data:`CHATML_TEMPLATE`). ``validate_messages`` checks a conversation once,
where it enters.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_ROLES = ("system", "user", "assistant", "tool")

# ChatML (the format SmolLM2, Qwen and many others use), our documented fallback for models that ship no
# template. The end-of-turn marker <|im_end|> is what the assistant learns to emit.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to mark assistant text; we render
    the body unchanged (our labels come from prefix rendering, see ``Tokenizer.encode_chat``)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox (untrusted code from a model repo).

    Raises ValueError on a Jinja syntax error.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"chat template has a syntax error on line {err.lineno}: {err.message}") from err


def validate_messages(messages: Any, allow_empty: bool = False) -> list[dict]:
    """Check a conversation: a list of ``{"role": one of CHAT_ROLES, "content": str}`` dicts.

    Returns shallow copies (templates never see the caller's objects). Raises ValueError naming the
    offending message.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages and not allow_empty:
        raise ValueError("messages is empty; a conversation needs at least one message")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {k} has no {key!r} key (keys: {sorted(message)})")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"message {k} has unknown role {message['role']!r}; expected one of {CHAT_ROLES}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {k} content must be a string, got {type(message['content']).__name__}")
        out.append(dict(message))
    return out

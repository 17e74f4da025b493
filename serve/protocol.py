"""The OpenAI API's request and response bodies, as far as this server speaks them (vLLM's subset for LoRA).

Requests are pydantic models: a field of the wrong type or out of range is a 400 with pydantic's message naming
the field (``app.py`` turns FastAPI's 422 into OpenAI's 400). Fields the OpenAI API has and this server does not
implement (``n`` > 1, ``logprobs``, ``echo``, ...) are refused with 400 rather than silently ignored; unknown
extra fields are ignored, as OpenAI's own server does.

References: the OpenAI API reference (``/v1/completions``, ``/v1/chat/completions``, streaming chunks, ``usage``);
vLLM ``vllm/entrypoints/openai/protocol.py`` (``LoadLoRAAdapterRequest``: ``lora_name``, ``lora_path``).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class SamplingFields(BaseModel):
    """What both endpoints share. Defaults are OpenAI's (temperature 1, top_p 1)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None  # the base model's id or an adapter's name; None: the base
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    logprobs: Optional[Union[bool, int]] = None
    ignore_eos: bool = False  # vLLM's extension: generate past the end-of-sequence token
    echo: bool = False  # (completions) return the prompt too: refused

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    @field_validator("logprobs", "echo")
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of several prompts is not supported)")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    """OpenAI's error object; the ``openai`` client shows ``message``."""
    kind = {400: "invalid_request_error", 404: "NotFoundError"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def completion_body(kind: str, request_id: str, model: str, text: Optional[str], finish_reason: Optional[str],
                    chunk: bool, role: bool = False) -> dict:
    """One completion or one streamed chunk of ``kind`` "text_completion" or "chat.completion"."""
    if kind == "text_completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    elif chunk:
        delta = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}

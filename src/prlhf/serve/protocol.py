"""OpenAI's request bodies (the fields prlhf serves) and its error object.

Requests are validated strictly: a wrong type is a 400, not a coercion. Fields OpenAI defines that would change
the answer and that prlhf does not implement (logprobs, tools, ...) are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI fields that change the answer and are not implemented here: refused when set to anything but off
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "tool_choice", "functions", "function_call",
               "response_format", "logit_bias", "presence_penalty", "frequency_penalty", "audio", "modalities",
               "prediction")


class Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    user: str | None = None
    n: int = Field(1, ge=1, le=32)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # prlhf's extensions (the openai client sends them through extra_body)
    best_of: int | None = Field(None, ge=1, le=32)  # rerank best_of samples with the user's reward model
    ignore_eos: bool = False
    user_text: str | None = None  # the user's own words, for runs trained with user_text
    compare: bool = False  # answer with two candidates and a comparison_id for POST /v1/feedback (needs --db)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, [], {}):
                return name
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 that names its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None
    name = request.unsupported() if isinstance(request, Common) else None
    if name:
        raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    return request

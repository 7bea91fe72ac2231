"""The OpenAI chat-completions schema (the subset we serve) and the conversion of its messages into
the HF-style messages a chat template renders, plus the images they reference.

Pure: no HTTP and no model. Errors are :class:`ProtocolError` with the HTTP status they deserve;
their messages never echo request content (image bytes, keys).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
)

# --- errors ----------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A client error with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- request schema --------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: a string where a number or boolean belongs is an error, as it is for OpenAI
    # ("stream": "no" would otherwise stream). Unknown fields are ignored (OpenAI rejects them),
    # so clients sending newer or vendor-specific parameters keep working.
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


MAX_MESSAGES = 2048


class ChatCompletionRequest(_Model):
    model: str
    # OpenAI's own cap. Preparing a prompt is serialised (one tokenizer), and 200k tiny messages
    # (a 7 MB body) held every other request for 14 s; no chat needs more turns than this.
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    # OpenAI's range includes 0 (vLLM's does not): the most probable token alone.
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    # How many choices; a whole number >= 1 (2.0, "2" and true are 400s). The server's upper
    # bound depends on its engine (api.max_choices), so it is checked there.
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tool_choice: str | dict | None = None
    user: str | None = None

    @field_validator("stream", "n", mode="before")
    @classmethod
    def _null_is_the_default(cls, v, info):
        # OpenAI's schema (and vLLM) take null for these: the default.
        return {"stream": False, "n": 1}[info.field_name] if v is None else v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field asking for what this server cannot give; an answer
        without it would pass for one, so it is a 400 instead of being ignored. ``tools`` alone
        is fine (the model may always answer without calling one); a ``tool_choice`` that
        forces a call is not, nor is JSON output (``response_format``) or logprobs."""
        if self.logprobs or self.top_logprobs:
            field = "logprobs" if self.logprobs else "top_logprobs"
            return field, "logprobs are not supported by this server"
        fmt = (self.response_format or {}).get("type", "text")
        if fmt != "text":
            return "response_format", f"response_format {str(fmt)[:40]!r} is not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calls are not supported by this server"
        return None

    def max_tokens_param(self) -> str:
        """The field that set :meth:`requested_max_tokens`, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raise a 400 ProtocolError naming the fields (never values)."""
    if not isinstance(data, dict):
        raise ProtocolError(400, "request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors(include_input=False, include_url=False)
        # A union field reports one error per branch; the branch that got deepest into the
        # value is the one the client meant (a content list with a bad part, not "not a string").
        depth = max(len(e["loc"]) for e in errs)
        deepest = [e for e in errs if len(e["loc"]) == depth]
        where = _openai_path(deepest[0]["loc"])
        msg = " or ".join(
            dict.fromkeys(e["msg"] for e in deepest if _openai_path(e["loc"]) == where)
        )
        msg = msg[:1] + msg[1:].replace("Input should be ", "")  # "Input should be a or b"
        msg = msg.removeprefix("Value error, ")
        raise ProtocolError(
            400, f"invalid request: {where or 'body'}: {msg}", param=where or None
        ) from None


def _openai_path(loc: tuple) -> str:
    """pydantic's ``("messages", 0, "content", "list[...]", 0, "text", "text")`` as OpenAI
    writes it, ``messages[0].content[0].text``: union branch names and tagged-union tags are
    pydantic's, not the client's."""
    out: list[str] = []
    prev = None
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part in _BRANCHES or "[" in part or part == prev:
            pass
        else:
            out.append(("." if out else "") + part)
        prev = part
    return "".join(out)


_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


# --- response schema -------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        # OpenAI's deltas carry only what they set: {"content": "x"}, and {} in the last chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llavamed"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


# --- messages -> prompt ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: inline bytes (data URL) or a remote URL to fetch."""

    where: str  # e.g. "messages[0].content[1]", for error messages
    data: bytes | None = None
    mime: str | None = None
    url: str | None = None


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),", re.S | re.I)
ACCEPTED_MIME = {"application/dicom", "application/octet-stream"}


def _check_fetchable(url: str, where: str) -> None:
    """A 400 for an http(s) URL httpx cannot fetch, before any fetch: httpx raises InvalidURL
    (no HTTPError) for some, and a port beyond 65535 fails deep in the socket layer."""
    import httpx

    try:
        port = httpx.URL(url).port
    except (httpx.InvalidURL, ValueError) as exc:
        raise ProtocolError(
            400, f"{where}: invalid image URL ({exc})", param=where, code="invalid_image_url"
        ) from None
    if port is not None and not 0 < port < 65536:
        raise ProtocolError(
            400, f"{where}: invalid image URL (port {port})", param=where, code="invalid_image_url"
        )


def parse_image_url(url: str, where: str, *, allow_remote: bool, max_bytes: int) -> ImageRef:
    """Classify and (for data URLs) decode an ``image_url``. Raises ProtocolError: 400 for
    refused schemes, malformed data URLs and base64; 413 for images over ``max_bytes``."""
    url = url.strip()
    low = url[:16].lower()
    if low.startswith("data:"):
        m = _DATA_URL.match(url[:256])
        if not m:
            raise ProtocolError(
                400, f"{where}: malformed data URL", param=where, code="invalid_image"
            )
        mime = (m.group("mime") or "").lower()
        params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
        if "base64" not in params:
            raise ProtocolError(
                400, f"{where}: data URL must be base64-encoded", param=where, code="invalid_image"
            )
        if mime and not (mime.startswith("image/") or mime in ACCEPTED_MIME):
            raise ProtocolError(
                400, f"{where}: unsupported media type {mime!r}", param=where, code="invalid_image"
            )
        # Line breaks are dropped before the size check: `base64 FILE` and encodebytes wrap at
        # 76 columns, and counting the newlines refused images up to 1.3% under the limit. The
        # body (and so the payload) is already capped by max_request_bytes.
        payload = "".join(url[m.end() :].split())
        # Refuse before decoding: base64 is 4 chars per 3 bytes.
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise ProtocolError(
                413,
                f"{where}: image larger than {max_bytes} bytes",
                param=where,
                code="image_too_large",
            )
        payload += "=" * (-len(payload) % 4 if len(payload) % 4 != 1 else 0)  # padding is optional
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(
                400, f"{where}: malformed base64 in data URL", param=where, code="invalid_image"
            ) from None
        if not data:
            raise ProtocolError(400, f"{where}: empty image", param=where, code="invalid_image")
        if len(data) > max_bytes:
            raise ProtocolError(
                413,
                f"{where}: image larger than {max_bytes} bytes",
                param=where,
                code="image_too_large",
            )
        return ImageRef(where, data=data, mime=mime or None)
    if low.startswith(("http://", "https://")):
        if not allow_remote:
            raise ProtocolError(
                400,
                f"{where}: remote image URLs are disabled on this server "
                "(start it with --allow-remote-images, or send a data: URL)",
                param=where,
                code="remote_images_disabled",
            )
        _check_fetchable(url, where)
        return ImageRef(where, url=url)
    if low.startswith("file:"):
        raise ProtocolError(
            400,
            f"{where}: file: URLs are refused; send the image as a data: URL",
            param=where,
            code="invalid_image_url",
        )
    raise ProtocolError(
        400,
        f"{where}: image_url must be a data: URL (paths are refused)",
        param=where,
        code="invalid_image_url",
    )


def _check_unicode(text: str, where: str) -> None:
    """A 400 naming the field for text that is not valid Unicode (JSON's lone ``\\ud800``
    escapes): the tokenizer refused it with a message about its argument types."""
    from llavamed.serve.engine import invalid_unicode

    why = invalid_unicode(text)
    if why is not None:
        raise ProtocolError(400, f"{where}: text is not valid Unicode ({why})", param=where)


def to_hf_messages(
    messages: list[ChatMessage], *, allow_remote: bool, max_image_bytes: int
) -> tuple[list[dict], list[ImageRef]]:
    """OpenAI messages -> (HF messages with ``{"type": "image"}`` placeholders, image refs in
    prompt order). System/developer turns, wherever they are, become one leading system turn
    (their texts in order, a blank line apart): the chat templates read only ``messages[0]`` as
    the system prompt and would render any later one as an assistant reply."""
    hf: list[dict] = []
    system: list[str] = []
    images: list[ImageRef] = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        parts: list[dict] = []
        content = msg.content
        # OpenAI refuses both: only an assistant turn (one that called tools) may go without
        # content, and a content list has at least one part. An empty user turn prompted the
        # model with nothing and answered anyway.
        if content is None and msg.role != "assistant":
            raise ProtocolError(
                400,
                f"messages[{i}].content: required in a {msg.role} message",
                param=f"messages[{i}].content",
            )
        if isinstance(content, list) and not content:
            raise ProtocolError(
                400,
                f"messages[{i}].content: empty array; expected at least one content part",
                param=f"messages[{i}].content",
            )
        if content is None:
            content = ""
        if isinstance(content, str):
            _check_unicode(content, f"messages[{i}].content")
            parts.append({"type": "text", "text": content})
        else:
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    _check_unicode(part.text, f"{where}.text")
                    parts.append({"type": "text", "text": part.text})
                else:
                    if role != "user":
                        raise ProtocolError(
                            400, f"{where}: images are only accepted in user messages", param=where
                        )
                    images.append(
                        parse_image_url(
                            part.image_url.url,
                            where,
                            allow_remote=allow_remote,
                            max_bytes=max_image_bytes,
                        )
                    )
                    parts.append({"type": "image"})
        if role == "user":
            # LLaVA trains every image at the front of its turn (preprocess_multimodal, and our
            # trainer); a client that sends its text first ("Q\n<image>") would prompt the model
            # in a shape it never saw. Images keep their order among themselves.
            parts = [p for p in parts if p["type"] == "image"] + [
                p for p in parts if p["type"] != "image"
            ]
        if role in ("system", "assistant"):
            text = "\n".join(p["text"] for p in parts if p["type"] == "text")
            if role == "system":
                system.append(text)
                continue
            parts = [{"type": "text", "text": text}]
        hf.append({"role": role, "content": parts})
    if system:
        text = "\n\n".join(t for t in system if t)
        hf.insert(0, {"role": "system", "content": [{"type": "text", "text": text}]})
    if hf[-1]["role"] == "assistant":
        raise ProtocolError(
            400, "the last message must not be from the assistant", param="messages"
        )
    if not any(m["role"] == "user" for m in hf):
        raise ProtocolError(400, "the conversation has no user message", param="messages")
    return hf, images

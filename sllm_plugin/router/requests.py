"""Client request bodies: parsed with a depth limit, and validated where the router reads them.

The router forwards the body it received (vLLM validates every sampling parameter itself), but
the fields the router reads to route, track and move a request are checked here first, with
OpenAI's shapes, so a wrong type is the client's 400 naming the field, never the router's 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Deeper than any OpenAI body (a chat message's content parts, a tool's JSON schema) and far
# below what the JSON encoders on the way upstream recurse into (orjson's 255 levels).
MAX_JSON_DEPTH = 64


class BadRequest(ValueError):
    """The body is not a valid request; `param` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`, nested at most MAX_JSON_DEPTH levels; BadRequest otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e) or "recursion" in str(e):
            raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} "
                             "levels") from None
        try:  # what orjson refuses and the standard library accepts (lone surrogates)
            body = json.loads(raw)
        except RecursionError:
            raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} "
                             "levels") from None
        except ValueError as e2:
            raise BadRequest(f"malformed JSON body: {e2}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    # Only bodies with that many brackets can be that deep: the common case costs two counts.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (the input is the client's)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class _Request(BaseModel):
    """The fields of both endpoints that the router itself reads."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    min_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_k: int | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    return_token_ids: bool | None = None


class CompletionRequest(_Request):
    prompt: NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr], Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]


def validate_request(kind: Literal["completion", "chat"], body: dict[str, Any]) -> _Request:
    """The request's fields the router reads, checked; BadRequest names the first bad one."""
    field = "messages" if kind == "chat" else "prompt"
    if body.get("model") is None:
        raise BadRequest("'model' is required", "model")
    if body.get(field) in (None, "", []):
        raise BadRequest(f"'{field}' is required", field)
    try:
        return (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
    # A union (prompt, stop, content) fails once per member: say what the field accepts.
    loc = errors[0]["loc"]
    top, where = str(loc[0]), _where(loc)
    union = [part for part in loc if _is_member(part)]
    if union and top in ACCEPTS:
        message = f"{top}: {ACCEPTS[top]}"
    elif union and "content" in loc:
        message = f"{where}: {ACCEPTS['content']}"
    else:
        message = f"{where}: {errors[0]['msg']}"
    raise BadRequest(message, top)


ACCEPTS = {
    "prompt": ("must be a non-empty string, list of strings, list of token ids or list of "
               "lists of token ids"),
    "stop": "must be a non-empty string or a list of non-empty strings",
    "content": "must be a string, a list of content parts (objects) or null",
}


def _is_member(part: Any) -> bool:
    """Whether a pydantic location part names a union member rather than a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part
                                      or part.startswith(("constrained-", "function-")))


def _where(loc: tuple) -> str:
    """`messages[0].content` from pydantic's location, without the union members' names."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_member(part):
            out += f".{part}" if out else str(part)
    return out or "body"

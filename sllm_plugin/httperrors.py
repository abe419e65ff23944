"""One wording and one set of handlers for request errors in the daemons' HTTP APIs (node
and router)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def describe_request_errors(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one line: malformed JSON said plainly, else field: why."""
    problems = []
    for err in errors:
        if err.get("type") == "json_invalid":
            problems.append(f"malformed JSON body: {err.get('ctx', {}).get('error', '')}")
        else:
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def install_request_error_handlers(app: Any, error: Callable[[int, str, str], Any],
                                   invalid_kind: str, http_kind: str) -> None:
    """Answer FastAPI's request-validation errors (400) and Starlette's HTTP errors (404, 405,
    ...) with `error(status, message, kind)`, the API's own error shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def invalid(_: Any, e: RequestValidationError) -> Any:
        return error(400, describe_request_errors(e.errors()), invalid_kind)

    async def http(_: Any, e: HTTPException) -> Any:
        return error(e.status_code, str(e.detail), http_kind)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)

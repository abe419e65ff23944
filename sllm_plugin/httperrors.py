"""One wording for request-validation errors in the daemons' HTTP APIs (node and router)."""

from __future__ import annotations

from collections.abc import Sequence
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

"""What a failed vLLM process printed, reduced to its root cause.

vLLM's API server ends a failed start with a wrapper ("Engine core initialization failed. See
root cause above"); the engine core printed the real exception tens of lines earlier, behind a
log prefix. The node daemon follows a replica's whole output with `RootCause` (a log tail would
miss it) and the router reads the same from a node's answer with `root_cause`. Pure `re`: the
router imports it, and the router imports no torch.
"""

from __future__ import annotations

import re

# The last line of a Python traceback, `pkg.module.SomeError: message`, as vLLM and its engine
# core process print it (the latter behind "(EngineCore pid=N) ERROR <date> [file:line] ").
_LOG_PREFIX = re.compile(r"^(?:\([^)]*pid=\d+\)\s*)?(?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)"
                        r"(?::\s.*)?$")
# Wrappers that only point at the real cause printed before them.
_GENERIC = ("See root cause above", "Engine core initialization failed")
_CONTINUATION_LINES = 3
_MAX_LINE_CHARS = 2000


class RootCause:
    """Fed a process's output line by line; `result()` is its most informative exception line:
    the last one that is not a wrapper pointing "above" (else the last wrapper), with the
    indented lines that continue it (pydantic's details). Memory stays bounded."""

    def __init__(self) -> None:
        self._specific: list[str] | None = None
        self._generic: list[str] | None = None
        self._open: list[str] | None = None  # the exception being continued

    def feed(self, line: str) -> None:
        line = _LOG_PREFIX.sub("", line.rstrip())[:_MAX_LINE_CHARS]
        if _EXCEPTION.match(line):
            self._open = [line]
            if any(g in line for g in _GENERIC):
                self._generic = self._open
            else:
                self._specific = self._open
            return
        if self._open is not None and len(self._open) <= _CONTINUATION_LINES and \
                line.startswith("  ") and not line.lstrip().startswith(("File ", "^",
                                                                        "Traceback")):
            self._open.append(line.strip())
        else:
            self._open = None

    def result(self) -> str | None:
        picked = self._specific or self._generic
        return " ".join(picked) if picked else None


def root_cause(output: str) -> str | None:
    """The root cause (see RootCause) of a whole output at once."""
    cause = RootCause()
    for line in output.splitlines():
        cause.feed(line)
    return cause.result()

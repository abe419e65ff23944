"""Request traces for the simulator: the shared Azure and Mooncake traces, and the same shapes
for a user's own trace (a CSV of timestamp/tokens, a JSONL like Mooncake's).

A trace file is untrusted input: every line is bounded in length, the number of lines is
bounded, every value is checked (a negative, NaN, infinite, non-integral or huge token count or
timestamp is an error naming the file, the line and the column), and timestamps are sorted
rather than trusted to be in order. Errors never echo the offending value (a trace may hold
anything); they say what was wrong with it. Parsing is the stdlib's `csv` and `json`.

Timestamps are kept exact while they are compared and subtracted (`Decimal`, and integer
nanoseconds for ISO times: the Azure trace's `2023-11-16 18:17:03.9799600` has 7 fractional
digits, more than `datetime` keeps), and become float seconds only once they are relative to
the first request.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

from sllm_plugin.sim.types import TraceRequest

FORMATS = ("azure", "mooncake", "csv", "jsonl")

# Bounds on what a trace may hold. The shared traces are far inside them (Azure code: 8,819
# lines of at most 40 characters; Mooncake conversation: 12,031 lines of at most 2,053
# characters, inputs up to 126,195 tokens, 247 blocks).
DEFAULT_MAX_ROWS = 1_000_000  # lines read (header and blank lines included)
DEFAULT_MAX_LINE_CHARS = 1 << 20  # characters in one line, newline included
MAX_TOKENS = 10_000_000  # per request, input or output
MAX_BLOCKS = 1 << 16  # prefix blocks per request (10M tokens / 512 is 19,532)
MAX_BLOCK_ID = (1 << 63) - 1
MAX_TIMESTAMP_S = Decimal(10) ** 11  # seconds since whatever epoch the trace uses (~year 5100)

AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

# Column names the generic CSV loader accepts, compared case-insensitively. Exactly one column
# per role must be present.
CSV_TIME_S_COLUMNS = ("arrival_s", "timestamp", "time", "arrival_time", "ts")
CSV_TIME_MS_COLUMNS = ("timestamp_ms", "arrival_ms", "time_ms")
CSV_INPUT_COLUMNS = ("input_tokens", "input_length", "contexttokens", "context_tokens",
                     "prompt_tokens", "num_input_tokens", "request_tokens")
CSV_OUTPUT_COLUMNS = ("output_tokens", "output_length", "generatedtokens", "generated_tokens",
                      "completion_tokens", "num_output_tokens", "response_tokens")
CSV_BLOCK_COLUMNS = ("blocks", "hash_ids")

# JSONL keys: Mooncake's (`timestamp` in milliseconds, `input_length`, `output_length`,
# `hash_ids`) or ours (`arrival_s` in seconds, `input_tokens`, `output_tokens`, `blocks`).
JSON_TIME_KEYS = {"timestamp": Decimal("0.001"), "arrival_s": Decimal(1)}  # key -> seconds/unit
JSON_INPUT_KEYS = ("input_length", "input_tokens")
JSON_OUTPUT_KEYS = ("output_length", "output_tokens")
JSON_BLOCK_KEYS = ("hash_ids", "blocks")

_ISO = re.compile(
    r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class TraceError(ValueError):
    """A trace file cannot be read; the message names the file, the line and the column."""

    def __init__(self, path: str | Path, line: int | None, message: str,
                 column: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        col = f": column {column!r}" if column is not None else ""
        super().__init__(f"{where}{col}: {message}")
        self.path = str(path)
        self.line = line
        self.column = column


@dataclass
class _Row:
    time_s: Decimal  # absolute, in the trace's own epoch
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]


# --------------------------------------------------------------------------- reading lines


class _Lines:
    """The file's lines, each bounded in length, their count bounded; `.n` is the 1-based
    number of the last line handed out (what an error names)."""

    def __init__(self, f: TextIO, path: Path, max_rows: int, max_line_chars: int) -> None:
        self.f, self.path, self.max_rows, self.max_chars = f, path, max_rows, max_line_chars
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                line = self.f.readline(self.max_chars + 1)
            except UnicodeDecodeError:
                raise TraceError(self.path, self.n + 1, "not UTF-8 text") from None
            if not line:
                return
            self.n += 1
            if len(line) > self.max_chars:
                raise TraceError(self.path, self.n,
                                 f"line longer than {self.max_chars} characters")
            if self.n > self.max_rows:
                raise TraceError(self.path, self.n,
                                 f"more than {self.max_rows} lines (raise max_rows to read it)")
            yield line


def _open(path: Path) -> TextIO:
    """The trace, opened for text; a FIFO or device is refused before any read (opened
    non-blocking, so a FIFO with no writer cannot hang the loader)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TraceError(path, None, "no such trace file") from None
    except OSError as e:
        raise TraceError(path, None, f"cannot open the trace ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TraceError(path, None, "not a regular file")
    return os.fdopen(fd, encoding="utf-8-sig", newline="")


# --------------------------------------------------------------------------- values


def _int(value: Any, path: Path, line: int, column: str, lo: int, hi: int,
         text: bool = False) -> int:
    """An integer in [lo, hi] from a CSV field (`text`) or a JSON number (an integral float
    is fine; a JSON string is not a number)."""
    if isinstance(value, bool):
        raise TraceError(path, line, "not an integer (a boolean)", column)
    if isinstance(value, str) and text:
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise TraceError(path, line, "not a number", column) from None
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TraceError(path, line, "not a finite number (NaN or infinity)", column)
        if value != value.to_integral_value():
            raise TraceError(path, line, "not an integer", column)
        if abs(value) > hi:  # before int(): 1e999999 must not become a huge int
            raise TraceError(path, line, f"larger than {hi}", column)
        value = int(value)
    if not isinstance(value, int):
        raise TraceError(path, line, f"not an integer ({type(value).__name__})", column)
    if value < lo:
        raise TraceError(path, line, "negative" if value < 0 else f"smaller than {lo}", column)
    if value > hi:
        raise TraceError(path, line, f"larger than {hi}", column)
    return value


def _seconds(value: Any, unit: Decimal, path: Path, line: int, column: str,
             text: bool = False) -> Decimal:
    """A non-negative finite timestamp in seconds, exact, from a CSV field (`text`) or a JSON
    number."""
    if isinstance(value, bool):
        raise TraceError(path, line, "not a number (a boolean)", column)
    if isinstance(value, str) and text:
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise TraceError(path, line, "not a number", column) from None
    elif isinstance(value, int):
        if abs(value) > MAX_TIMESTAMP_S / unit:
            raise TraceError(path, line, f"later than {MAX_TIMESTAMP_S} s", column)
        value = Decimal(value)
    if not isinstance(value, Decimal):
        raise TraceError(path, line, f"not a number ({type(value).__name__})", column)
    if not value.is_finite():
        raise TraceError(path, line, "not a finite number (NaN or infinity)", column)
    if value < 0:
        raise TraceError(path, line, "negative timestamp", column)
    if value > MAX_TIMESTAMP_S / unit:  # before multiplying: 1e999999 must not overflow
        raise TraceError(path, line, f"later than {MAX_TIMESTAMP_S} s", column)
    return value * unit


def _iso_seconds(text: str, path: Path, line: int, column: str) -> Decimal:
    """An ISO 8601 date and time (`2023-11-16 18:17:03.9799600`, up to 9 fractional digits,
    optionally `Z` or `+HH:MM`; naive times are read as UTC) in exact seconds since 1970."""
    m = _ISO.fullmatch(text.strip())
    if m is None:
        raise TraceError(path, line, "neither a number of seconds nor an ISO date and time",
                         column)
    main, frac, tz = m.groups()
    try:
        dt = datetime.fromisoformat(main + (tz or ""))
    except ValueError:
        raise TraceError(path, line, "not a valid date and time", column) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    whole = (dt - _EPOCH) // timedelta(seconds=1)
    ns = int((frac or "").ljust(9, "0"))
    return Decimal(whole) + Decimal(ns).scaleb(-9)


def _blocks(value: Any, path: Path, line: int, column: str,
            text: bool = False) -> tuple[int, ...]:
    if isinstance(value, str) and text:  # CSV: ids separated by spaces (or semicolons)
        value = value.replace(";", " ").split()
    if not isinstance(value, list):
        raise TraceError(path, line, "not a list of block ids", column)
    if len(value) > MAX_BLOCKS:
        raise TraceError(path, line, f"more than {MAX_BLOCKS} blocks", column)
    return tuple(_int(v, path, line, column, 0, MAX_BLOCK_ID, text) for v in value)


# --------------------------------------------------------------------------- CSV


def _pick(header: list[str], names: tuple[str, ...], path: Path, role: str,
          required: bool = True) -> int | None:
    lowered = [h.strip().lower() for h in header]
    hits = [i for i, h in enumerate(lowered) if h in names]
    if len(hits) > 1:
        raise TraceError(path, 1, f"more than one {role} column: "
                         + ", ".join(repr(header[i]) for i in hits))
    if not hits:
        if required:
            raise TraceError(path, 1, f"no {role} column (one of: {', '.join(names)})")
        return None
    return hits[0]


def _read_csv(path: Path, lines: _Lines, azure: bool) -> list[_Row]:
    reader = csv.reader(lines, strict=True)
    rows: list[_Row] = []
    try:
        header = next((r for r in reader if r), None)
        if header is None:
            raise TraceError(path, None, "empty trace (no header)")
        if azure:
            if tuple(h.strip() for h in header) != AZURE_HEADER:
                raise TraceError(path, lines.n, "not the Azure LLM trace header "
                                 f"({','.join(AZURE_HEADER)})")
            ti, ii, oi, bi = 0, 1, 2, None
            ms = False
        else:
            t_s = _pick(header, CSV_TIME_S_COLUMNS, path, "timestamp", required=False)
            t_ms = _pick(header, CSV_TIME_MS_COLUMNS, path, "timestamp", required=False)
            if (t_s is None) == (t_ms is None):
                raise TraceError(path, lines.n, "need exactly one timestamp column (seconds or "
                                 f"ISO time: {', '.join(CSV_TIME_S_COLUMNS)}; milliseconds: "
                                 f"{', '.join(CSV_TIME_MS_COLUMNS)})")
            ms = t_ms is not None
            ti = t_ms if ms else t_s
            ii = _pick(header, CSV_INPUT_COLUMNS, path, "input tokens")
            oi = _pick(header, CSV_OUTPUT_COLUMNS, path, "output tokens")
            bi = _pick(header, CSV_BLOCK_COLUMNS, path, "blocks", required=False)
        names = [h.strip() for h in header]
        iso: bool | None = None  # decided by the first data row, then held to
        for row in reader:
            n = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise TraceError(path, n, f"{len(row)} fields, the header has {len(header)}")
            tcol = names[ti]
            raw_t = row[ti]
            if ms:
                t = _seconds(raw_t, Decimal("0.001"), path, n, tcol, text=True)
            else:
                try:
                    Decimal(raw_t.strip())
                    is_iso = False
                except InvalidOperation:
                    is_iso = True
                if iso is None:
                    iso = is_iso
                elif iso != is_iso:
                    raise TraceError(path, n, "timestamps mix ISO times and numbers", tcol)
                t = (_iso_seconds(raw_t, path, n, tcol) if is_iso
                     else _seconds(raw_t, Decimal(1), path, n, tcol, text=True))
            rows.append(_Row(
                t,
                _int(row[ii], path, n, names[ii], 1, MAX_TOKENS, text=True),
                _int(row[oi], path, n, names[oi], 1, MAX_TOKENS, text=True),
                _blocks(row[bi], path, n, names[bi], text=True) if bi is not None else (),
            ))
    except csv.Error as e:
        raise TraceError(path, lines.n, f"malformed CSV ({e})") from None
    return rows


# --------------------------------------------------------------------------- JSONL


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _one_key(obj: dict[str, Any], keys: tuple[str, ...], path: Path, line: int,
             role: str, required: bool = True) -> str | None:
    hits = [k for k in keys if k in obj]
    if len(hits) > 1:
        raise TraceError(path, line, f"both {hits[0]!r} and {hits[1]!r} given for {role}")
    if not hits:
        if required:
            raise TraceError(path, line, f"no {role} (one of: {', '.join(keys)})")
        return None
    return hits[0]


def _read_jsonl(path: Path, lines: _Lines, mooncake: bool) -> list[_Row]:
    rows: list[_Row] = []
    time_key: str | None = None  # the first record's choice; every record must agree
    time_keys = ("timestamp",) if mooncake else tuple(JSON_TIME_KEYS)
    for text in lines:
        n = lines.n
        if not text.strip():
            continue
        try:
            obj = json.loads(text, parse_float=Decimal, parse_constant=_no_constants,
                             object_pairs_hook=_no_duplicates)
        except RecursionError:
            raise TraceError(path, n, "JSON nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, our hooks, int digit limits
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise TraceError(path, n, f"not valid JSON ({msg})") from None
        if not isinstance(obj, dict):
            raise TraceError(path, n, "not a JSON object")
        tk = _one_key(obj, time_keys, path, n, "timestamp")
        assert tk is not None
        if time_key is None:
            time_key = tk
        elif tk != time_key:
            raise TraceError(path, n, f"uses {tk!r}, earlier lines use {time_key!r}", tk)
        ik = _one_key(obj, JSON_INPUT_KEYS[:1] if mooncake else JSON_INPUT_KEYS, path, n,
                      "input tokens")
        ok = _one_key(obj, JSON_OUTPUT_KEYS[:1] if mooncake else JSON_OUTPUT_KEYS, path, n,
                      "output tokens")
        bk = _one_key(obj, JSON_BLOCK_KEYS[:1] if mooncake else JSON_BLOCK_KEYS, path, n,
                      "blocks", required=False)
        assert ik is not None and ok is not None
        rows.append(_Row(
            _seconds(obj[tk], JSON_TIME_KEYS[tk], path, n, tk),
            _int(obj[ik], path, n, ik, 1, MAX_TOKENS),
            _int(obj[ok], path, n, ok, 1, MAX_TOKENS),
            _blocks(obj[bk], path, n, bk) if bk is not None else (),
        ))
    return rows


# --------------------------------------------------------------------------- detection


def detect_format(path: str | Path, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> str:
    """The trace format of `path`, from its extension and its first non-blank line:
    `.jsonl`/`.json`/`.ndjson` (or a first line starting with `{`) is "mooncake" when that line
    has Mooncake's `timestamp` key, else "jsonl"; anything else is read as CSV, "azure" when
    the header is exactly `TIMESTAMP,ContextTokens,GeneratedTokens`, else "csv"."""
    path = Path(path)
    with _open(path) as f:
        first = ""
        for line in _Lines(f, path, max_rows=1000, max_line_chars=max_line_chars):
            if line.strip():
                first = line.strip()
                break
    if not first:
        raise TraceError(path, None, "empty trace")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson") or first.startswith("{"):
        try:
            obj = json.loads(first, parse_float=Decimal, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            return "jsonl"  # the loader names the line and what is wrong with it
        return "mooncake" if isinstance(obj, dict) and "timestamp" in obj else "jsonl"
    try:
        header = next(csv.reader([first]))
    except csv.Error:
        return "csv"
    return "azure" if tuple(h.strip() for h in header) == AZURE_HEADER else "csv"


# --------------------------------------------------------------------------- the loader


def load_trace(path: str | Path, format: str | None = None, *, limit: int | None = None,
               start_s: float = 0.0, duration_s: float | None = None,
               max_rows: int = DEFAULT_MAX_ROWS,
               max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> list[TraceRequest]:
    """The requests of the trace at `path`, sorted by arrival (stable: equal timestamps keep
    the file's order), `arrival_s` in seconds since the first request returned.

    `format` is one of FORMATS, or None to detect it (`detect_format`):
      - "azure": the Azure LLM inference trace 2023 CSV, header exactly
        `TIMESTAMP,ContextTokens,GeneratedTokens`, ISO timestamps with up to 9 fractional
        digits (the trace has 7; kept exactly).
      - "mooncake": JSONL, one object per line: `timestamp` (ms), `input_length`,
        `output_length`, optional `hash_ids` (512-token prefix block ids).
      - "csv": a header row, then one request per row. Columns (names case-insensitive, exactly
        one per role): timestamp in seconds or as an ISO time (`arrival_s`, `timestamp`,
        `time`, `arrival_time`, `ts`) or in milliseconds (`timestamp_ms`, `arrival_ms`,
        `time_ms`); input tokens (`input_tokens`, `input_length`, `ContextTokens`,
        `context_tokens`, `prompt_tokens`, `num_input_tokens`, `request_tokens`); output
        tokens (`output_tokens`, `output_length`, `GeneratedTokens`, `generated_tokens`,
        `completion_tokens`, `num_output_tokens`, `response_tokens`); optional blocks
        (`blocks` or `hash_ids`, ids separated by spaces). Other columns are ignored.
      - "jsonl": Mooncake's keys or `arrival_s` (seconds), `input_tokens`, `output_tokens`,
        optional `blocks`; every line must use the same timestamp key. Other keys are ignored.

    Token counts must be integers in [1, MAX_TOKENS]; timestamps finite, non-negative, below
    MAX_TIMESTAMP_S; block ids integers in [0, 2**63). Anything else is a TraceError naming
    the file, line and column. At most `max_rows` lines of at most `max_line_chars`
    characters are read.

    The window: after sorting, the requests arriving in [start_s, start_s + duration_s)
    seconds after the trace's first request are kept (duration None: to the end), then the
    first `limit` of them (None: all); arrivals are then made relative to the first kept one.
    An empty result is an error (a simulation of nothing is a mistake, not a result).
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown trace format {format!r} (one of: {', '.join(FORMATS)})")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive number of requests, not {limit!r}")
    if not math.isfinite(start_s) or start_s < 0:
        raise ValueError(f"start_s must be finite and non-negative, not {start_s!r}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and positive, not {duration_s!r}")
    if max_rows < 1 or max_line_chars < 1:
        raise ValueError("max_rows and max_line_chars must be positive")
    fmt = format or detect_format(path, max_line_chars=max_line_chars)
    with _open(path) as f:
        lines = _Lines(f, path, max_rows, max_line_chars)
        if fmt in ("azure", "csv"):
            rows = _read_csv(path, lines, azure=fmt == "azure")
        else:
            rows = _read_jsonl(path, lines, mooncake=fmt == "mooncake")
    if not rows:
        raise TraceError(path, None, "no requests in the trace")
    rows.sort(key=lambda r: r.time_s)
    t0 = rows[0].time_s
    lo = t0 + Decimal(repr(float(start_s)))
    hi = None if duration_s is None else lo + Decimal(repr(float(duration_s)))
    kept = [r for r in rows if r.time_s >= lo and (hi is None or r.time_s < hi)]
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        raise TraceError(path, None, f"no requests between {start_s} s and "
                         f"{'the end' if duration_s is None else f'{start_s + duration_s} s'}"
                         " after the first one")
    base = kept[0].time_s
    return [TraceRequest(arrival_s=float(r.time_s - base), input_tokens=r.input_tokens,
                         output_tokens=r.output_tokens, blocks=r.blocks) for r in kept]

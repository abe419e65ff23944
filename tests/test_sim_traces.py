"""The trace loaders (sllm_plugin/sim/traces.py) on the committed excerpts of the shared traces
and on traces the tests write: counts, arrivals, token counts and blocks compared with the raw
lines read here independently (plain string splitting), format detection, bad rows."""

from __future__ import annotations

import json
import os
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllm_plugin.sim.traces import (
    MAX_TOKENS,
    TraceError,
    detect_format,
    load_trace,
)
from sllm_plugin.sim.types import TraceRequest

DATA = Path(__file__).parent / "data" / "traces"
AZURE = DATA / "azure_llm_2023_code_head300.csv"
MOONCAKE = DATA / "mooncake_conversation_head300.jsonl"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def _azure_raw() -> list[tuple[str, int, int]]:
    lines = AZURE.read_bytes().decode().splitlines()
    assert lines[0] == "TIMESTAMP,ContextTokens,GeneratedTokens"
    return [(ts, int(a), int(b)) for ts, a, b in (ln.split(",") for ln in lines[1:])]


def _azure_seconds(ts: str) -> Decimal:
    """Exact seconds of an Azure timestamp, read here without the loader's code."""
    day, frac = ts.split(".")
    whole = datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp()
    return Decimal(int(whole)) + Decimal("0." + frac)


def test_azure_excerpt_matches_the_raw_lines():
    raw = _azure_raw()
    reqs = load_trace(AZURE)
    assert len(reqs) == len(raw) == 300
    assert [(r.input_tokens, r.output_tokens) for r in reqs] == [(a, b) for _, a, b in raw]
    assert all(r.blocks == () for r in reqs)
    t0 = _azure_seconds(raw[0][0])
    assert reqs[0].arrival_s == 0.0
    # 18:20:40.8181990 - 18:17:03.9799600, every one of the 7 digits kept
    assert reqs[-1].arrival_s == 216.838239
    for r, (ts, _, _) in zip(reqs, raw, strict=True):
        assert r.arrival_s == float(_azure_seconds(ts) - t0)
    # exact: from float seconds since 1970 (about 2.4e-7 s apart at 1.7e9) it would be off
    assert reqs[1].arrival_s == 0.052
    assert float(_azure_seconds(raw[1][0])) - float(t0) != 0.052


def test_mooncake_excerpt_matches_the_raw_lines():
    lines = MOONCAKE.read_text().splitlines()
    raw = []
    for ln in lines:
        body = ln.strip().strip("{}")
        head, ids = body.split(', "hash_ids": ')
        fields = dict(kv.split(": ") for kv in head.split(", "))
        raw.append((int(fields['"timestamp"']), int(fields['"input_length"']),
                    int(fields['"output_length"']),
                    tuple(int(x) for x in ids.strip("[]").split(", "))))
    reqs = load_trace(MOONCAKE)
    assert len(reqs) == 300
    # the excerpt is already in order, so the loader's stable sort keeps the file's order
    assert [r.input_tokens for r in reqs] == [x[1] for x in raw]
    assert [r.output_tokens for r in reqs] == [x[2] for x in raw]
    assert [r.blocks for r in reqs] == [x[3] for x in raw]
    assert [r.arrival_s for r in reqs] == [(x[0] - raw[0][0]) / 1000 for x in raw]
    assert reqs[0].arrival_s == 0.0 and reqs[-1].arrival_s == 102.0
    assert reqs[0].blocks[:3] == (0, 1, 2) and reqs[1].blocks[0] == 0  # a shared first block


def test_format_detection(tmp_path):
    assert detect_format(AZURE) == "azure"
    assert detect_format(MOONCAKE) == "mooncake"
    gen_csv = tmp_path / "mine.txt"
    gen_csv.write_text("arrival_s,input_tokens,output_tokens\n0.5,10,2\n")
    assert detect_format(gen_csv) == "csv"
    gen_json = tmp_path / "mine.jsonl"
    gen_json.write_text('{"arrival_s": 1, "input_tokens": 3, "output_tokens": 4}\n')
    assert detect_format(gen_json) == "jsonl"
    no_ext = tmp_path / "mooncake_copy"
    no_ext.write_bytes(MOONCAKE.read_bytes())
    assert detect_format(no_ext) == "mooncake"
    assert load_trace(no_ext) == load_trace(MOONCAKE, "mooncake")


def test_azure_format_wants_the_azure_header(tmp_path):
    p = tmp_path / "head300.csv"
    p.write_text("TIMESTAMP,Ctx,Gen\n2023-11-16 18:17:03.9799600,1,1\n")
    with pytest.raises(TraceError, match=r"head300\.csv:1: not the Azure"):
        load_trace(p, "azure")
    with pytest.raises(TraceError, match="no input tokens column"):
        load_trace(p)  # detected as generic CSV, which has no such column either


def test_generic_csv_names_iso_and_ms(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("Prompt_Tokens,extra,Time,completion_tokens\n"
                 "7,x,2024-01-01T00:00:01.5Z,3\n"
                 "5,y,2024-01-01T00:00:00.000000001+00:00,2\n")
    reqs = load_trace(p)
    assert reqs == [TraceRequest(0.0, 5, 2), TraceRequest(1.499999999, 7, 3)]
    q = tmp_path / "ms.csv"
    q.write_text("timestamp_ms,input_length,output_length,hash_ids\n"
                 "2500,600,1,4 5\n1000,100,9,4\n")
    assert load_trace(q) == [TraceRequest(0.0, 100, 9, (4,)),
                             TraceRequest(1.5, 600, 1, (4, 5))]


def test_generic_jsonl_and_window(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"arrival_s": 10 + i * 0.25, "input_tokens": i + 1, "output_tokens": 2,
             "blocks": [i]} for i in range(20)]
    p.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)) + "\n")
    full = load_trace(p)
    assert [r.input_tokens for r in full] == list(range(1, 21))  # sorted, not trusted
    assert full[-1].arrival_s == 4.75
    win = load_trace(p, start_s=1.0, duration_s=2.0)  # [11.0, 13.0) in the file's time
    assert [r.input_tokens for r in win] == list(range(5, 13))
    assert win[0].arrival_s == 0.0 and win[-1].arrival_s == 1.75
    assert [r.input_tokens for r in load_trace(p, limit=3, start_s=1.0)] == [5, 6, 7]
    with pytest.raises(TraceError, match="no requests between 100"):
        load_trace(p, start_s=100.0)


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


CSV_HEAD = "arrival_s,input_tokens,output_tokens\n"
BAD_CSV = [
    ("negative tokens", CSV_HEAD + "0,1,1\n1,-4,1\n", r"bad\.csv:3: column 'input_tokens': "
     r"negative"),
    ("NaN timestamp", CSV_HEAD + "0,1,1\nnan,1,1\n", r"bad\.csv:3: column 'arrival_s': not a "
     r"finite"),
    ("infinite tokens", CSV_HEAD + "0,1,inf\n", r"bad\.csv:2: column 'output_tokens': not a "
     r"finite"),
    ("huge tokens", CSV_HEAD + f"0,{MAX_TOKENS + 1},1\n", r"bad\.csv:2: .*larger than"),
    ("huge exponent", CSV_HEAD + "0,1e999999,1\n", r"bad\.csv:2: .*larger than"),
    ("fractional tokens", CSV_HEAD + "0,1.5,1\n", r"bad\.csv:2: .*not an integer"),
    ("zero output", CSV_HEAD + "0,1,0\n", r"bad\.csv:2: .*smaller than 1"),
    ("negative time", CSV_HEAD + "-1,1,1\n", r"bad\.csv:2: .*negative timestamp"),
    ("huge time", CSV_HEAD + "1e300,1,1\n", r"bad\.csv:2: .*later than"),
    ("short row", CSV_HEAD + "0,1,1\n1,1\n", r"bad\.csv:3: 2 fields, the header has 3"),
    ("missing column", "arrival_s,input_tokens\n0,1\n", r"bad\.csv:1: no output tokens column"),
    ("two time columns", "time,ts,input_tokens,output_tokens\n",
     r"bad\.csv:1: more than one timestamp column"),
    ("mixed times", CSV_HEAD + "0,1,1\n2024-01-01 00:00:00,1,1\n",
     r"bad\.csv:3: .*mix ISO times and numbers"),
    ("bad date", CSV_HEAD + "2024-13-01 00:00:00,1,1\n", r"bad\.csv:2: .*not a valid date"),
    ("text", CSV_HEAD + "soon,1,1\n", r"bad\.csv:2: .*neither a number of seconds nor"),
]


@pytest.mark.parametrize("case,text,err", BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_bad_csv_rows_name_file_line_and_column(tmp_path, case, text, err):
    with pytest.raises(TraceError, match=err):
        load_trace(_bad(tmp_path, "bad.csv", text), "csv")


BAD_JSONL = [
    ("NaN", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
     '{"timestamp": NaN, "input_length": 1, "output_length": 1}\n',
     r"bad\.jsonl:2: not valid JSON"),
    ("negative", '{"timestamp": 0, "input_length": -1, "output_length": 1}\n',
     r"bad\.jsonl:1: column 'input_length': negative"),
    ("missing", '{"timestamp": 0, "input_length": 1}\n', r"bad\.jsonl:1: no output tokens"),
    ("bool", '{"timestamp": 0, "input_length": true, "output_length": 1}\n',
     r"bad\.jsonl:1: .*boolean"),
    ("string tokens", '{"timestamp": 0, "input_length": "5", "output_length": 1}\n',
     r"bad\.jsonl:1: .*not an integer \(str\)"),
    ("duplicate key", '{"timestamp": 0, "timestamp": 5, "input_length": 1, "output_length": 1}\n',
     r"bad\.jsonl:1: not valid JSON \(duplicate key"),
    ("not an object", "[1, 2]\n", r"bad\.jsonl:1: not a JSON object"),
    ("bad block", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [-3]}\n',
     r"bad\.jsonl:1: column 'hash_ids': negative"),
    ("huge int", '{"timestamp": 0, "input_length": 1' + "0" * 5000 + ', "output_length": 1}\n',
     r"bad\.jsonl:1: not valid JSON"),
    ("huge ms", '{"timestamp": 1e999999, "input_length": 1, "output_length": 1}\n',
     r"bad\.jsonl:1: column 'timestamp': later than"),
    ("deep", "[" * 100_000 + "]" * 100_000 + "\n", r"bad\.jsonl:1: "),
]


@pytest.mark.parametrize("case,text,err", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, case, text, err):
    with pytest.raises(TraceError, match=err):
        load_trace(_bad(tmp_path, "bad.jsonl", text))


def test_mixed_time_keys_in_jsonl(tmp_path):
    p = _bad(tmp_path, "bad.jsonl", '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n'
             '{"timestamp": 5, "input_tokens": 1, "output_tokens": 1}\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: column 'timestamp': uses 'timestamp'"):
        load_trace(p, "jsonl")


def test_line_and_row_limits(tmp_path):
    long = _bad(tmp_path, "long.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
                + '{"timestamp": 1, "pad": "' + "x" * 5000 + '"}\n')
    with pytest.raises(TraceError, match=r"long\.jsonl:2: line longer than 4096 characters"):
        load_trace(long, max_line_chars=4096)
    many = _bad(tmp_path, "many.csv", CSV_HEAD + "".join(f"{i},1,1\n" for i in range(50)))
    assert len(load_trace(many, max_rows=51)) == 50
    with pytest.raises(TraceError, match=r"many\.csv:42: more than 41 lines"):
        load_trace(many, max_rows=41)


def test_errors_do_not_echo_the_value(tmp_path):
    secret = "s3cr3t-token-value"
    p = _bad(tmp_path, "bad.csv", CSV_HEAD + f"{secret},1,1\n")
    with pytest.raises(TraceError) as e:
        load_trace(p)
    assert secret not in str(e.value)


def test_not_a_file_or_empty(tmp_path):
    with pytest.raises(TraceError, match="not a regular file"):
        load_trace(tmp_path, "csv")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match=r"fifo\.csv: not a regular file"):
        load_trace(fifo)  # refused without waiting for a writer
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "absent.csv")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(_bad(tmp_path, "empty.csv", CSV_HEAD))
    with pytest.raises(TraceError, match="not UTF-8"):
        p = tmp_path / "bin.csv"
        p.write_bytes(CSV_HEAD.encode() + b"0,\xff\xfe,1\n")
        load_trace(p, "csv")


@pytest.mark.skipif(not (SHARED / "azure_llm_2023_code.csv").is_file(),
                    reason="the full traces are in ../shared/traces, absent here")
def test_full_shared_traces_load():
    az = load_trace(SHARED / "azure_llm_2023_code.csv")
    mc = load_trace(SHARED / "mooncake_conversation.jsonl")
    assert len(az) == 8819 and len(mc) == 12031
    assert az[:300] == load_trace(AZURE) and mc[:300] == load_trace(MOONCAKE)


requests_st = st.lists(
    st.builds(
        TraceRequest,
        arrival_s=st.floats(min_value=0, max_value=1e6, allow_nan=False),
        input_tokens=st.integers(1, MAX_TOKENS),
        output_tokens=st.integers(1, MAX_TOKENS),
        blocks=st.lists(st.integers(0, 2**63 - 1), max_size=5).map(tuple),
    ),
    min_size=1, max_size=30)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=requests_st)
def test_generic_jsonl_round_trip(tmp_path, reqs):
    reqs = [TraceRequest(0.0, 1, 1)] + reqs  # the first arrival is the trace's zero
    p = tmp_path / "rt.jsonl"
    p.write_text("".join(json.dumps({"arrival_s": r.arrival_s, "input_tokens": r.input_tokens,
                                     "output_tokens": r.output_tokens, "blocks": list(r.blocks)})
                         + "\n" for r in reqs))
    assert load_trace(p) == sorted(reqs, key=lambda r: r.arrival_s)

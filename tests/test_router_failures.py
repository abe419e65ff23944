"""Why a replica did not start, in one line, from what the node daemon answers.

`data/vllm_engine_failure.log` is real output of vLLM 0.32 (CPU) whose engine core could not
start (`--num-gpu-blocks-override 2` with a 2048-token context): the root cause, printed by the
engine core process, comes some 50 lines before the API server's last words ("Engine core
initialization failed. See root cause above."). tests/test_router.py makes a real replica
fail the same way behind a real node daemon.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm_plugin.router.cluster import MAX_REASON_CHARS, replica_failure, root_cause

OUTPUT = (Path(__file__).parent / "data" / "vllm_engine_failure.log").read_text()
CAUSE = "ValueError: To serve at least one request with the model's max seq len (2048)"
SUMMARY = "replica exited with code 1 before it was ready."


def test_the_root_cause_is_the_engine_cores_exception_not_the_api_servers_wrapper():
    cause = root_cause(OUTPUT)
    assert cause is not None and cause.startswith(CAUSE), cause
    assert "(EngineCore" not in cause and "ERROR" not in cause  # the log prefix is gone
    # Given only the API server's last lines, the wrapper is the best there is.
    last = "\n".join(OUTPUT.splitlines()[-15:])
    assert root_cause(last) == ("RuntimeError: Engine core initialization failed. See root "
                                "cause above. Failed core proc(s): {}")
    assert root_cause("no exception here\njust lines") is None


def test_pydantic_details_under_the_exception_line_come_with_it():
    output = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "pydantic_core._pydantic_core.ValidationError: 1 validation error for "
              "ModelConfig\n  Value error, max_model_len 99999 is too large [type=value_error]"
              "\n    For further information visit https://errors.pydantic.dev\n")
    assert root_cause(output) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig "
        "Value error, max_model_len 99999 is too large [type=value_error] For further "
        "information visit https://errors.pydantic.dev")


@pytest.mark.parametrize("answer", [
    {"error": {"message": f"{SUMMARY} Last output:\n{OUTPUT}", "type": "replica_failed"}},
    {"id": 3, "state": "failed", "error": f"{SUMMARY} Last output:\n{OUTPUT}"},  # a string
])
def test_a_failed_replica_is_its_nodes_summary_and_its_root_cause_in_one_line(answer):
    reason = replica_failure(422, answer)
    assert reason.startswith(f"{SUMMARY} Cause: {CAUSE}"), reason
    assert "\n" not in reason and "Traceback" not in reason
    assert len(reason) <= MAX_REASON_CHARS


@pytest.mark.parametrize(("status", "answer", "reason"), [
    (202, {"id": 3, "state": "starting", "error": None},
     "the replica was not ready in time (still starting)"),
    (200, {"id": 3, "state": "stopped"}, "HTTP 200, replica state 'stopped'"),
    (502, ["not", "an", "object"], "HTTP 502 with an unexpected answer (list)"),
    (500, {"error": "x" * 5000}, "x" * (MAX_REASON_CHARS - 3) + "..."),
])
def test_other_answers_are_described_not_trusted(status, answer, reason):
    assert replica_failure(status, answer) == reason

"""`python -m sllm_plugin.vllm.serve ARGS`: vLLM's OpenAI API server, with a light main module.

vLLM's CPU platform (and CUDA) start the engine core and each worker with multiprocessing's
`spawn`, and a spawned child first imports the parent's `__main__` module again (as
`__mp_main__`). Started as `python -m vllm.entrypoints.openai.api_server`, that is vLLM's whole
API server (FastAPI, openai, the serving modules) imported twice more, in processes that never
serve HTTP. This module runs the same entry (`vllm.entrypoints.launchers.api_server.entry.main`,
what `python -m vllm.entrypoints.openai.api_server` calls) but imports nothing at module level,
so the spawned processes import only what they use. Arguments, output and behaviour are the
same; see docs/COLD_START.md for what it saves.
"""

from __future__ import annotations


def main() -> None:
    """vLLM's API server entry, as its `python -m` module calls it."""
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()

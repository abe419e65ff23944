"""sllm_plugin: fast LLM cold starts for vLLM and transformers.

Importing this package is cheap (vLLM imports it in every process through its plugin entry
point): the public names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "save_state_dict": "sllm_plugin.format.writer",
    "convert": "sllm_plugin.format.convert",
    "open_checkpoint": "sllm_plugin.format.reader",
    "FormatError": "sllm_plugin.format.errors",
    "CheckpointExistsError": "sllm_plugin.format.errors",
    "CheckpointWriteError": "sllm_plugin.format.errors",
    "load_state_dict": "sllm_plugin.loader.api",
    "iter_state_dict": "sllm_plugin.loader.api",
    "verify_checkpoint": "sllm_plugin.loader.verify",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sllm_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

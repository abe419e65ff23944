"""vLLM integration: `--load-format sllm` through the `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers). It has
to be cheap: importing vLLM's model-loader package costs about 10 s on a small machine, and
the API server never needs it, so registration waits for that package to be imported by vLLM
itself (a post-import hook) and then adds our loader class to its registry.
"""

from __future__ import annotations

import logging

LOAD_FORMAT = "sllm"
_MODEL_LOADER_MODULE = "vllm.model_executor.model_loader"

logger = logging.getLogger("sllm_plugin")
_hooked = False


def _register_now(module) -> None:
    from .loader import SllmModelLoader

    registry = getattr(module, "_LOAD_FORMAT_TO_MODEL_LOADER", None)
    if registry is not None and registry.get(LOAD_FORMAT) is SllmModelLoader:
        return  # idempotent: already registered in this process
    module.register_model_loader(LOAD_FORMAT)(SllmModelLoader)


def register() -> None:
    """The `vllm.general_plugins` entry point: idempotent, and cheap until the loader is used."""
    global _hooked
    if _hooked:
        return
    import wrapt

    # Runs at once if vLLM already imported the module, else right after it does.
    wrapt.register_post_import_hook(_register_now, _MODEL_LOADER_MODULE)
    _hooked = True

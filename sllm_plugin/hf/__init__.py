"""transformers integration: build a transformers model from an sllm checkpoint.

The checkpoint directory is also a model directory (config and tokenizer are copied in), so the
config comes from it and only the weights come through our loader. transformers itself places
them (`from_pretrained(None, config=..., state_dict=...)`), so tying, dtype handling and
non-persistent buffers behave exactly as for the original checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..loader.api import LoadStats, load_state_dict


def load_model(
    path: str | Path,
    device: str = "cpu",
    dtype: Any = None,
    *,
    model_class: Any = None,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    stats: LoadStats | None = None,
    **from_pretrained_kwargs: Any,
):
    """Return a transformers model (AutoModelForCausalLM unless `model_class`) in eval mode.

    `dtype` is what `from_pretrained` takes (a torch dtype, "auto", or None for the checkpoint's
    own); extra keyword arguments go to `from_pretrained` too.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    state = load_state_dict(path, "cpu", threads=threads, direct_io=direct_io, verify=verify,
                            stats=stats)
    cls = model_class or _model_class(config, AutoModelForCausalLM)
    model = cls.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype if dtype is not None else "auto",
        **from_pretrained_kwargs,
    )
    if device != "cpu":
        model = model.to(device)
    return model.eval()


def _model_class(config: Any, auto_class: Any) -> Any:
    """The concrete class (auto classes refuse `from_pretrained(None, state_dict=...)`)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return auto_class._model_mapping[type(config)]


__all__ = ["load_model"]

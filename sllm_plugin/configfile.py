"""YAML configuration files of the daemons (`sllm node`, `sllm router`): read and validated.

Small and dependency-light on purpose: the router imports it, and the router imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file, the key and the reason."""


def read_mapping(path: str | Path | None) -> dict[str, Any]:
    """The YAML file's top-level mapping ({} for no file, or an empty one)."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    return dict(loaded or {})


def validate(model: type[Model], raw: dict[str, Any], path: str | Path | None,
             what: str) -> Model:
    """`model` from `raw`, or a ConfigError listing every problem and the valid keys."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{path or 'flags'}: invalid {what} configuration: {problems} "
                          f"(valid keys: {', '.join(model.model_fields)})") from None

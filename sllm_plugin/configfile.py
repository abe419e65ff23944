"""YAML configuration files of the daemons (`sllm node`, `sllm router`): read and validated.

Small and dependency-light on purpose: the router imports it, and the router imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

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
    """`model` from `raw`, or a ConfigError listing every problem; an unknown key is told
    the valid keys of the mapping it is in (a bad value is not: the list would bury it)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            problem = f"{where}: {err['msg']}"
            if err["type"] == "extra_forbidden":
                valid = _fields_at(model, err["loc"][:-1])
                if valid:
                    problem += f" (valid keys here: {', '.join(valid)})"
            problems.append(problem)
        raise ConfigError(f"{path or 'flags'}: invalid {what} configuration: "
                          f"{'; '.join(problems)}") from None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model that `loc` leads to from `model` ([] if none)."""
    current: Any = model
    skip = False  # the next part of `loc` is a dict key or a list index
    for part in loc:
        if skip:
            skip = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        skip = _is_container(field.annotation)
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _is_container(annotation: Any) -> bool:
    if get_origin(annotation) in (dict, list):
        return True
    return any(get_origin(a) in (dict, list) for a in get_args(annotation))

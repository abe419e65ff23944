"""Model names, and the directory a model gets inside a tier.

A model is named as on the Hugging Face hub (`org/model` or `model`). The name becomes one
directory inside each tier (`org--model`), so a name must never be able to leave the tier: no
`..`, no absolute paths, no separators beyond the one slash, nothing hidden.
"""

from __future__ import annotations

import re

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_NAME = re.compile(rf"{_PART}(?:/{_PART})?")
SEPARATOR = "--"


class InvalidModelName(ValueError):
    """The model name could not be used as a name inside a tier directory."""


def check_model_name(name: str) -> str:
    """Return `name` if it is a safe model name, else raise InvalidModelName saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidModelName(
            f"invalid model name {name!r}: use 'org/model' or 'model', each part starting with "
            "a letter or digit and holding only letters, digits, '.', '_' and '-'"
        )
    if ".." in name or SEPARATOR in name:
        raise InvalidModelName(f"invalid model name {name!r}: it may not contain '..' or "
                               f"'{SEPARATOR}'")
    return name


def check_model_names(models: dict[str, object]) -> dict[str, object]:
    """A configuration's models, if every name is safe (a pydantic field validator)."""
    for name in models:
        check_model_name(name)
    return models


def dir_name(name: str) -> str:
    """The directory name of a model inside a tier: `org/model` -> `org--model`."""
    return check_model_name(name).replace("/", SEPARATOR)


def model_name(directory: str) -> str:
    """Inverse of dir_name; raises InvalidModelName for directories that are not ours."""
    return check_model_name(directory.replace(SEPARATOR, "/", 1))

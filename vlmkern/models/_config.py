"""Reading a model part's config: a vlmkern dataclass or any object with the same attributes (e.g. a
transformers config), with an error that names a missing or bad field and where its fields are listed."""
from __future__ import annotations

from dataclasses import fields


def positive_int(config, name: str, typed: type) -> int:
    """``config.<name>``, which must be a positive int; ``typed`` is the dataclass that documents the fields."""
    if not hasattr(config, name):
        needed = ", ".join(f.name for f in fields(typed))
        raise ValueError(f"config has no field {name!r} ({type(config).__name__}); a {typed.__name__} or any object "
                         f"with the fields {needed} works")
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    return value

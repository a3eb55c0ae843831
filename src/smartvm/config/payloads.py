"""Pure builders turning config models into Firecracker request bodies.

A body holds only fields the spec declares (unknown fields kept on the model
for validation are dropped) and only fields that are set (``None`` means "let
Firecracker use its default", so the key is omitted).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["spec_payload"]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return spec_payload(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def spec_payload(model: BaseModel) -> dict[str, Any]:
    """The request body for ``model``: declared, non-None fields only, recursively, as fresh objects.

    Keys are the spec's names (a field's alias where Python needs another name).
    """
    body: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if value is not None:
            body[info.alias or name] = _plain(value)
    return body

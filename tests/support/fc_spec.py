"""Firecracker's published OpenAPI (swagger 2.0) spec as a request validator.

The spec is vendored beside this file (a test checks it still equals
``../shared/specs/firecracker-api.yaml`` when that file is present), so the fake
Firecracker server and the payload tests work from any checkout.

Firecracker rejects unknown fields, but the spec rarely says
``additionalProperties: false``; :func:`strict_schema` adds it to every object
schema that lists properties and does not explicitly allow extras.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "SPEC_PATH",
    "SpecViolation",
    "load_spec",
    "match_path",
    "request_schema",
    "response_schema",
    "validate_request",
    "validate_response",
]

SPEC_PATH = Path(__file__).with_name("firecracker-api.yaml")


class _NoYesNoLoader(yaml.SafeLoader):
    """YAML 1.1 turns ``Off``/``On``/``yes`` into booleans; the spec means strings."""


_NoYesNoLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_NoYesNoLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class SpecViolation(ValueError):
    """A request or response body that the spec does not allow."""


@functools.cache
def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    with path.open() as fh:
        spec: dict[str, Any] = yaml.load(fh, Loader=_NoYesNoLoader)
    return spec


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def _definitions() -> dict[str, Any]:
    defs: dict[str, Any] = _strict(copy.deepcopy(load_spec()["definitions"]))
    return defs


def match_path(path: str) -> tuple[str, dict[str, str]] | None:
    """Map a concrete URL path to its spec template, e.g. /drives/root -> /drives/{drive_id}."""
    for template in load_spec()["paths"]:
        pattern = "^" + re.sub(r"\{([^}]+)\}", r"(?P<\1>[^/]+)", template) + "$"
        m = re.match(pattern, path)
        if m:
            return template, m.groupdict()
    return None


def _operation(path: str, method: str) -> dict[str, Any]:
    matched = match_path(path)
    if matched is None:
        raise SpecViolation(f"path {path!r} is not in the Firecracker API")
    op = load_spec()["paths"][matched[0]].get(method.lower())
    if op is None:
        raise SpecViolation(f"{method.upper()} {matched[0]} is not in the Firecracker API")
    result: dict[str, Any] = op
    return result


def _with_defs(schema: dict[str, Any]) -> dict[str, Any]:
    return {**_strict(copy.deepcopy(schema)), "definitions": _definitions()}


def request_schema(path: str, method: str) -> dict[str, Any] | None:
    """The body schema of an operation, or None when it takes no body."""
    for param in _operation(path, method).get("parameters", []):
        if param.get("in") == "body":
            return _with_defs(param["schema"])
    return None


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    responses = _operation(path, method).get("responses", {})
    resp = responses.get(status) or responses.get(str(status)) or responses.get("default")
    if not resp or "schema" not in resp:
        return None
    return _with_defs(resp["schema"])


def _check(schema: dict[str, Any], body: Any, what: str) -> None:
    validator = jsonschema.Draft4Validator(schema)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "<body>"
        raise SpecViolation(f"{what}: {where}: {err.message}")


def validate_request(method: str, path: str, body: Any) -> None:
    """Raise :class:`SpecViolation` unless ``body`` is what the spec accepts at METHOD PATH."""
    schema = request_schema(path, method)
    if schema is None:
        if body not in (None, b"", ""):
            raise SpecViolation(f"{method.upper()} {path} takes no body")
        return
    _check(schema, body, f"{method.upper()} {path}")


def validate_response(method: str, path: str, status: int, body: Any) -> None:
    schema = response_schema(path, method, status)
    if schema is not None:
        _check(schema, body, f"response {status} to {method.upper()} {path}")

"""Load and validate params.yaml, and answer the questions every stage asks of it."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = "params.yaml"
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "params.schema.yaml"


from dinoflow.errors import DinoflowError


class ConfigError(DinoflowError, ValueError):
    """A parameter is missing or has a value outside what the schema allows."""


def load_params(path: str | Path = DEFAULT_PARAMS, validate: bool = True) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found (run from the workflow root or pass --params)")
    with open(path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if validate:
        validate_params(params, source=str(path))
    return params


def validate_params(params: dict[str, Any], source: str = "params") -> None:
    """Validate against the JSON schema; the error names the bad key and the allowed values."""
    if not SCHEMA_PATH.exists():
        return
    import jsonschema

    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            allowed = ""
            if "enum" in err.schema:
                allowed = f" (allowed: {', '.join(map(str, err.schema['enum']))})"
            lines.append(f"  {key}: {err.message}{allowed}")
        raise ConfigError(f"{source}: invalid parameters\n" + "\n".join(lines))


def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _fill(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        out = dict(value)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = _fill(out[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(out) - set(props):
                out[key] = _fill(out[key], extra)
        return out
    return value


def with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with the schema's `default` values filled in where a key is missing (the schema is the
    one place defaults live; sections whose schema has a `default` are created when absent)."""
    return _fill(copy.deepcopy(params), {**_schema(), "type": "object"})


def model_names(params: dict[str, Any]) -> list[str]:
    return [m["name"] for m in params["models"]]


def model_config(params: dict[str, Any], name: str) -> dict[str, Any]:
    for m in params["models"]:
        if m["name"] == name:
            return m
    raise ConfigError(f"models: no model named {name!r} (known: {', '.join(model_names(params))})")


def params_hash(params: dict[str, Any], keys: list[str] | None = None) -> str:
    """Stable short hash of (a subset of) the parameters, recorded in outputs' metadata."""
    sub = params if keys is None else {k: params.get(k) for k in keys}
    blob = json.dumps(sub, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

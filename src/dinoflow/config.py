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
    validate_methods(params, source)


def validate_methods(params: dict[str, Any], source: str = "params") -> None:
    """What the static schema cannot check: every `models[].method` is `none` or a registered method, every
    `methods.<name>` section fits that method's Config, the lr-search choices are coherent, and fine-tunes (models
    with a method and init not random) keep `finetune.head_warmup_epochs` below `train.epochs`."""
    methods = {m.get("method") for m in params.get("models") or []} - {"none", None}
    sections = params.get("methods") or {}
    if not methods and not sections:
        return
    from dinoflow.ssl.methods.base import available_methods, get_method, parse_config

    known = available_methods()
    for i, m in enumerate(params.get("models") or []):
        if m.get("method") not in ("none", None) and m["method"] not in known:
            raise ConfigError(f"{source}: models.{i}.method: {m['method']!r} is not a registered method (known: none, "
                              f"{', '.join(known)})")
    for name in sorted(set(sections) - set(known)):
        raise ConfigError(f"{source}: methods.{name}: {name!r} is not a registered method (known: "
                          f"{', '.join(known)})")
    for name, section in sections.items():
        try:
            parse_config(get_method(name), section)
        except DinoflowError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    searched = (params.get("lr_search") or {}).get("method")
    if searched and searched not in known:
        raise ConfigError(f"{source}: lr_search.method: {searched!r} is not a registered method")
    for m in params.get("models") or []:
        try:
            uses_lr_search(params, m["name"])
        except DinoflowError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    # The training engine refuses this too, but only once a fine-tune starts (after ingest, preprocessing, ...).
    filled = with_defaults(params)
    warmup, epochs = filled["finetune"]["head_warmup_epochs"], (filled.get("train") or {}).get("epochs")
    tuned = [m["name"] for m in params.get("models") or [] if m.get("init") != "random" and m.get("method") != "none"]
    if tuned and epochs is not None and warmup >= epochs:
        raise ConfigError(f"{source}: finetune.head_warmup_epochs ({warmup}) must be smaller than train.epochs "
                          f"({epochs}), or the backbones of the fine-tunes {tuned} never train: lower "
                          "finetune.head_warmup_epochs or raise train.epochs")


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


def trains(params: dict[str, Any], name: str) -> bool:
    """Whether a model trains (its method is not `none`)."""
    return model_config(params, name)["method"] != "none"


def lr_search_method(params: dict[str, Any]) -> str | None:
    """The method the learning-rate search runs: `lr_search.method`, else that of the first model trained from
    random weights (None when no model trains from random weights)."""
    chosen = (params.get("lr_search") or {}).get("method")
    if chosen:
        return chosen
    for m in params["models"]:
        if m["init"] == "random" and m["method"] != "none":
            return m["method"]
    return None


def lr_search_model(params: dict[str, Any]) -> str:
    """The model whose entry the lr search builds its trial networks from: the first model of the list trained
    from random weights with the searched method, else the first with `init: random` (its architecture is
    `backbone`). Raises DinoflowError when no model has `init: random`."""
    method = lr_search_method(params)
    for m in params["models"]:
        if m["init"] == "random" and m["method"] == method:
            return m["name"]
    for m in params["models"]:
        if m["init"] == "random":
            return m["name"]
    raise DinoflowError("models: the lr search needs a model with init: random (its architecture is `backbone`)")


# The params.yaml values `dinoflow lr-search` reads besides the model entries and its method's section: whole
# sections, or single keys by their dotted path. Not `probes.linear_*` / `cv_folds` (the lr search runs no linear
# probe) and not the rest of `collection` (the images arrive as files; only the first label column is read).
LR_SEARCH_KEYS = ("seed", "backbone", "train", "lr_search", "collection.label_columns", "probes.knn_k",
                  "probes.knn_temperature", "probes.test_fraction")


def lr_search_reads(params: dict[str, Any]) -> dict[str, Any]:
    """THE params.yaml values the lr search (`dinoflow.train.lr_search`) reads, keyed by dotted path (DVC params
    keys): `LR_SEARCH_KEYS`, the entry `models.<i>` of `lr_search_model` (without `lr_search.method` it also
    gives the searched method; an edit that makes another entry the first one changes the key) and the searched
    method's `methods.<name>` section when params.yaml has one. Snakemake's rule `lr_search` and the generated
    dvc.yaml track exactly these, so editing anything else (e.g. `probes.linear_c_grid`) does not re-run the search
    nor, through its output, scratch training. A key absent from params (schema default) has value None."""
    out: dict[str, Any] = {}
    for key in LR_SEARCH_KEYS:
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    i = model_names(params).index(lr_search_model(params))
    out[f"models.{i}"] = params["models"][i]
    method = lr_search_method(params)
    sections = params.get("methods") or {}
    if method in sections:
        out[f"methods.{method}"] = sections[method]
    return out


def uses_lr_search(params: dict[str, Any], name: str) -> bool:
    """THE answer to "does this model take its lr (and weight decay) from the lr search?" (training, Snakemake
    and the report all ask here).

    `lr_from_search` on the model when given, else: trains from random weights with the searched method. A
    fine-tune or a model of another method than the search's cannot use it (ConfigError naming the model).
    """
    cfg = model_config(params, name)
    default = cfg["init"] == "random" and cfg["method"] != "none" and cfg["method"] == lr_search_method(params)
    use = bool(cfg.get("lr_from_search", default))
    if use:
        if cfg["method"] == "none":
            raise ConfigError(f"models[{name}].lr_from_search: the model does not train (method: none)")
        if cfg["init"] != "random":
            raise ConfigError(f"models[{name}].lr_from_search: the lr search tunes the lr of training from random "
                              "weights; a fine-tune takes finetune.lr_head / lr_backbone (remove lr_from_search)")
        if cfg["method"] != lr_search_method(params):
            raise ConfigError(f"models[{name}].lr_from_search: the lr search runs method "
                              f"{lr_search_method(params)!r} (lr_search.method), not {cfg['method']!r}")
    return use

# Helpers shared by the rule files: the model list, which params.yaml sections each stage reads, and flags that
# `dinoflow export-dvc` turns into DVC `metrics:` / `plots:` entries.

import re
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.io import flag

from dinoflow import paths
from dinoflow import config as dinoflow_config
from dinoflow.config import model_config, model_names

# The stage commands read params.yaml themselves, so a value given with --config / --configfile would change
# Snakemake's view but not the commands'. Refuse that instead of running with two different configurations.
with open("params.yaml", encoding="utf-8") as _fh:
    if yaml.safe_load(_fh) != config:
        raise WorkflowError(
            "the config differs from params.yaml (--config or --configfile given?): "
            "the dinoflow commands read params.yaml, so edit params.yaml instead"
        )

MODELS = model_names(config)
LOG = "logs"
ENV = "../envs/dinoflow.yaml"  # relative to this rules folder; mirrors environment.yml


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),


def metric(path):
    """A JSON metrics output: DVC `metrics:` (not cached)."""
    return flag(path, "dvc_metric")


def plot(path):
    """A plot output (image, TSV/CSV or a dvclive plots folder): DVC `plots:` (not cached)."""
    return flag(path, "dvc_plot")


def sections(*names):
    """`params:` entries for the params.yaml sections a stage reads; the entry name is the section name, so
    export-dvc maps each to a DVC params key and Snakemake re-runs the rule when a section's value changes."""
    return {name: config.get(name) for name in names}


def dotted_params(values):
    """`params:` entries from {params.yaml path: value} (e.g. `dinoflow.config.lr_search_reads`): a whole section
    under its own name; keys inside a section gathered in one entry named after the section, keyed by their dotted
    path (`probes={"probes.knn_k": 20, ...}`), which export-dvc turns into those DVC params keys. Snakemake re-runs
    the rule when one of these values changes, and only then."""
    out = {}
    for key, value in values.items():
        section, _, rest = key.partition(".")
        if rest:
            if section in values:
                raise WorkflowError(f"params entry {key!r}: its section {section!r} is tracked whole already")
            out.setdefault(section, {})[key] = value
        else:
            out[key] = value
    return out


def model_entry(wildcards):
    """A model's own entry of the `models` list (so adding a model does not re-run the others in Snakemake)."""
    return model_config(config, wildcards.model)


def root_init(model):
    """`random` or `pretrained`: where a model's weights come from, following `init: <model>` chains."""
    seen = []
    while model not in ("random", "pretrained"):
        if model in seen:
            raise WorkflowError(f"models: init cycle {' -> '.join(seen + [model])}")
        seen.append(model)
        model = model_config(config, model)["init"]
    return model


def arch_section(model):
    """The section giving a model's architecture: `pretrained` or `backbone`."""
    return "pretrained" if root_init(model) == "pretrained" else "backbone"


def trains(model):
    return dinoflow_config.trains(config, model)


def uses_lr_search(model):
    """Whether a model takes its lr from the lr search: dinoflow.config.uses_lr_search, the one place it is decided
    (the train stage asks the same function)."""
    return dinoflow_config.uses_lr_search(config, model)


def is_finetune(model):
    """Models that continue training from existing weights use the `finetune` section (head warm-up, lrs)."""
    m = model_config(config, model)
    return m["method"] != "none" and m["init"] != "random"


def method_section(method):
    """`params:` value of a method's own knobs, keyed by its params.yaml path (`methods.<name>`), which export-dvc
    turns into that DVC params key; None when params.yaml has no section for it (the method's defaults)."""
    sections = config.get("methods") or {}
    return {f"methods.{method}": sections[method]} if method in sections else None


def model_method_section(wildcards):
    """The `methods.<name>` section of the model's method: editing one method's knobs re-runs only its models."""
    return method_section(model_config(config, wildcards.model)["method"])


def if_model(pred, section):
    """A params entry that is the section's value only for models where pred(model) holds (None otherwise, which
    export-dvc leaves out of that model's DVC params)."""
    return lambda wildcards: config.get(section) if pred(wildcards.model) else None


def arch_params(section):
    return if_model(lambda m: arch_section(m) == section, section)


def model_log(stage):
    return f"{LOG}/{stage}/{{model}}.log"


TRAINED_MODELS = [m for m in MODELS if trains(m)]
PLAIN_MODELS = [m for m in MODELS if not trains(m)]

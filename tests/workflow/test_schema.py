"""params.yaml's JSON schema: the committed file validates, and a bad value is reported with its key and the
allowed values, both by dinoflow and by snakemake (which validates its config against the same schema)."""

from __future__ import annotations

import copy
import subprocess

import pytest
import yaml

from dinoflow.config import SCHEMA_PATH, ConfigError, load_params, validate_params
from dinoflow.errors import DinoflowError
from _workflow_helpers import BIN, REPO, edit_params, env, link_workflow


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml", validate=False)


def test_schema_is_valid_draft_2020_12():
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assert schema["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)


def test_committed_params_validate(params):
    validate_params(params, source="params.yaml")


def test_every_committed_key_is_in_the_schema(params):
    """Closed sections list every key of params.yaml: a key added there without the schema fails here."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for section, value in params.items():
        assert section in schema["properties"], section
        props = schema["properties"][section].get("properties")
        if isinstance(value, dict) and props is not None:
            assert set(value) <= set(props), f"{section}: {set(value) - set(props)} not in the schema"


@pytest.mark.parametrize("path, value, allowed", [
    (("preprocess", "mode"), "stretch", ["crop", "pad"]),
    (("pretrained", "source"), "internet", ["package", "hub", "file"]),
    (("methods", "dinov2", "centering"), "mean", ["centering", "sinkhorn_knopp"]),  # the method's Config
    (("embed", "device"), "tpu", ["auto", "cpu", "cuda"]),
])
def test_bad_enum_names_key_and_allowed_values(params, path, value, allowed):
    bad = copy.deepcopy(params)
    section = bad
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    with pytest.raises(ConfigError) as exc:
        validate_params(bad, source="params.yaml")
    msg = str(exc.value)
    assert isinstance(exc.value, DinoflowError)
    assert ".".join(path) in msg and "params.yaml" in msg
    assert all(a in msg for a in allowed), msg


@pytest.mark.parametrize("entry, key", [
    ({"name": "m", "init": "random", "method": "byol2", "trainable": "all"}, "models.0.method"),  # not registered
    ({"name": "m", "init": "random", "method": "BYOL", "trainable": "all"}, "models.0.method"),
    ({"name": "m", "init": "random", "method": "dinov2", "trainable": "last"}, "models.0.trainable"),
    ({"name": "m", "init": "random", "method": "dinov2", "trainable": "first2"}, "models.0.trainable"),
    ({"name": "bad name", "init": "random", "method": "none", "trainable": "none"}, "models.0.name"),
    ({"name": "m", "init": "random", "method": "none"}, "models.0"),
    ({"name": "m", "init": "random", "method": "none", "trainable": "none", "lr": 1}, "models.0"),
])
def test_bad_model_entries(params, entry, key):
    bad = copy.deepcopy(params)
    bad["models"] = [entry]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_params(bad)


@pytest.mark.parametrize("entry", [
    {"name": "m", "init": "random", "method": "dinov2", "trainable": "last12"},
    {"name": "m2", "init": "scratch", "method": "dinov2", "trainable": "all"},
    {"name": "m3", "init": "pretrained", "method": "none", "trainable": "none"},
])
def test_good_model_entries(params, entry):
    ok = copy.deepcopy(params)
    ok["models"] = ok["models"] + [entry]
    validate_params(ok)


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p["ingest"].update(max_pixelz=10), "ingest"),          # misspelt key in a closed section
    (lambda p: p["preprocess"].update(size=0), "preprocess.size"),
    (lambda p: p["preprocess"].update(pad_color=[255, 255]), "preprocess.pad_color"),
    (lambda p: p["ingest"].update(max_skipped_fraction=1.5), "ingest.max_skipped_fraction"),
    (lambda p: p["pretrained"].update(source="file", file=None), "pretrained.file"),
    (lambda p: p["pretrained"].update(sha256="abc"), "pretrained.sha256"),
    (lambda p: p.update(sed=1), "<top level>"),
])
def test_other_bad_values(params, mutate, key):
    bad = copy.deepcopy(params)
    mutate(bad)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_params(bad)


def test_snakemake_reports_the_bad_key_and_allowed_values(tiny_workspace):
    ws = link_workflow(tiny_workspace)
    edit_params(ws, "preprocess", "mode", "stretch")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=ws, env=env(),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "'stretch' is not one of ['crop', 'pad']" in out, out
    assert "['preprocess']['mode']" in out, out


def test_dinoflow_cli_reports_the_bad_key(tiny_workspace):
    edit_params(tiny_workspace, "methods", "dinov2", {"centering": "mean"})
    proc = subprocess.run([str(BIN / "dinoflow"), "ingest"], cwd=tiny_workspace, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "methods.dinov2.centering" in proc.stderr and "centering, sinkhorn_knopp" in proc.stderr, proc.stderr


def test_snakemake_refuses_config_that_differs_from_params_yaml(tiny_workspace):
    """The stage commands read params.yaml, so a --config override would run them with other values than the
    ones Snakemake tracks: refused with a message that says what to do instead."""
    ws = link_workflow(tiny_workspace)
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1", "--config", "seed=5"], cwd=ws, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "edit params.yaml instead" in proc.stdout + proc.stderr

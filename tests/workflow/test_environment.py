"""environment.yml (conda users) and workflow/envs/dinoflow.yaml (snakemake --use-conda) list the same
dependencies as pyproject.toml: the same names with the same version specifiers."""

from __future__ import annotations

import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from _workflow_helpers import REPO

# Conda-only entries that are not Python dependencies of the package: the interpreter, pip, npm for the demo.
CONDA_TOOLS = {"python", "pip", "nodejs"}
SELF_INSTALL = {"-e .", "-e ../.."}  # dinoflow itself, from the checkout


def pyproject_deps() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def conda_deps(path) -> tuple[dict[str, str], dict[str, str]]:
    """(conda dependencies, pip dependencies) of a conda environment file, as name -> specifier."""
    env = yaml.safe_load(path.read_text())
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                if line in SELF_INSTALL:
                    continue
                r = Requirement(line)
                pip[canonicalize_name(r.name)] = str(r.specifier)
            continue
        name = Requirement(dep.replace("=", "==", 1) if "=" in dep and "==" not in dep and ">" not in dep
                           and "<" not in dep else dep)
        if canonicalize_name(name.name) not in CONDA_TOOLS:
            conda[canonicalize_name(name.name)] = str(name.specifier)
    return conda, pip


@pytest.mark.parametrize("path", ["environment.yml", "workflow/envs/dinoflow.yaml"])
def test_same_dependencies_as_pyproject(path):
    conda, pip = conda_deps(REPO / path)
    assert not set(conda) & set(pip), f"{path}: listed twice: {set(conda) & set(pip)}"
    assert {**conda, **pip} == pyproject_deps()


@pytest.mark.parametrize("path", ["environment.yml", "workflow/envs/dinoflow.yaml"])
def test_torch_stack_comes_from_pip(path):
    """torch and what depends on it from pip, so pip's configuration picks the build (CPU/CUDA) and conda does
    not install a second torch underneath."""
    _, pip = conda_deps(REPO / path)
    assert {"torch", "torchvision", "timm", "sentence-transformers"} <= set(pip)
    assert pip["torch"] == "==2.14.1" and pip["torchvision"] == "==0.29.1"


def test_rule_environment_mirrors_environment_yml():
    a = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    b = yaml.safe_load((REPO / "workflow/envs/dinoflow.yaml").read_text())["dependencies"]
    strip = lambda deps: [d if not isinstance(d, dict) else [x for x in d["pip"] if x not in SELF_INSTALL]
                          for d in deps]
    assert strip(a) == strip(b)


def test_the_parser_sees_a_mismatch(tmp_path):
    """The comparison is not vacuous: a changed pin or a missing package is seen."""
    text = (REPO / "environment.yml").read_text()
    bad = tmp_path / "env.yml"
    bad.write_text(text.replace("numpy>=1.26", "numpy>=1.20"))
    conda, pip = conda_deps(bad)
    assert {**conda, **pip} != pyproject_deps()
    bad.write_text(text.replace("      - timm>=1.0\n", ""))
    conda, pip = conda_deps(bad)
    assert "timm" not in {**conda, **pip}

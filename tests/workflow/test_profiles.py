"""The Snakemake profiles parse (every key is a real option of the installed Snakemake and SLURM plugin), every
key is explained by a comment, and the training rules ask SLURM for a GPU."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from _workflow_helpers import BIN, REPO, env, link_workflow

PROFILES = ["workflow/profiles/default", "workflow/profiles/slurm"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_key_is_commented(profile):
    lines = (REPO / profile / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":") and not line.startswith(" "):
            continue  # blank, comment, or a top-level mapping whose comment precedes it (checked below)
        if "#" in line or (i > 0 and lines[i - 1].strip().startswith("#")):
            continue
        # nested keys may share the comment of the block above (e.g. a rule's resources)
        if line.startswith("  ") and any(lines[j].strip().startswith("#") for j in range(max(0, i - 3), i)):
            continue
        pytest.fail(f"{profile}/config.yaml line {i + 1} has no comment: {line!r}")


def test_training_rules_get_a_gpu_on_slurm():
    cfg = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert cfg["executor"] == "slurm" and cfg["slurm-status-command"] == "squeue"
    for rule in ("train", "lr_search"):
        assert cfg["set-resources"][rule]["gpu"] == 1
    assert {"runtime", "mem_mb"} <= set(cfg["default-resources"])


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_is_accepted_by_snakemake(profile, tiny_workspace):
    ws = link_workflow(tiny_workspace)
    proc = subprocess.run([str(BIN / "snakemake"), "--profile", str(REPO / profile), "-n", "data/processed/index.parquet"],
                          cwd=ws, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ingest" in proc.stdout + proc.stderr

"""The ingest and preprocess rules run through workflow/profiles/slurm on a real SLURM cluster.

Needs a running cluster: `bash .ci/setup_slurm.sh` (as root) brings up a single node on localhost. Skipped, with
the reason, where `sbatch`/`squeue` are missing or no node is idle.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from dinoflow import paths
from _workflow_helpers import BIN, REPO, env, link_workflow, run

pytestmark = pytest.mark.slurm


def _cluster_problem() -> str | None:
    missing = [c for c in ("sbatch", "squeue", "sinfo") if shutil.which(c) is None]
    if missing:
        return f"SLURM client commands not found: {', '.join(missing)} (run `bash .ci/setup_slurm.sh` as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()}): the cluster is not up (run `bash .ci/setup_slurm.sh`)"
    if not {"idle", "mixed"} & set(out.stdout.split()):
        return f"no idle SLURM node (states: {out.stdout.split() or 'none'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        print(f"SKIP test_slurm: {problem}")
        pytest.skip(problem)


def test_data_rules_run_through_the_slurm_profile(cluster, tiny_workspace):
    ws = link_workflow(tiny_workspace)
    cmd = [str(BIN / "snakemake"), "--profile", str(REPO / "workflow/profiles/slurm"),
           # The CI node has 2 CPUs and little memory: cap what the profile asks for real clusters.
           "--max-threads", "2", "--set-resources", "ingest:mem_mb=1000", "preprocess:mem_mb=1000",
           "--slurm-init-seconds-before-status-checks", "3", paths.PROCESSED_INDEX]
    proc = run(cmd, ws, timeout=480)
    out = proc.stdout + proc.stderr
    # Each rule went to SLURM as its own sbatch job (the plugin logs each to logs/slurm/rule_<name>/<jobid>.log).
    jobids = dict(re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/\d+\.log\)", out))
    assert sorted(jobids.values()) == ["ingest", "preprocess"], out
    assert (ws / paths.MANIFEST).exists() and (ws / paths.PROCESSED_INDEX).exists()
    assert "ok" in (ws / "logs/ingest.log").read_text() and (ws / "logs/preprocess.log").exists()
    # Nothing left to do on the second run.
    again = run(cmd, ws, timeout=300)
    assert "submitted with SLURM jobid" not in again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr

"""The whole DAG on a tiny collection with Snakemake, then DVC on the same files: a second run does nothing, and
editing one parameter re-runs exactly the stages that read it and what depends on their outputs."""

from __future__ import annotations

import pytest
import yaml

from dinoflow import paths
from _workflow_helpers import (BIN, downstream, dvc_init, dvc_repro, edit_params, jobs, link_workflow, readers,
                               run, snakemake)

pytestmark = pytest.mark.slow

# One model per kind of job: init_model (random), lr_search + train from scratch, a partial fine-tune.
MODELS = [
    {"name": "random", "init": "random", "method": "none", "trainable": "none"},
    {"name": "scratch", "init": "random", "method": "dinov2", "trainable": "all"},
    {"name": "ft_last1", "init": "pretrained", "method": "dinov2", "trainable": "last1"},
]
# (section, key, value): read by the report only; by the probes of every model; by nobody (demo disabled).
SNAKEMAKE_EDITS = [("report", "title", "another title"), ("probes", "knn_k", 3), ("demo", "limit", 7)]
DVC_EDITS = [("report", "title", "a third title"), ("align", "n_permutations", 9)]


@pytest.fixture
def ws(tiny_workspace):
    ws = link_workflow(tiny_workspace)
    path = ws / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["models"] = MODELS
    params["lr_search"]["n_trials"] = 1
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def test_whole_dag_snakemake_then_dvc(ws):
    specs = jobs(ws)
    everything = {(s.rule, s.wildcards.get("model")) for s in specs}
    assert {r for r, _ in everything} == {"ingest", "preprocess", "lr_search", "init_model", "train", "embed",
                                          "neighbours", "embed_text", "align", "probes", "grids", "attention",
                                          "groups", "compare", "report"}
    assert snakemake(ws, [], specs=specs) == everything
    assert (ws / paths.REPORT_HTML).exists() and (ws / paths.REPORT_METRICS).exists()
    assert snakemake(ws, [], specs=specs) == set(), "a second run must do nothing"
    for section, key, value in SNAKEMAKE_EDITS:
        edit_params(ws, section, key, value)
        ran = snakemake(ws, [], specs=specs)
        assert ran == downstream(specs, readers(specs, section, key)), f"after editing {section}.{key}: {sorted(ran)}"
    assert snakemake(ws, [], specs=specs) == set()

    # `snakemake --report` gathers the outputs marked with report(...) (grids, attention, figures, the page).
    run([str(BIN / "snakemake"), "--cores", "1", "--nolock", "--report", "smk_report.zip"], ws)
    import zipfile

    with zipfile.ZipFile(ws / "smk_report.zip") as zf:
        names = zf.namelist()
    assert any(n.endswith("report.html") for n in names), names[:20]
    assert any("query_" in n and n.endswith(".png") for n in names), names[:20]
    (ws / "smk_report.zip").unlink()

    # DVC on the same files: record them without re-running, then DVC agrees that nothing is left to do.
    # (`dvc commit` re-links outputs from its cache, which gives them new mtimes, so Snakemake is not run on
    # this workspace again: the two tools are not meant to be interleaved on one copy.)
    dvc_init(ws)
    run([str(BIN / "dvc"), "commit", "--force", "-q"], ws)
    assert dvc_repro(ws, [], specs=specs) == set(), "dvc repro after snakemake must do nothing"
    for section, key, value in DVC_EDITS:
        edit_params(ws, section, key, value)
        direct = readers(specs, section, key)
        ran = dvc_repro(ws, [], specs=specs)
        # DVC compares content: what depends on the readers re-runs only where their outputs changed.
        assert direct <= ran <= downstream(specs, direct), f"dvc after editing {section}.{key}: {sorted(ran)}"
    assert dvc_repro(ws, [], specs=specs) == set()

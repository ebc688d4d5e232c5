"""The lr search tracks only the params it reads: editing `probes.linear_c_grid` re-runs the probes, not the lr
search nor scratch training; editing `probes.knn_k` (the search's kNN criterion) re-runs both. Checked with
`snakemake -n` on a workspace whose every output is recorded as up to date (`snakemake --touch --forceall`), and
in the generated DVC stage."""

from __future__ import annotations

import pytest
import yaml

from dinoflow import paths
from dinoflow.config import lr_search_reads
from _workflow_helpers import dry_run, edit_params, jobs, link_workflow, readers, run, BIN

LR_SEARCH, TRAIN_SCRATCH = ("lr_search", None), ("train", "scratch")
DIRECTORY_OUTPUTS = {paths.PROCESSED_DIR, paths.GRIDS_DIR, paths.ATTENTION_DIR, paths.REPORT_FIGURES_DIR}


@pytest.fixture
def done_ws(tiny_workspace):
    """A workflow root where Snakemake holds every job's output as done with the current params (files are
    placeholders: a dry run reads only their dates and Snakemake's records of the params that made them)."""
    ws = link_workflow(tiny_workspace)
    specs = jobs(ws)
    for spec in specs:
        for out in spec.outs + spec.metrics + spec.plots:
            path = ws / out
            if out in DIRECTORY_OUTPUTS or out.endswith("/plots"):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder")
    run([str(BIN / "snakemake"), "--touch", "--forceall", "--cores", "1", "--nolock", "--quiet"], ws)
    assert dry_run(ws) == set(), "after --touch nothing is left to do"
    return ws, specs


@pytest.mark.slow
def test_probe_edits_rerun_lr_search_only_when_it_reads_them(done_ws):
    ws, specs = done_ws
    probes = {(r, m) for r, m in readers(specs, "probes") if r == "probes"}
    assert len(probes) == len({s["name"] for s in yaml.safe_load((ws / "params.yaml").read_text())["models"]})

    edit_params(ws, "probes", "linear_c_grid", [0.01, 1.0])
    scheduled = dry_run(ws)
    assert LR_SEARCH not in scheduled and TRAIN_SCRATCH not in scheduled, sorted(scheduled)
    assert probes <= scheduled  # the linear probe itself does re-run

    edit_params(ws, "probes", "knn_k", 7)
    scheduled = dry_run(ws)
    assert {LR_SEARCH, TRAIN_SCRATCH} <= scheduled, sorted(scheduled)


def test_lr_search_stage_declares_exactly_what_it_reads(tiny_workspace):
    ws = link_workflow(tiny_workspace)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    spec = next(s for s in jobs(ws) if s.rule == "lr_search")
    reads = lr_search_reads(params)
    assert spec.params == [k for k, v in reads.items() if v is not None]  # the DVC params keys, in this order
    assert "probes.knn_k" in spec.params and "probes.knn_temperature" in spec.params
    assert not any(k in spec.params for k in ("probes", "probes.linear_c_grid", "collection", "models",
                                              "collection.columns"))
    scratch = [i for i, m in enumerate(params["models"]) if m["name"] == "scratch"]
    assert [k for k in spec.params if k.startswith("models")] == [f"models.{scratch[0]}"]
    assert spec.rule in {r for r, _ in readers(jobs(ws), "probes", "knn_k")}
    assert spec.rule not in {r for r, _ in readers(jobs(ws), "probes", "linear_c_grid")}


def test_lr_search_model_entry_follows_the_searched_method():
    base = {"seed": 0, "backbone": {}, "train": {}, "lr_search": {"method": None},
            "collection": {"label_columns": ["a"], "caption": "c"},
            "probes": {"knn_k": 5, "knn_temperature": 0.07, "test_fraction": 0.3, "linear_c_grid": [1.0]},
            "methods": {"simclr": {"temperature": 0.1}},
            "models": [{"name": "random", "init": "random", "method": "none"},
                       {"name": "pre", "init": "pretrained", "method": "none"},
                       {"name": "s1", "init": "random", "method": "simclr"},
                       {"name": "s2", "init": "random", "method": "dinov2"}]}
    reads = lr_search_reads(base)
    assert reads["models.2"] == base["models"][2] and not any(k in reads for k in ("models.0", "models.3"))
    assert reads["methods.simclr"] == {"temperature": 0.1}
    assert reads["collection.label_columns"] == ["a"] and "collection" not in reads
    assert "probes.linear_c_grid" not in reads
    base["lr_search"]["method"] = "dinov2"
    reads = lr_search_reads(base)
    assert "models.3" in reads and "models.2" not in reads and "methods.simclr" not in reads

"""Snakemake and DVC on the data stages of a tiny collection: a second run does nothing, and editing one
parameter re-runs exactly the stages that read it (and, where their outputs change, what depends on them)."""

from __future__ import annotations

import pytest

from dinoflow import paths
from _workflow_helpers import (BIN, downstream, dvc_init, dvc_repro, edit_params, jobs, link_workflow, readers,
                               run, snakemake, upstream)

INGEST, PREPROCESS = ("ingest", None), ("preprocess", None)
# (section, key, new value): one read by preprocess only, one by ingest (upstream of preprocess), one by neither.
EDITS = [("preprocess", "quality", 80), ("ingest", "max_skipped_fraction", 0.5), ("report", "title", "other")]


@pytest.fixture
def ws(tiny_workspace):
    return link_workflow(tiny_workspace)


def test_declared_sections_of_data_stages(ws):
    specs = {s.rule: s for s in jobs(ws)}
    assert "demo_collection" not in specs  # demo.enabled is false in the tiny workspace
    assert specs["ingest"].params == ["collection", "ingest"]
    assert specs["preprocess"].params == ["collection", "preprocess"]
    assert upstream(jobs(ws), {PREPROCESS}) == {INGEST, PREPROCESS}


def test_snakemake_reruns_exactly_the_readers(ws):
    specs = jobs(ws)
    target = [paths.PROCESSED_INDEX]
    data_jobs = upstream(specs, {PREPROCESS})
    assert snakemake(ws, target, specs=specs) == {INGEST, PREPROCESS}
    assert (ws / paths.MANIFEST).exists() and (ws / paths.PROCESSED_INDEX).exists()
    assert snakemake(ws, target, specs=specs) == set(), "a second run must do nothing"
    for section, key, value in EDITS:
        edit_params(ws, section, key, value)
        # Snakemake re-runs on mtime: what reads the section, and everything downstream of it.
        expected = downstream(specs, readers(specs, section, key)) & data_jobs
        assert snakemake(ws, target, specs=specs) == expected, f"after editing {section}.{key}"
    assert snakemake(ws, target, specs=specs) == set(), "second run after the edits"
    assert {job for s, _, _ in EDITS for job in readers(specs, s)} & data_jobs == {INGEST, PREPROCESS}


def test_dvc_reruns_exactly_the_readers(ws):
    names = dvc_init(ws)
    specs = jobs(ws)
    stage = names[PREPROCESS]
    assert dvc_repro(ws, [stage], specs=specs) == {INGEST, PREPROCESS}
    assert dvc_repro(ws, [stage], specs=specs) == set(), "a second run must do nothing"
    data_jobs = upstream(specs, {PREPROCESS})
    for section, key, value in EDITS:
        edit_params(ws, section, key, value)
        ran = dvc_repro(ws, [stage], specs=specs)
        # DVC compares content: the readers re-run; what depends on them only when their outputs changed.
        direct = readers(specs, section, key) & data_jobs
        assert direct <= ran <= downstream(specs, direct) & data_jobs, f"after editing {section}.{key}: {ran}"
    assert dvc_repro(ws, [stage], specs=specs) == set(), "second run after the edits"


def test_data_stages_read_exactly_the_declared_sections(ws):
    """The `params:` a rule declares are the sections its command really reads (else a params edit would
    re-run too much or, worse, too little)."""
    from _workflow_helpers import sections_read

    specs = {s.rule: s for s in jobs(ws)}
    for rule, stage in (("ingest", "ingest"), ("preprocess", "preprocess")):
        assert sections_read(ws, stage) == set(specs[rule].params), rule


def test_snakemake_shows_the_ingest_summary(ws):
    """Kept / skipped rows are visible without opening a log: the ingest command's one line reaches the console."""
    proc = run([str(BIN / "snakemake"), "--cores", "1", "--nolock", paths.MANIFEST], ws)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ingest: ")]
    assert len(lines) == 1 and lines[0].startswith("ingest: 24 rows, 24 ok, 0 skipped; ") and \
        lines[0].endswith("statuses: docs/ingest.md")
    assert "ingest: 24 ok, 0 skipped" in (ws / "logs/ingest.log").read_text()  # the log keeps the log lines

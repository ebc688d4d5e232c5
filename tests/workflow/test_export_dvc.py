"""`dinoflow export-dvc`: dvc.yaml generated from the Snakemake DAG, checked through DVC's own parser."""

from __future__ import annotations

import pytest
import yaml

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.workflow import export_dvc
from dinoflow.workflow.export_dvc import ITEM, JobSpec, dvc_stages
from _workflow_helpers import REPO, dvc_init, jobs, link_workflow


def test_committed_dvc_yaml_is_up_to_date():
    committed = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    assert export_dvc.render(REPO) == committed, \
        "dvc.yaml is stale: run `dinoflow export-dvc` in the repository root and commit dvc.yaml"


def _spec(rule, model=None, params=("seed",), deps=(), outs=None, metrics=(), plots=(), cmd=None):
    m = f"/{model}" if model else ""
    return JobSpec(order=(0, 0), rule=rule, wildcards={"model": model} if model else {}, desc=None,
                   cmd=cmd or (f"dinoflow {rule}" + (f" --model {model}" if model else "") + f" > logs/{rule}{m}.log"),
                   deps=list(deps), params=list(params), outs=list(outs if outs is not None else [f"out/{rule}{m}"]),
                   metrics=list(metrics), plots=list(plots), logs=[f"logs/{rule}{m}.log"])


def test_uniform_per_model_rule_becomes_foreach():
    specs = [_spec("embed", m, deps=[f"models/{m}/w"], metrics=[f"metrics/{m}.json"]) for m in ("a", "random")]
    stages, names = dvc_stages(specs)
    assert names == {("embed", "a"): "embed@a", ("embed", "random"): "embed@random"}
    assert stages["embed"]["foreach"] == ["a", "random"]
    do = stages["embed"]["do"]
    assert do["cmd"] == f"mkdir -p logs/embed && dinoflow embed --model {ITEM} > logs/embed/{ITEM}.log"
    assert do["deps"] == [f"models/{ITEM}/w"]
    assert do["metrics"] == [{f"metrics/{ITEM}.json": {"cache": False}}]


def test_per_model_rule_with_different_params_becomes_one_stage_per_model():
    specs = [_spec("train", "a", params=["seed", "backbone"]), _spec("train", "b", params=["seed", "pretrained"])]
    stages, names = dvc_stages(specs)
    assert set(stages) == {"train-a", "train-b"} and names[("train", "b")] == "train-b"
    assert stages["train-a"]["params"] == ["seed", "backbone"]
    assert stages["train-b"]["params"] == ["seed", "pretrained"]
    assert stages["train-b"]["cmd"].endswith("dinoflow train --model b > logs/train/b.log")


def _expand(stages):
    """Each DVC stage with foreach resolved as DVC does (${item} -> the model)."""
    def sub(v, m):
        if isinstance(v, dict):
            return {sub(k, m): sub(x, m) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x, m) for x in v]
        return v.replace(ITEM, m) if isinstance(v, str) else v
    out = {}
    for name, body in stages.items():
        if "foreach" in body:
            out.update({f"{name}@{m}": sub(body["do"], m) for m in body["foreach"]})
        else:
            out[name] = body
    return out


@pytest.mark.parametrize("shared, foreach", [
    ("data/params_a_b", True),   # "a" inside a word is not the model name: stays literal
    ("data/shared", True),
    ("data/a-x", False),         # "a" as a word: templating would change b's stage, so one stage per model
])
def test_model_name_is_templated_only_where_it_is_the_model(shared, foreach):
    specs = [_spec("embed", m, deps=[f"data/{m}.parquet", shared]) for m in ("a", "b")]
    stages, names = dvc_stages(specs)
    assert ("embed" in stages) == foreach
    expanded = _expand(stages)
    for spec in specs:  # whatever the form, DVC sees exactly each job's own stage
        assert expanded[names[("embed", spec.wildcards["model"])]] == export_dvc._stage_body(spec)


def test_plots_and_metrics_are_not_cached_and_other_wildcards_fail():
    stages, _ = dvc_stages([_spec("report", outs=["r.html"], metrics=["m.json"], plots=["figs"])])
    assert stages["report"]["outs"] == ["r.html"]
    assert stages["report"]["metrics"] == [{"m.json": {"cache": False}}]
    assert stages["report"]["plots"] == [{"figs": {"cache": False}}]
    bad = _spec("x")
    bad.wildcards = {"sample": "s1"}
    with pytest.raises(DinoflowError, match="sample"):
        dvc_stages([bad])


def test_jobs_of_the_repository_dag():
    specs = jobs(REPO)
    by = {(s.rule, s.wildcards.get("model")): s for s in specs}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    models = [m["name"] for m in params["models"]]
    for m in models:
        assert (("train", m) in by) != (("init_model", m) in by), m  # exactly one way to make each model
        for rule in ("embed", "neighbours", "align", "probes"):
            assert by[(rule, m)].cmd.startswith(f"dinoflow {rule.replace('_', '-')} --model {m} ")
    assert by[("ingest", None)].metrics == [paths.INGEST_SUMMARY]
    assert by[("report", None)].metrics == [paths.REPORT_METRICS]
    for m in models:
        if ("train", m) in by:
            train = by[("train", m)]
            assert train.metrics == [f"{paths.train_log_dir(m)}/metrics.json"]
            assert train.plots == [f"{paths.train_log_dir(m)}/plots"]
    # the scratch model (init random, method dino) reads the learning-rate search, the fine-tunes do not
    assert paths.LR_SEARCH_BEST in by[("train", "scratch")].deps
    assert paths.LR_SEARCH_BEST not in by[("train", "ft_last1")].deps
    assert "finetune" in by[("train", "ft_last1")].params and "finetune" not in by[("train", "scratch")].params
    assert "train" not in by[("init_model", "random")].params
    if params["demo"]["enabled"]:
        assert params["collection"]["metadata"] in by[("demo_collection", None)].outs


def test_dvc_reads_the_generated_file_as_the_same_dag(tiny_workspace):
    """Each Snakemake job is one DVC stage with the same command, deps, params and outputs (DVC's parser)."""
    from dvc.repo import Repo

    ws = link_workflow(tiny_workspace)
    names = dvc_init(ws)
    specs = jobs(ws)
    assert set(names) == {(s.rule, s.wildcards.get("model")) for s in specs}
    with Repo(str(ws)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        assert set(stages) == set(names.values())
        for spec in specs:
            st = stages[names[(spec.rule, spec.wildcards.get("model"))]]
            assert st.cmd.endswith(spec.cmd)
            dvc_deps = {d.def_path for d in st.deps if not d.def_path.endswith("params.yaml")}
            assert dvc_deps == set(spec.deps), spec.rule
            dvc_params = {k for d in st.deps if hasattr(d, "params") for k in (d.params or [])}
            assert dvc_params == set(spec.params), spec.rule
            outs = {o.def_path: o for o in st.outs}
            assert set(outs) == set(spec.outs + spec.metrics + spec.plots), spec.rule
            assert all(outs[p].metric and not outs[p].use_cache for p in spec.metrics)
            assert all(outs[p].plot and not outs[p].use_cache for p in spec.plots)


def test_each_model_tracks_only_its_own_method_section(tiny_workspace):
    """methods.<name> is a params entry of the models of that method only (Snakemake and DVC alike), so editing
    one method's knob re-runs only its models; whether a model reads the lr search is the config's one answer."""
    ws = link_workflow(tiny_workspace)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["models"].append({"name": "simclr_scratch", "init": "random", "method": "simclr", "trainable": "all"})
    params["methods"]["simclr"] = {"temperature": 0.3}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    by = {(s.rule, s.wildcards.get("model")): s for s in jobs(ws)}
    assert "methods.simclr" in by[("train", "simclr_scratch")].params
    assert "methods.dinov2" not in by[("train", "simclr_scratch")].params
    assert "methods.dinov2" in by[("train", "scratch")].params
    assert "methods.simclr" not in by[("train", "scratch")].params
    assert paths.LR_SEARCH_BEST in by[("train", "scratch")].deps  # dinov2 is the searched method
    assert paths.LR_SEARCH_BEST not in by[("train", "simclr_scratch")].deps  # another method: its train.lr
    assert "methods.dinov2" in by[("lr_search", None)].params

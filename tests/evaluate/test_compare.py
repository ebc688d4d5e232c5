"""compare: bootstrap interval coverage against known population values, paired differences on planted models,
verdicts, and the stage end to end on generated probes / align outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import align, compare, probes
from dinoflow.evaluate.align import field_features
from dinoflow.evaluate.compare import (
    Resampler,
    bootstrap_means,
    percentile_interval,
    sample_resample_pairs,
    spearman_bootstrap,
    summarise_metric,
)
from dinoflow.evaluate.spearman import exact_pair_spearman
from dinoflow.evaluate.vectors import write_vectors
from dinoflow.utils import write_json

# 200 replications of a nominal 95% interval: coverage ~ Binomial(200, 0.95) / 200, sd 0.015. The bounds are
# 3 sd wide (a percentile interval of a mean slightly under-covers at these sizes: ~0.94).
COVERAGE_BOUNDS = (0.90, 0.995)


def test_bootstrap_interval_of_a_mean_covers_the_population_value():
    rng = np.random.default_rng(0)
    p, n, covered = 0.7, 200, 0
    for _ in range(200):
        hits = (rng.random(n) < p).astype(float)[None, :]
        lo, hi = percentile_interval(bootstrap_means(hits, Resampler(n), 500, rng)[:, 0])
        covered += lo <= p <= hi
    assert COVERAGE_BOUNDS[0] <= covered / 200 <= COVERAGE_BOUNDS[1]


def test_group_bootstrap_covers_clustered_data_where_the_image_bootstrap_does_not():
    """Near-duplicate families (5 images sharing a success probability drawn per family, population mean 0.6):
    resampling families whole keeps ~95% coverage; resampling images one by one is too narrow."""
    rng = np.random.default_rng(1)
    n_groups, size, truth = 60, 5, 0.6
    groups = np.repeat(np.arange(n_groups), size)
    cover = {"group": 0, "image": 0}
    for _ in range(200):
        p = rng.beta(0.6, 0.4, size=n_groups)             # mean 0.6, strongly clustered
        hits = (rng.random(n_groups * size) < p[groups]).astype(float)[None, :]
        for unit, g in (("group", groups), ("image", None)):
            lo, hi = percentile_interval(bootstrap_means(hits, Resampler(hits.size, g), 400, rng)[:, 0])
            cover[unit] += lo <= truth <= hi
    assert COVERAGE_BOUNDS[0] <= cover["group"] / 200 <= COVERAGE_BOUNDS[1]
    assert cover["image"] / 200 < 0.80


def _population(n, rng):
    z = rng.normal(size=(n, 3))
    return np.concatenate([z, rng.normal(size=(n, 3))], 1), np.concatenate([z[:, :2], rng.normal(size=(n, 2))], 1)


@pytest.mark.slow
def test_spearman_bootstrap_over_images_covers_the_population_value():
    """Population value: the all-pairs Spearman of a 3,000-image sample (its own error ~0.003). 100 samples of
    60 images: the item bootstrap (pairs among resampled images) covers it at about the nominal rate."""
    rng = np.random.default_rng(2)
    fa, fb = field_features(*_population(3000, rng))
    truth = exact_pair_spearman(fa, fb).spearman
    covered = 0
    for _ in range(100):
        img, txt = _population(60, rng)
        lo, hi = percentile_interval(spearman_bootstrap({"m": img}, txt, Resampler(60), 200, 1000, rng)["m"])
        covered += lo <= truth <= hi
    assert 0.87 <= covered / 100 <= 1.0  # Binomial(100, 0.95): sd 0.022


def test_resample_pairs_never_pair_an_image_with_its_copy():
    rng = np.random.default_rng(3)
    draws = np.array([0, 0, 0, 1, 2, 2])
    i, j = sample_resample_pairs(draws, 5000, rng)
    assert i.size == 5000 and (i != j).all()
    assert {(a, b) for a, b in zip(i, j)} <= {(a, b) for a in (0, 1, 2) for b in (0, 1, 2) if a != b}
    with pytest.raises(DinoflowError, match="fewer than two distinct"):
        sample_resample_pairs(np.array([4, 4, 4]), 10, rng)


def test_paired_difference_finds_a_planted_better_model():
    rng = np.random.default_rng(4)
    n = 400
    base = (rng.random(n) < 0.6).astype(float)
    better = np.maximum(base, (rng.random(n) < 0.25))   # right wherever base is, plus more: +~10 points
    twin = base.copy()
    twin[rng.choice(n, 4, replace=False)] = 1 - twin[rng.choice(n, 4, replace=False)]  # same quality
    values = np.stack([base, better, twin])
    boot = bootstrap_means(values, Resampler(n), 1000, rng)
    models = ["base", "better", "twin"]
    entry = summarise_metric(models, dict(zip(models, values.mean(axis=1))), dict(zip(models, boot.T)),
                             {m: n for m in models}, {})
    pair = {(p["a"], p["b"]): p for p in entry["pairs"]}
    assert [(p["a"], p["b"]) for p in entry["pairs"]] == [("base", "better"), ("base", "twin"), ("better", "twin")]
    assert pair[("base", "better")]["diff"] < 0 and pair[("base", "better")]["ci95"][1] < 0
    assert pair[("base", "better")]["separable"] and not pair[("base", "twin")]["separable"]
    assert entry["best"] == "better" and entry["verdict"].startswith("better best; lead over ")
    # the paired interval is much narrower than one from independent resamples would be
    lo, hi = pair[("base", "twin")]["ci95"]
    assert hi - lo < 0.03
    entry = summarise_metric(["base", "twin"], {"base": base.mean(), "twin": twin.mean()},
                             {"base": boot[:, 0], "twin": boot[:, 2]}, {"base": n, "twin": n}, {})
    assert entry["best"] is None and entry["verdict"].startswith("the data cannot separate ")


def test_undefined_models_are_null_with_reason_and_left_out_of_pairs():
    boot = {"a": np.linspace(0.5, 0.6, 100), "b": np.linspace(0.1, 0.2, 100)}
    entry = summarise_metric(["a", "x", "b"], {"a": 0.55, "x": None, "b": 0.15}, boot, {"a": 10, "b": 10},
                             {"x": "all 16 captions are identical"})
    assert entry["per_model"]["x"] == {"value": None, "ci95": None, "n_items": 0,
                                       "reason": "all 16 captions are identical"}
    assert [(p["a"], p["b"]) for p in entry["pairs"]] == [("a", "b")]
    assert entry["best"] == "a" and "(x: undefined)" in entry["verdict"]
    entry = summarise_metric(["a", "b"], {"a": None, "b": None}, {}, {}, {"a": "r1", "b": "r1"})
    assert entry["best"] is None and entry["verdict"] == "undefined for every model: r1"
    json.dumps(entry, allow_nan=False)


def test_zero_width_interval_is_explained_not_shown_as_certainty():
    rng = np.random.default_rng(0)
    perfect = np.ones((1, 11))  # every one of 11 test images correct
    mixed = (rng.random((1, 11)) < 0.5).astype(float)
    values = np.concatenate([perfect, mixed])
    boot = bootstrap_means(values, Resampler(11), 200, rng)
    entry = summarise_metric(["perfect", "mixed"], dict(zip(["perfect", "mixed"], values.mean(axis=1))),
                             {"perfect": boot[:, 0], "mixed": boot[:, 1]}, {"perfect": 11, "mixed": 11}, {})
    assert entry["per_model"]["perfect"]["ci95"] == [1.0, 1.0]
    assert entry["per_model"]["perfect"]["reason"].startswith("zero-width interval: every resample of the 11 items")
    assert entry["per_model"]["mixed"]["reason"] is None


@pytest.mark.parametrize("n, groups, note", [
    (100, 30, None), (100, None, None), (5000, 400, None),
    (99, 30, "few images: 99 images (< 100) in 30 groups; read the number and its interval as rough"),
    (100, 29, "few images: 100 images in 29 groups (< 30); read the number and its interval as rough"),
    (1, None, "few images: 1 image (< 100); read the number and its interval as rough"),
])
def test_small_sample_note_on_both_sides_of_the_thresholds(n, groups, note):
    from dinoflow.evaluate.sample_size import MIN_GROUPS, MIN_IMAGES, small_sample_note

    assert (MIN_IMAGES, MIN_GROUPS) == (100, 30)
    assert small_sample_note(n, groups) == note


def test_metric_entry_carries_the_small_sample_note():
    rng = np.random.default_rng(0)

    def entry(n, n_groups):
        values = (rng.random((2, n)) < [[0.8], [0.4]]).astype(float)
        boot = bootstrap_means(values, Resampler(n), 100, rng)
        return summarise_metric(["a", "b"], dict(zip("ab", values.mean(axis=1))), {"a": boot[:, 0], "b": boot[:, 1]},
                                {"a": n, "b": n}, {}, n_groups=n_groups)

    few = entry(99, 40)
    assert few["small_sample"].startswith("few images: 99 images (< 100) in 40 groups") and few["n_groups"] == 40
    assert entry(100, 40)["small_sample"] is None
    assert "29 groups (< 30)" in entry(150, 29)["small_sample"]
    assert entry(100, None)["small_sample"] is None and entry(100, None)["n_groups"] is None
    undefined = summarise_metric(["a"], {"a": None}, {}, {}, {"a": "degenerate"})
    assert undefined["small_sample"] is None  # no value, nothing to qualify
    json.dumps(few, allow_nan=False)


# ------------------------------------------------------------------------------------------- the stage


def _workspace(n=60, seed=0):
    """Embeddings of 3 models (seeing > weak > random), captions, keywords, labels, groups of 2."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, size=n)
    centres = rng.normal(size=(3, 8))
    text = centres[cls] @ rng.normal(size=(8, 12)) + 0.3 * rng.normal(size=(n, 12))
    ids = [f"im{i:03d}" for i in range(n)]
    embeddings = {"seeing": centres[cls] + 0.3 * rng.normal(size=(n, 8)),
                  "weak": centres[cls] + 1.5 * rng.normal(size=(n, 8)),
                  "random": rng.normal(size=(n, 8))}
    for m, x in embeddings.items():
        write_vectors(paths.embeddings(m), ids, {"cls": x, "patch_mean": x}, {"model": m})
    write_vectors(paths.text_embeddings("caption"), ids, {"embedding": text}, {"text_model": "t"})
    write_vectors(paths.text_embeddings("keywords"), ids, {"embedding": np.ones((n, 4))}, {"text_model": "t"})
    Path(paths.MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "status": "ok", "kind": np.array(["a", "b", "c"])[cls]}).to_parquet(paths.MANIFEST)
    pd.DataFrame({"id": ids, "group": [f"g{i // 2}" for i in range(n)]}).to_parquet(paths.GROUPS)
    write_json(paths.TEXT_METRICS, {"quality": {"caption": {"warning": None}, "keywords": {"warning": None}}})
    return {"seed": 0, "models": [{"name": m} for m in embeddings],
            "collection": {"label_columns": ["kind"]},
            "probes": {"test_fraction": 0.3, "knn_k": 5, "knn_temperature": 0.07, "linear_max_iter": 300,
                       "linear_c_grid": [0.1, 1.0], "cv_folds": 3},
            "align": {"exact_max_n": 1000, "n_sampled_pairs": 3000, "n_permutations": 19, "mutual_knn_k": 5,
                      "near_constant_share": 0.9},
            "compare": {"n_resamples": 200, "n_pairs": 400, "resample_unit": "group"}}


def test_compare_main_end_to_end(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    params = _workspace()
    for m in ("seeing", "weak", "random"):
        probes.main(params, model=m)
        align.main(params, model=m)
    with caplog.at_level("WARNING", logger="dinoflow.evaluate.compare"):
        result = compare.main(params)
    text = Path(paths.COMPARE_METRICS).read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}")) == result
    assert result["resampling"] == {
        "method": f"bootstrap over images, near-duplicate groups ({paths.GROUPS}) resampled whole", "unit": "group",
        "n_resamples": 200, "seed": 0, "level": 0.95, "spearman_pairs_per_resample": 400}
    metrics = result["metrics"]
    assert set(metrics) == {"knn_top1/kind", "knn_top5/kind", "linear_top1/kind", "linear_top5/kind",
                            "spearman/caption", "spearman/keywords", "mutual_knn/caption", "mutual_knn/keywords"}
    sp = metrics["spearman/caption"]
    truth = json.loads(Path(paths.align_metrics("seeing")).read_text())["fields"]["caption"]
    assert sp["per_model"]["seeing"]["value"] == truth["spearman"] and sp["per_model"]["seeing"]["n_items"] == 60
    lo, hi = sp["per_model"]["seeing"]["ci95"]
    assert lo < truth["spearman"] < hi
    assert sp["best"] == "seeing" and len(sp["pairs"]) == 3
    # 60 images in 30 groups of 2: few images, enough groups; the stage warns naming the metric and the counts
    assert sp["n_groups"] == 30 and sp["small_sample"].startswith("few images: 60 images (< 100) in 30 groups;")
    assert f"spearman/caption: {sp['small_sample']}" in caplog.text
    assert f"knn_top1/kind: {metrics['knn_top1/kind']['small_sample']}" in caplog.text
    assert {(p["a"], p["b"]) for p in sp["pairs"]} == {("seeing", "weak"), ("seeing", "random"), ("weak", "random")}
    knn = metrics["knn_top1/kind"]
    stored = json.loads(Path(paths.probe_metrics("random")).read_text())["columns"]["kind"]["knn"]["top1"]
    assert knn["per_model"]["random"]["value"] == pytest.approx(stored)
    assert knn["per_model"]["random"]["n_items"] == stored_n(paths.probe_metrics("random"))
    top5 = metrics["knn_top5/kind"]  # 3 classes: top-5 is 1 by construction, so undefined for every model
    assert top5["best"] is None and top5["pairs"] == [] and top5["verdict"].startswith("undefined for every model")
    assert all(v["value"] is None and "by construction with 3 classes" in v["reason"]
               for v in top5["per_model"].values())
    kw = metrics["spearman/keywords"]
    assert kw["best"] is None and all(v["value"] is None for v in kw["per_model"].values())
    assert "keyword descriptors are identical" in kw["verdict"] and kw["pairs"] == []
    assert metrics["mutual_knn/keywords"]["per_model"]["weak"]["reason"].startswith("all 60 keyword")
    # same params, same output
    assert compare.main(params) == result


def stored_n(path):
    return json.loads(Path(path).read_text())["columns"]["kind"]["n_test"]


def test_compare_refuses_stale_items(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _workspace(n=40, seed=1)
    params["models"] = params["models"][:2]
    for m in ("seeing", "weak"):
        probes.main(params, model=m)
        align.main(params, model=m)
    items = pd.read_parquet(paths.probe_items("weak"))
    items.loc[0, "knn_top1"] = 1 - items.loc[0, "knn_top1"]
    items.to_parquet(paths.probe_items("weak"))
    with pytest.raises(DinoflowError, match="stale"):
        compare.main(params)
    Path(paths.align_metrics("weak")).unlink()
    with pytest.raises(DinoflowError, match="run probes and align"):
        compare.main(params)

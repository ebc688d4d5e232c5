"""reports/index.html and reports/metrics.json: escaping, self-containment, numbers read from the inputs,
"not run" notes for missing inputs."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.errors import DinoflowError
from dinoflow.report import html as report_html
from dinoflow.utils import read_json
from report_fixtures import HOSTILE_CAPTION, chdir


class PageParser(HTMLParser):
    """Collects tags/attributes, and the cells of every table (as text) keyed by its section id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.section = None
        self.tables: dict[str, list[list[str]]] = {}  # every row of every table of a section
        self.section_tables: dict[str, list[list[list[str]]]] = {}  # the tables of a section, one by one
        self.cell_classes: dict[str, list[list[str]]] = {}  # class attribute of each td, per section
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.section = attrs.get("id")
        elif tag == "table":
            self.section_tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables.setdefault(self.section, []).append(self._row)
            self.section_tables[self.section][-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(report_ws):
    ws, params = report_ws
    with chdir(ws):
        report_html.main(params)
        page = Path(paths.REPORT_HTML).read_text(encoding="utf-8")
        metrics = read_json(paths.REPORT_METRICS)
    parser = PageParser()
    parser.feed(page)
    return ws, params, page, metrics, parser


def test_collection_text_is_escaped(report):
    _, _, page, _, parser = report
    assert "<script" not in page.lower()  # the page has no script at all
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; " in page  # shown as text (escaped) next to its grid
    assert HOSTILE_CAPTION in "".join(parser.text)  # ...and reads back as the original caption


def test_page_is_self_contained(report):
    _, _, page, _, parser = report
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) >= 10
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    for tag, attrs in parser.tags:
        assert tag not in ("link", "script", "iframe", "object", "embed")
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http:", "https:", "//", "file:")), (tag, attrs)
    csp = [a for t, a in parser.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


def _table(parser, section: str, index: int) -> tuple[dict[str, list[str]], list[str]]:
    """({first cell: the other cells} of each body row, header cells after the first) of a section's table."""
    rows = parser.section_tables[section][index]
    return {r[0]: r[1:] for r in rows[1:]}, rows[0][1:]


def _comparison(parser) -> tuple[dict[str, list[str]], list[str]]:
    """The details table (alignment and probe point estimates), the comparison section's last table."""
    return _table(parser, "comparison", -1)


# red badges next to a model's name: scratch's training collapsed, random's embeddings are degenerate (fixture)
BADGES = {"scratch": "uniform collapse", "random": "degenerate embeddings"}


def _interval(value, ci) -> str:
    return "–" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def test_compare_table_renders_compare_json(report):
    ws, params, _, _, parser = report
    models = model_names(params)
    with chdir(ws):
        compare = read_json(paths.COMPARE_METRICS)
        methods = {m: read_json(paths.model_info(m))["method"] for m in models}
    table, header = _table(parser, "comparison", 0)
    names = list(compare["metrics"])
    assert header == ["method"] + names  # the method column (models/<name>/info.json `method`), then the metrics
    badge = BADGES
    assert list(table) == [m + badge.get(m, "") for m in models] + ["best"]
    for m in models:
        assert table[m + badge.get(m, "")][0] == methods[m]
        for j, name in enumerate(names):
            e = compare["metrics"][name]["per_model"][m]
            few = compare["metrics"][name]["small_sample"] if e["value"] is not None else None
            assert table[m + badge.get(m, "")][j + 1] == \
                _interval(e["value"], e["ci95"]) + (e["reason"] or "") + (few or "")
    # the best model only where compare.json names one; "cannot separate" elsewhere
    assert table["best"][0] == ""
    for j, name in enumerate(names):
        assert table["best"][j + 1] == (compare["metrics"][name]["best"] or "cannot separate")
    assert table["best"].count("cannot separate") == len(names) - 1 and models[-1] in table["best"]
    random_row = table["random" + badge["random"]]
    assert "no image of this model has keywords" in random_row[1 + names.index("mutual_knn/keywords")]


def test_pairwise_differences_table(report):
    ws, params, page, _, parser = report
    models = model_names(params)
    with chdir(ws):
        compare = read_json(paths.COMPARE_METRICS)
    table, header = _table(parser, "comparison", 1)
    names = list(compare["metrics"])
    assert header == names
    pairs = list(table)
    # every pair of models, those with the baselines first (random, then pretrained), then the rest
    assert len(pairs) == len(models) * (len(models) - 1) // 2
    n_random, n_pre = len(models) - 1, len(models) - 2
    assert all("random" in p for p in pairs[:n_random])
    assert all("pretrained" in p for p in pairs[n_random:n_random + n_pre])
    assert not any("random" in p or "pretrained" in p for p in pairs[n_random + n_pre:])
    for name, metric in compare["metrics"].items():
        j = names.index(name)
        for pr in metric["pairs"]:
            assert table[f"{pr['a']} − {pr['b']}"][j] == _interval(pr["diff"], pr["ci95"])
    sep = [r for r in page.split('id="pairs"')[1].split("</table>")[0].split("<tr>") if 'class="num sep"' in r]
    assert len(sep) == len(pairs)  # one separable metric: one bold cell per pair row


def test_health_collapse_and_drift_are_shown(report):
    ws, params, page, _, parser = report
    table, header = _table(parser, "health", 0)
    assert header[:6] == ["method", "images", "dim", "raw cosine", "used similarity", "RankMe"]
    table = {m: row[1:] for m, row in table.items()}  # the method column is checked below
    assert "Similarity used by the neighbours" in page and "<b>centred cosine, float64</b>" in page
    with chdir(ws):
        for m in model_names(params):
            h = read_json(paths.health_metrics(m))
            info = read_json(paths.model_info(m))
            row = table[m + BADGES.get(m, "")]
            assert _table(parser, "health", 0)[0][m + BADGES.get(m, "")][0] == info["method"]
            assert row[0] == str(h["n"]) and row[1] == str(h["dim"]) and row[4] == f"{h['rankme']:.3f}"
            if h["degenerate"]:
                assert row[5].startswith("degenerate") and h["reason"] in row[5]
            else:
                assert row[5] == "healthy"
            if info["collapse"] is None:
                assert row[6] == "– (untrained)" and row[7] == "– (untrained)"
            else:
                label = {"uniform_collapse": "uniform collapse", "healthy": "healthy"}[info["collapse"]["verdict"]]
                assert row[6] == f"{label} {info['collapse']['reason']}"
                d = info["drift"]
                assert row[7] == (f"{_interval(d['median_cosine'], d['ci95'])} over {d['n_images']} images vs "
                                  f"{d['reference']}")
    random_row = table["randomdegenerate embeddings"]
    assert random_row[2].startswith("1 − ")  # raw cosines of near-identical embeddings: how near 1


def test_models_table_says_how_each_model_was_trained(report):
    ws, params, _, _, parser = report
    table, header = _table(parser, "models", 0)
    assert header[:7] == ["architecture", "init", "LayerScale init", "method", "evaluated network", "trainable",
                          "trainable parameters"]
    with chdir(ws):
        ft = read_json(paths.model_info("ft_last1"))
        rnd = read_json(paths.model_info("random"))
    assert table["ft_last1"][4] == "teacher" and table["random" + "degenerate embeddings"][4] == "– (untrained)"
    assert table["ft_last1"][6] == f"{ft['trainable_params']:,} of {ft['total_params']:,} (10.0%)"
    assert table["random" + "degenerate embeddings"][2] == str(rnd["init_values"])
    assert table["pretrained"][2] == "–"


def test_comparison_numbers_match_the_metric_files(report):
    ws, params, _, _, parser = report
    table, header = _comparison(parser)
    models = model_names(params)
    with chdir(ws):
        # model names head the columns; stand-in models (from their info.json) say so under their name
        stand_in = {m: read_json(paths.model_info(m))["stand_in"] for m in models}
        assert stand_in["pretrained"] and not stand_in["random"]
        assert header == [m + ("stand-in" if stand_in[m] else "") for m in models]
        for j, m in enumerate(models):
            align = read_json(paths.align_metrics(m))["fields"]
            cap, kw = align["caption"], align["keywords"]
            assert cap["method"] == "exact"  # exact: the value without an interval
            assert table["caption: Spearman [95% CI]"][j] == f"{cap['spearman']:.3f} (exact)"
            assert table["keywords: Spearman [95% CI]"][j] == \
                f"{kw['spearman']:.3f} [{kw['ci_low']:.3f}, {kw['ci_high']:.3f}]"
            assert table["caption: Mantel p"][j] == f"{cap['mantel_p']:.3f}"
            assert table[f"keywords: mutual kNN@{kw['mutual_knn_k']}"][j] == f"{kw['mutual_knn']:.3f}"
            assert table["caption: mean per-query Spearman (± SEM)"][j] == \
                f"{cap['mean_query_spearman']:.3f} ± {cap['query_spearman_sem']:.3f}"
            assert table["caption: images with this text"][j] == str(cap["n_items"])
            probes = read_json(paths.probe_metrics(m))["columns"]
            for label, entry in probes.items():
                for clf in ("knn", "linear"):
                    for s, name in (("top1", "top-1"), ("top5", "top-5")):
                        assert table[f"{label}: {clf} {name}"][j] == f"{entry[clf][s]:.3f}"


def test_metrics_json_holds_the_exact_values(report):
    ws, params, _, metrics, _ = report
    json.dumps(metrics, allow_nan=False)  # strict JSON
    models = model_names(params)
    assert sorted(metrics["models"]) == sorted(models)
    with chdir(ws):
        compare = read_json(paths.COMPARE_METRICS)
        assert metrics["resampling"] == compare["resampling"]
        for name, metric in compare["metrics"].items():
            assert metrics["metrics"][name] == {"best": metric["best"], "verdict": metric["verdict"],
                                                "higher_is_better": True, "small_sample": metric["small_sample"]}
        for m in models:
            got = metrics["models"][m]
            details = got["details"]
            align = read_json(paths.align_metrics(m))["fields"]
            probes = read_json(paths.probe_metrics(m))["columns"]
            assert details["align.caption.spearman"] == align["caption"]["spearman"]
            assert details["align.keywords.ci_high"] == align["keywords"]["ci_high"]
            assert details["align.keywords.mantel_p"] == align["keywords"]["mantel_p"]
            assert details["probes.color.linear.top5"] == probes["color"]["linear"]["top5"]
            assert details["probes.shape.knn.top1"] == probes["shape"]["knn"]["top1"]
            assert not any("confusion" in k for k in details)
            info = read_json(paths.model_info(m))
            assert got["health"] == read_json(paths.health_metrics(m))
            assert got["collapse_verdict"] == (info["collapse"] or {}).get("verdict")
            assert got["drift"] == info["drift"] and got["training"]["trainable_share"] == info["trainable_share"]
            for name, metric in compare["metrics"].items():
                assert got["metrics"][name] == metric["per_model"][m]  # value, ci95, n_items, reason
                # paired differences, oriented model - other
                diffs = {d["other"]: d for d in got["differences"][name]}
                for pr in metric["pairs"]:
                    if m == pr["a"]:
                        assert diffs[pr["b"]]["diff"] == pr["diff"] and diffs[pr["b"]]["ci95"] == pr["ci95"]
                    elif m == pr["b"]:
                        assert diffs[pr["a"]]["diff"] == -pr["diff"]
                        assert diffs[pr["a"]]["ci95"] == [-pr["ci95"][1], -pr["ci95"][0]]
                assert len(diffs) == sum(m in (pr["a"], pr["b"]) for pr in metric["pairs"])
    assert metrics["models"]["scratch"]["collapse_verdict"] == "uniform_collapse"
    assert metrics["models"]["random"]["health"]["degenerate"] is True


def test_collection_models_and_probes_sections(report):
    ws, params, page, _, parser = report
    coll = {r[0]: r[1] for r in parser.tables["collection"] if len(r) == 2}
    assert coll["input rows"] == "25" and coll["ok images"] == "24" and coll["skipped rows"] == "1"
    with chdir(ws):
        groups = read_json(paths.GROUPS_SUMMARY)
    assert coll["near-duplicate groups (2+ images)"] == str(groups["n_near_duplicate_groups"])
    assert coll["images in near-duplicate groups"] == str(groups["n_images_in_near_duplicate_groups"])
    assert f"phash perceptual hashes within Hamming distance {groups['max_distance']}" in page
    assert coll["ok images with a caption"] == "20"  # every 6th row of the tiny collection has no text
    skipped = [r for r in parser.tables["collection"] if r and r[0] == "missing_file"]
    assert skipped and skipped[0][1] == "1" and "gone" in skipped[0][2]
    with chdir(ws):
        info = read_json(paths.model_info("pretrained"))
    assert info["stand_in"] and info["stand_in_label"] in "".join(parser.text)
    models_rows = {r[0]: r for r in parser.tables["models"][1:]}
    assert info["stand_in_label"] in models_rows["pretrained"][-2]
    assert models_rows["randomdegenerate embeddings"][-2] == ""
    assert models_rows["pretrained"][-1] == info["params_hash"]
    # the confusion matrix: of the model compare.json names best (linear top-1 of the first label), else of the
    # highest point estimate, said to be no best
    last = model_names(params)[-1]
    first, second = params["collection"]["label_columns"][:2]
    assert f"Confusion matrix of <b>{last}</b> (best linear top-1 ({last} best;" in page
    assert (f"Confusion matrix of <b>{last}</b> (highest linear top-1 point estimate 0.640, not the best: the data "
            f"cannot separate the models)") in page
    assert "not run" not in page.split('id="grids"')[1]  # grids and attention present
    assert ws.joinpath("reports/figures/report/lr_search_trials.png").exists()
    assert "<code>lr = 0.0010</code>" in page and "<code>objective = 3.7000</code>" in page
    assert "the criterion cannot tell these learning rates apart" in page  # best.json's note on close trials


@pytest.mark.slow
def test_report_is_deterministic(report_ws, tmp_path):
    src, params = report_ws
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    pages = []
    with chdir(ws):
        for _ in range(2):
            report_html.main(params)
            pages.append((Path(paths.REPORT_HTML).read_bytes(), Path(paths.REPORT_METRICS).read_bytes()))
    assert pages[0] == pages[1]


def test_missing_inputs_are_reported_not_run(report_ws, tmp_path):
    src, params = report_ws
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    params = json.loads(json.dumps(params))
    params["collection"]["label_columns"] = []
    with chdir(ws):
        shutil.rmtree("metrics/probes")
        shutil.rmtree(paths.ATTENTION_DIR)
        shutil.rmtree(paths.train_log_dir("scratch"))
        Path(paths.align_metrics("random")).unlink()
        report_html.main(params)
        page = Path(paths.REPORT_HTML).read_text(encoding="utf-8")
        metrics = read_json(paths.REPORT_METRICS)
    assert "not run: probes: the collection has no label column" in page
    assert f"not run: {paths.ATTENTION_DIR}/queries.json not found" in page
    assert f"not run: no dvclive curves under {paths.train_log_dir('scratch')}" in page
    assert f"alignment of random: {paths.align_metrics('random')} not found" in page
    parser = PageParser()
    parser.feed(page)
    table, _ = _comparison(parser)
    assert table["caption: Spearman [95% CI]"][0] == "–"
    assert not any(k.startswith("shape:") for k in table)
    assert metrics["models"]["random"]["details"] == {}
    assert "align.caption.spearman" in metrics["models"]["scratch"]["details"]


def test_missing_contract_files_are_reported_not_run(report_ws, tmp_path):
    src, params = report_ws
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    with chdir(ws):
        for path in (paths.COMPARE_METRICS, paths.GROUPS_SUMMARY, paths.health_metrics("scratch")):
            Path(path).unlink()
        report_html.main(params)
        page = Path(paths.REPORT_HTML).read_text(encoding="utf-8")
        metrics = read_json(paths.REPORT_METRICS)
    assert f"not run: {paths.COMPARE_METRICS} not found" in page
    assert f"not run: near-duplicate groups: {paths.GROUPS_SUMMARY} not found" in page
    assert f"embedding health of scratch: {paths.health_metrics('scratch')} not found" in page
    assert metrics["metrics"] is None and metrics["models"]["scratch"]["health"] is None
    assert metrics["models"]["scratch"]["metrics"] == {} and metrics["models"]["ft_last1"]["health"]["n"] == 24


@pytest.mark.parametrize("path, edit, message", [
    (paths.COMPARE_METRICS, lambda d: d["metrics"]["linear_top1/color"].pop("best"),
     r"metrics/compare\.json: metrics\.linear_top1/color lacks key\(s\) best \(contract 4"),
    (paths.COMPARE_METRICS, lambda d: d["metrics"]["knn_top1/color"]["per_model"].pop("scratch"),
     r"metrics/compare\.json: metrics\.knn_top1/color\.per_model lacks key\(s\) scratch"),
    (paths.COMPARE_METRICS, lambda d: d["metrics"]["knn_top1/color"]["pairs"][0].pop("separable"),
     r"metrics\.knn_top1/color\.pairs\[0\] lacks key\(s\) separable"),
    (paths.COMPARE_METRICS, lambda d: d["resampling"].pop("level"), r"resampling lacks key\(s\) level"),
    # every two models with a value have their pair (the summary reads the leader's difference from it)
    (paths.COMPARE_METRICS, lambda d: d["metrics"]["knn_top1/color"]["pairs"].pop(),
     r"metrics/compare\.json: metrics\.knn_top1/color\.pairs lacks the pair of '\w+' and '\w+' \(contract 4"),
    (paths.COMPARE_METRICS, lambda d: d["metrics"]["knn_top1/color"]["pairs"][0].update(diff=None),
     r"metrics\.knn_top1/color\.pairs\[0\]\.diff must be a number, found None \(contract 4"),
    (paths.COMPARE_METRICS, lambda d: d["metrics"]["knn_top1/color"]["per_model"]["scratch"].update(value="0.5"),
     r"metrics\.knn_top1/color\.per_model\.scratch\.value must be a number or null, found '0\.5'"),
    (paths.GROUPS_SUMMARY, lambda d: d.pop("n_near_duplicate_groups"),
     r"metrics/groups\.json: the top level lacks key\(s\) n_near_duplicate_groups \(contract 1"),
    (paths.health_metrics("random"), lambda d: d["cosine_raw"].pop("p99"),
     r"metrics/health/random\.json: cosine_raw lacks key\(s\) p99 \(contract 3"),
    (paths.model_info("scratch"), lambda d: d.pop("evaluated_network"),
     r"models/scratch/info\.json: the top level lacks key\(s\) evaluated_network \(contract 2"),
    (paths.model_info("scratch"), lambda d: d["drift"].pop("ci95"),
     r"models/scratch/info\.json: drift lacks key\(s\) ci95"),
    (paths.model_info("scratch"), lambda d: d["collapse"].update(verdict="meh"),
     r"models/scratch/info\.json: collapse\.verdict 'meh' is not one of"),
])
def test_contract_files_lacking_a_key_name_file_and_key(report_ws, tmp_path, path, edit, message):
    src, params = report_ws
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    with chdir(ws):
        data = read_json(path)
        edit(data)
        Path(path).write_text(json.dumps(data))
        with pytest.raises(DinoflowError, match=message):
            report_html.build(params, fig_dir=tmp_path / "figs")


def test_pair_without_interval_is_shown_not_a_crash(report_ws, tmp_path):
    """compare.json's own output for a model whose value is finite but whose every resample is not (e.g. a
    Spearman of near-constant embeddings): its ci95 and its pairs' ci95 are null. The page and metrics.json show
    the differences without an interval instead of failing."""
    import numpy as np

    from dinoflow.evaluate.compare import summarise_metric

    src, params = report_ws
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    models = model_names(params)
    stats = {m: np.linspace(0.4, 0.6, 50) + 0.01 * i for i, m in enumerate(models)}
    stats[models[0]] = np.full(50, np.nan)
    entry = summarise_metric(models, {m: 0.5 + 0.01 * i for i, m in enumerate(models)}, stats,
                             {m: 200 for m in models}, {}, True, 60)
    assert entry["per_model"][models[0]]["ci95"] is None
    assert [p["ci95"] for p in entry["pairs"] if p["a"] == models[0]] == [None] * (len(models) - 1)
    with chdir(ws):
        data = read_json(paths.COMPARE_METRICS)
        data["metrics"]["knn_top1/color"] = entry
        Path(paths.COMPARE_METRICS).write_text(json.dumps(data))
        report_html.main(params)
        metrics = read_json(paths.REPORT_METRICS)
        page = Path(paths.REPORT_HTML).read_text(encoding="utf-8")
    diffs = metrics["models"][models[0]]["differences"]["knn_top1/color"]
    assert [d["ci95"] for d in diffs] == [None] * (len(models) - 1)
    assert [d["diff"] for d in diffs] == [p["diff"] for p in entry["pairs"] if p["a"] == models[0]]
    assert all(d["separable"] is False for d in diffs)
    other = metrics["models"][models[1]]["differences"]["knn_top1/color"]
    back = next(d for d in other if d["other"] == models[0])
    assert back["ci95"] is None and back["diff"] == -entry["pairs"][0]["diff"]
    assert "knn_top1/color" in page
    # the README tables (dinoflow.report.summary) show that model's value without an interval, as the page does
    from dinoflow.report import summary

    row = next(r for r in summary.metrics_table(metrics) if r.startswith("| knn_top1/color |"))
    assert row.split(" | ")[1 + list(metrics["models"]).index(models[0])] == "0.500"


def test_malformed_metrics_file_names_the_file(tmp_path):
    with chdir(tmp_path):
        path = Path(paths.align_metrics("scratch"))
        path.parent.mkdir(parents=True)
        path.write_text("[1, 2]")
        with pytest.raises(DinoflowError, match=r"metrics/align/scratch\.json: expected a JSON object"):
            report_html.read_align(["scratch"])
        path.write_text("{oops")
        with pytest.raises(DinoflowError, match=r"metrics/align/scratch\.json: not valid JSON"):
            report_html.read_align(["scratch"])


def test_training_curves_per_method(report):
    """The training section starts with one figure: a panel per trained model titled "model · method"; each
    model's own curves are headed with its method."""
    ws, params, page, _, parser = report
    trained = [m["name"] for m in params["models"] if m["method"] != "none"]
    imgs = [a for t, a in parser.tags if t == "img" and a.get("alt") == "loss and its components per trained model"]
    assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/png;base64,")
    assert (ws / paths.REPORT_FIGURES_DIR / "training_by_method.png").exists()
    training = page.split('<section id="training">')[1].split("</section>")[0]
    for m in params["models"]:
        if m["method"] != "none":
            assert f"<h3>{m['name']} ({m['method']})</h3>" in training
    assert training.index("Training curves per method") < training.index(f"<h3>{trained[0]} (")


def test_readme_summary_tables_copy_metrics_json(report, capsys):
    """`python -m dinoflow.report.summary` (the README's results tables) prints exactly the report's values."""
    from dinoflow.report import summary

    ws, params, page, metrics, parser = report
    summary.main([str(ws / paths.REPORT_METRICS)])
    out = capsys.readouterr().out
    models = list(metrics["models"])
    for name, metric in metrics["metrics"].items():
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == (metric["best"] or "cannot separate")
        for model, cell in zip(models, cells[1:-1]):
            e = metrics["models"][model]["metrics"][name]
            if e["value"] is None:
                assert cell.startswith("n/a")
            else:
                assert cell == f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
    for model, entry in metrics["models"].items():
        line = next(l for l in out.splitlines() if l.startswith(f"| {model}"))
        assert str(entry["collapse_verdict"] or "-") in line


# ------------------------------------------------------------------------------------ the summary at the top
def _summary(parser) -> dict[str, str]:
    """{metric: answer} of the summary's table (the metric cell holds "name (higher is better)")."""
    rows = parser.section_tables["summary"][0]
    assert rows[0] == ["metric", "answer"]
    return {r[0].split(" (")[0]: r[1] for r in rows[1:]}


def test_summary_comes_first_and_names_only_a_separable_winner(report):
    ws, params, page, _, parser = report
    models = model_names(params)
    first_label = params["collection"]["label_columns"][0]
    assert page.index('<section id="summary">') < page.index('<section id="models">')  # the top of the page
    summary = _summary(parser)
    with chdir(ws):
        compare = read_json(paths.COMPARE_METRICS)["metrics"]
    # headline metrics only (top-1 probes, Spearman, mutual kNN); top-5 stays in the comparison table
    assert set(summary) == {n for n in compare if not n.split("/")[0].endswith("top5")}
    winner, runner = models[-1], models[-2]
    sep = compare[f"linear_top1/{first_label}"]
    pair = next(p for p in sep["pairs"] if {p["a"], p["b"]} == {winner, runner})
    sign = 1 if pair["a"] == winner else -1
    lo, hi = sorted(sign * c for c in pair["ci95"])
    assert summary[f"linear_top1/{first_label}"].startswith(
        f"{winner} is best; its lead over {runner}, {sign * pair['diff']:.3f} [{lo:.3f}, {hi:.3f}], excludes 0")
    # nowhere else is a model named best: the data cannot separate them, with the leader's interval
    for name, text in summary.items():
        if name == f"linear_top1/{first_label}":
            continue
        assert compare[name]["best"] is None and " is best" not in text
        assert text.startswith(f"the data cannot separate {winner}, "), text
        assert f"{winner} − {runner} = " in text and "does not exclude 0" in text
    assert "(random: undefined)" in summary["mutual_knn/keywords"]
    cell = [r for r in parser.section_tables["summary"][0] if r[0].startswith(f"linear_top1/{first_label}")][0]
    assert 'class="best"' in page.split('id="summary"')[1].split("</table>")[0]
    assert cell[1].endswith(compare[f"linear_top1/{first_label}"]["small_sample"])  # 7 test images: flagged


def test_summary_inseparable_pair():
    """The leader and a model whose difference's interval straddles 0 are reported as inseparable, with that
    interval; a model both are separably ahead of is named as behind them (what the data do say)."""
    models = ["low", "b", "a"]
    values = {"low": 0.2, "b": 0.58, "a": 0.61}
    pairs = []
    for i, x in enumerate(models):
        for y in models[i + 1:]:
            d = values[x] - values[y]
            straddles = {x, y} == {"a", "b"}
            pairs.append({"a": x, "b": y, "diff": d, "ci95": [d - 0.05, d + 0.05] if straddles else [d - 0.01, d + 0.01],
                          "separable": not straddles})
    metric = {"higher_is_better": True, "best": None, "verdict": "the data cannot separate a, b", "n_groups": 40,
              "small_sample": None, "pairs": pairs,
              "per_model": {m: {"value": v, "ci95": [v - 0.1, v + 0.1], "n_items": 150, "reason": None}
                            for m, v in values.items()}}
    line = report_html.metric_summary("knn_top1/x", metric, models)
    d = 0.61 - 0.58  # a − b, flipped from the stored pair b − a
    assert line["best"] is None and line["few"] is None
    assert line["text"] == (f"the data cannot separate a, b: a − b = {d:.3f} [{d - 0.05:.3f}, {d + 0.05:.3f}], "
                            "an interval that does not exclude 0; each of them is separably ahead of low")
    for p in metric["pairs"]:  # b no longer separably ahead of low: low is not named as behind them both
        if {p["a"], p["b"]} == {"low", "b"}:
            p["ci95"], p["separable"] = [p["diff"] - 0.5, p["diff"] + 0.5], False
    assert report_html.metric_summary("knn_top1/x", metric, models)["text"].endswith("does not exclude 0")
    for p in metric["pairs"]:
        if {p["a"], p["b"]} == {"low", "b"}:
            p["ci95"], p["separable"] = [p["diff"] - 0.01, p["diff"] + 0.01], True
    metric["higher_is_better"] = False  # now `low` leads, separated from both: compare.json would name it
    metric["best"] = "low"
    line = report_html.metric_summary("knn_top1/x", metric, models)
    assert line["text"] == "low is best; its lead over b, -0.380 [-0.390, -0.370], excludes 0"


def test_summary_never_calls_an_interval_that_excludes_0_one_that_does_not():
    """compare.json's leader is the best point value; a percentile interval need not contain the point difference
    (e.g. Spearman: the point value is align's, the resamples draw pairs of resampled images), so the leader's
    difference to another model can have an interval wholly below 0. compare then names no best model and the
    summary must say that the resamples favour the other model, not that the interval "does not exclude 0".
    Without an interval (null ci95) it must not speak of one."""
    import numpy as np

    from dinoflow.evaluate.compare import summarise_metric

    rng = np.random.default_rng(0)
    models = ["a", "b"]
    stats = {"a": 0.28 + rng.normal(0, 0.002, 200), "b": 0.29 + rng.normal(0, 0.002, 200)}
    metric = summarise_metric(models, {"a": 0.30, "b": 0.29}, stats, {"a": 500, "b": 500}, {}, True, None)
    lo, hi = metric["pairs"][0]["ci95"]
    assert metric["best"] is None and hi < 0 < metric["pairs"][0]["diff"]  # point and resamples disagree
    text = report_html.metric_summary("spearman/caption", metric, models)["text"]
    assert "does not exclude 0" not in text
    assert text == (f"the data cannot separate a, b: a − b = {0.01:.3f} [{lo:.3f}, {hi:.3g}], an interval below 0 "
                    "although a has the better point value (the point values and the resamples disagree)")
    stats["a"] = np.full(200, np.nan)  # no finite resample of a: no interval for the difference
    metric = summarise_metric(models, {"a": 0.30, "b": 0.29}, stats, {"a": 500, "b": 500}, {}, True, None)
    assert metric["pairs"][0]["ci95"] is None
    text = report_html.metric_summary("spearman/caption", metric, models)["text"]
    assert text == ("the data cannot separate a, b: a − b = 0.010, without an interval (no resample gave a finite "
                    "difference)")


def test_summary_says_how_models_were_trained_and_flags_collapse(report):
    from html import escape

    ws, params, page, _, parser = report
    block = page.split('<section id="summary">')[1].split("</section>")[0]
    with chdir(ws):
        infos = {m: read_json(paths.model_info(m)) for m in model_names(params)}
    text = " ".join(parser.text)
    for m, info in infos.items():
        how = "untrained" if info["method"] == "none" else f"trained with {info['method']}"
        assert (f"{how}, init {info['init']} ({info['arch']}), trainable {info['trainable']}, evaluated network: "
                f"{info['evaluated_network'] or 'the backbone as initialised'}") in text
    assert infos["pretrained"]["stand_in_label"] in block  # the stand-in label next to the model
    assert "Read these models with care" in block
    flagged = [r for r in block.split("<li>") if "class=\"badge\"" in r]
    assert any(r.startswith("<b>scratch</b>") and "uniform collapse" in r and
               escape(infos["scratch"]["collapse"]["reason"]) in r for r in flagged)
    assert any(r.startswith("<b>random</b>") and "degenerate embeddings" in r for r in flagged)
    assert not any(r.startswith(("<b>ft_last1</b>", "<b>pretrained</b>")) for r in flagged)  # healthy ones


def test_small_samples_are_flagged_next_to_the_number(report):
    """The comparison and probe tables say when a number rests on fewer than MIN_IMAGES images / MIN_GROUPS
    groups (compare.json `small_sample`; probes: n_test, n_test_groups), and stay silent at the thresholds."""
    from report_fixtures import LARGE_METRIC

    from dinoflow.evaluate.sample_size import MIN_GROUPS, MIN_IMAGES

    ws, params, page, _, parser = report
    table, header = _table(parser, "comparison", 0)
    last = model_names(params)[-1]
    few = f"few images: 7 images (< {MIN_IMAGES}) in 5 groups (< {MIN_GROUPS}); read the number"
    first, second = params["collection"]["label_columns"][:2]
    assert few in table[last][1 + header.index(f"knn_top1/{first}") - 1]
    assert "few images" not in table[last][1 + header.index(LARGE_METRIC) - 1]
    # first label: 7 test images in 5 groups (flagged); second: exactly MIN_IMAGES in MIN_GROUPS (not flagged)
    cells = sorted([r[t[0].index("test images")] for r in t[1:]] for t in parser.section_tables["probes"])
    n = len(model_names(params))
    assert cells == [[str(MIN_IMAGES)] * n, [f"7{few} and its interval as rough"] * n]


def test_collection_counts_rows_per_status_and_points_to_the_docs(report):
    _, _, page, _, parser = report
    block = page.split('<section id="collection">')[1].split("</section>")[0]
    assert "<code>ok</code> 24, <code>missing_file</code> 1." in block
    assert "<code>docs/ingest.md</code>" in block


def test_probes_section_names_classes_without_test_images(tmp_path):
    """probes.json's classes_without_test_images becomes a sentence under the label's table; none: no sentence."""
    def entry(untested):
        return {"classes": ["a", "b", "c"], "n_test": 20, "n_test_groups": 20, "chance_top1": 0.5,
                "classes_without_test_images": untested,
                "knn": {"top1": 0.9, "top5": 1.0, "confusion": [[10, 0, 0], [1, 9, 0], [0, 0, 0]]},
                "linear": {"top1": 0.8, "top5": 1.0, "confusion": [[9, 1, 0], [1, 9, 0], [0, 0, 0]]}}
    sections = report_html.probes_section({"m1": {"shape": entry(["c"])}, "m2": {"shape": entry(["c"])}},
                                          tmp_path, None)
    assert sections[0]["untested"].startswith("class(es) c of shape have no test image")
    assert paths.GROUPS in sections[0]["untested"]
    sections = report_html.probes_section({"m1": {"shape": entry([])}}, tmp_path, None)
    assert "untested" not in sections[0]


def test_a_trained_model_that_barely_moved_gets_a_badge():
    """drift (info.json: median per-image cosine to the initial embeddings) >= UNMOVED_DRIFT: 'barely moved';
    below it, or without drift (untrained baselines), no badge."""
    def info(median):
        return {"collapse": {"verdict": "healthy", "reason": "no collapse sign"},
                "drift": None if median is None else {"median_cosine": median, "ci95": [median, median]}}

    assert [b["text"] for b in report_html.model_badges(info(0.9995), None)] == ["barely moved"]
    assert "0.9995" in report_html.model_badges(info(0.9995), None)[0]["title"]
    assert report_html.model_badges(info(report_html.UNMOVED_DRIFT - 1e-4), None) == []
    assert report_html.model_badges(info(None), None) == []
    assert report_html.model_badges(None, None) == []

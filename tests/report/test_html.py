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
        self.tables: dict[str, list[list[str]]] = {}
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.section = attrs.get("id")
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


def _comparison(parser) -> dict[str, list[str]]:
    rows = parser.tables["comparison"]
    return {r[0]: r[1:] for r in rows[1:]}, rows[0][1:]


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
    assert sorted(metrics) == sorted(model_names(params))
    with chdir(ws):
        for m in model_names(params):
            align = read_json(paths.align_metrics(m))["fields"]
            probes = read_json(paths.probe_metrics(m))["columns"]
            assert metrics[m]["align.caption.spearman"] == align["caption"]["spearman"]
            assert metrics[m]["align.keywords.ci_high"] == align["keywords"]["ci_high"]
            assert metrics[m]["align.keywords.mantel_p"] == align["keywords"]["mantel_p"]
            assert metrics[m]["probes.color.linear.top5"] == probes["color"]["linear"]["top5"]
            assert metrics[m]["probes.shape.knn.top1"] == probes["shape"]["knn"]["top1"]
            assert not any("confusion" in k for k in metrics[m])
            json.dumps(metrics)  # plain JSON numbers only


def test_collection_models_and_probes_sections(report):
    ws, params, page, _, parser = report
    coll = {r[0]: r[1] for r in parser.tables["collection"] if len(r) == 2}
    assert coll["input rows"] == "25" and coll["ok images"] == "24" and coll["skipped rows"] == "1"
    assert coll["ok images with a caption"] == "20"  # every 6th row of the tiny collection has no text
    skipped = [r for r in parser.tables["collection"] if r and r[0] == "missing_file"]
    assert skipped and skipped[0][1] == "1" and "gone" in skipped[0][2]
    with chdir(ws):
        info = read_json(paths.model_info("pretrained"))
    assert info["stand_in"] and info["stand_in_label"] in "".join(parser.text)
    models_rows = {r[0]: r for r in parser.tables["models"][1:]}
    assert info["stand_in_label"] in models_rows["pretrained"][-2]
    assert models_rows["random"][-2] == ""
    assert models_rows["pretrained"][-1] == info["params_hash"]
    # best model by linear top-1 on each label: the fixture gives the last model the highest
    best = model_names(params)[-1]
    assert page.count(f"Confusion matrix of the best model, <b>{best}</b>") == len(params["collection"]["label_columns"])
    assert "not run" not in page.split('id="grids"')[1]  # grids and attention present
    assert ws.joinpath("reports/figures/report/lr_search_trials.png").exists()
    assert "<code>lr = 0.0010</code>" in page and "<code>objective = 3.7000</code>" in page


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
    assert metrics["random"] == {} and "align.caption.spearman" in metrics["scratch"]


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

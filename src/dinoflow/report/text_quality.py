"""The report's "text the text model cannot see" block (text section), from `metrics/text.json` `quality`.

One row per way of losing text (unknown tokens, mostly / all unknown texts, truncation at `max_seq_length`,
texts empty after tokenisation, distinct texts collapsing onto one embedding), one column per text field, each
count with its share of the field's texts; the field's warning (written by `dinoflow embed-text`) and a few
example texts under it. Counts are over every text of the field (a census), so they carry no interval.
`text_quality_block(path)` returns escaped HTML (`markupsafe.Markup`) that the page template inserts as is;
every collection text in it goes through Jinja2's autoescaping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from markupsafe import Markup

from dinoflow.utils import read_json

BLOCK = """<h3>Text the text model cannot see</h3>
<p class="muted">Text model {{ model }}: how much of each field it loses, counted over every text of the field.
Choose another with the <code>text.model</code> parameter in params.yaml.</p>
<table><tr><th>loss</th>{% for f in fields %}<th>{{ f }}</th>{% endfor %}</tr>
{% for label, cells in rows %}<tr><td>{{ label }}</td>{% for c in cells %}<td class="num">{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for f, q in warned %}<p class="notrun"><strong>{{ f }}:</strong> {{ q.warning }}</p>
{% for kind, examples in q.examples.items() if examples %}<div class="muted">{{ kind|replace("_", " ") }}:
{% for e in examples %}<code>{{ e.id }}</code> “{{ e.text }}”{% if not loop.last %}; {% endif %}{% endfor %}</div>
{% endfor %}{% endfor %}"""


NOT_MEASURED = """<h3>Text the text model cannot see</h3>
<p class="notrun">not measured: {{ path }} has no text quality counts (written by an older dinoflow); re-run
<code>dinoflow embed-text</code></p>"""


def _count(n: int | None, total: int | None) -> str:
    if n is None:
        return "–"
    return f"{n} ({n / total:.1%})" if total else str(n)


def text_quality_rows(quality: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per field) rows of the block, from `metrics/text.json` `quality`."""
    qs = list(quality.values())
    unk = next((q["unknown_token"] for q in qs if q.get("unknown_token")), "unknown token")
    max_len = "/".join(sorted({str(q["max_seq_length"]) for q in qs}))

    def per_text(key: str) -> list[str]:
        return [_count(q[key], q["n_texts"]) for q in qs]

    return [
        ("texts", [str(q["n_texts"]) for q in qs]),
        (f"tokens that are {unk}", [_count(q["n_unknown_tokens"], q["n_tokens"]) for q in qs]),
        (f"texts mostly {unk} (≥ {qs[0]['mostly_unknown_threshold']:.0%} of their tokens)",
         per_text("n_texts_mostly_unknown")),
        (f"texts all {unk}", per_text("n_texts_all_unknown")),
        (f"texts truncated at max_seq_length {max_len}", per_text("n_texts_truncated")),
        ("texts empty after tokenisation", per_text("n_texts_empty")),
        ("texts collapsed onto another text's embedding", per_text("n_texts_collapsed")),
        ("distinct texts → distinct embeddings", [f"{q['n_distinct_texts']} → {q['n_distinct_embeddings']}"
                                                  for q in qs]),
    ]


def text_quality_block(path: str | Path) -> Markup:
    """The escaped HTML block for the report; empty when `path` does not exist (the text section then says that
    embed-text did not run), a "not measured" note when it holds no `quality` object (an older output)."""
    import jinja2

    path = Path(path)
    if not path.exists():
        return Markup("")
    data = read_json(path)
    quality = data.get("quality") if isinstance(data, Mapping) else None
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    if not isinstance(quality, Mapping) or not quality:
        return Markup(env.from_string(NOT_MEASURED).render(path=str(path)))
    html = env.from_string(BLOCK).render(
        model=data.get("text_model", "?"), fields=list(quality), rows=text_quality_rows(quality),
        warned=[(f, q) for f, q in quality.items() if q.get("warning")])
    return Markup(html)

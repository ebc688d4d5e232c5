"""The Jinja2 template of reports/index.html (kept in a module so it ships with the package).

Autoescaping is on (see `html.render`): every value from the collection or the metrics files is escaped.
Images are `data:` URIs only; the Content-Security-Policy forbids any request and any script, so a page that
somehow carried collection text as markup still could not run it or fetch anything.
"""

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; line-height: 1.45; }
header { background: #243447; color: #fff; padding: 1.2em 2em; }
header h1 { margin: 0 0 .2em 0; font-size: 1.6em; }
nav a { color: #cfe3ff; margin-right: 1em; text-decoration: none; font-size: .95em; }
main { padding: 1em 2em 3em 2em; max-width: 1500px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: .6em 1.4em 1.2em 1.4em;
          margin: 1.2em 0; }
h2 { border-bottom: 2px solid #243447; padding-bottom: .2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #d6d6d6; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: bold; background: #eaf6ea; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; border: 1px solid #eee; }
.notrun { color: #7a4b00; background: #fff6e0; border-left: 4px solid #e0a000; padding: .4em .8em; margin: .5em 0; }
.standin { color: #8a1010; background: #fdecec; border: 1px solid #e6a0a0; border-radius: 4px; padding: .1em .4em;
           font-weight: bold; }
.muted { color: #666; font-size: .9em; }
.badge { color: #fff; background: #c62828; border-radius: 4px; padding: .05em .4em; font-size: .8em;
         font-weight: bold; white-space: nowrap; margin-left: .3em; }
.ok { color: #1b5e20; }
.few { color: #7a4b00; font-size: .85em; white-space: normal; }
td.sep { font-weight: bold; background: #eaf6ea; }
.scroll { overflow-x: auto; }
.caption { font-style: italic; }
code { background: #f2f2f2; padding: 0 .25em; border-radius: 3px; }
header code { background: #3b5169; color: #fff; }
</style>
</head>
<body>
<header>
<h1>{{ title }}</h1>
<div>collection <b>{{ collection_name }}</b> · {{ models|length }} model(s)</div>
<nav>
<a href="#summary">summary</a><a href="#models">models</a><a href="#health">health</a><a href="#collection">collection</a><a href="#training">training</a>
<a href="#comparison">comparison</a><a href="#alignment">alignment</a><a href="#probes">probes</a>
<a href="#grids">retrieval grids</a><a href="#attention">attention maps</a>{% if not_run %}<a href="#notrun">not run</a>{% endif %}
</nav>
</header>
<main>
{% macro notrun(reason) %}<div class="notrun">not run: {{ reason }}</div>{% endmacro %}
{% macro few(note) %}{% if note %}<br><span class="few" title="{{ note }}">{{ note }}</span>{% endif %}{% endmacro %}

<section id="summary">
<h2>Summary: which representation finds similar images best</h2>
{% if summary.verdicts %}
<table>
<tr><th>metric</th><th>answer</th></tr>
{% for v in summary.verdicts %}<tr><td><code>{{ v.metric }}</code> <span class="muted">({{ v.direction }})</span></td><td{% if v.best %} class="best"{% endif %}>{{ v.text }}{{ few(v.few) }}</td></tr>
{% endfor %}
</table>
<p class="muted">As decided by the comparison ({{ summary.resampling }}; 95% intervals): a model is named best only
where its interval of difference to every other model excludes 0. Every metric, top-5 included, and every pair:
<a href="#comparison">comparison</a>.</p>
{% else %}{{ notrun(summary.reason or "the comparison has no headline metric") }}{% endif %}
<h3>What is evaluated</h3>
<ul>{% for m in summary.models %}<li><b>{{ m.name }}</b>: {{ m.text }}{% if m.stand_in %} <span class="standin">{{ m.stand_in }}</span>{% endif %}</li>
{% endfor %}</ul>
{% if summary.flags %}<h3>Read these models with care</h3>
<ul>{% for f in summary.flags %}<li><b>{{ f.model }}</b>: <span class="badge">{{ f.text }}</span> {{ f.title }}</li>
{% endfor %}</ul>
{% else %}<p class="ok">No model collapsed in training or has degenerate embeddings.</p>{% endif %}
</section>

<section id="models">
<h2>Models and their weights</h2>
{% if any_stand_in %}<p class="standin">Some models use stand-in weights: read their rows with the label below in mind.</p>{% endif %}
<table>
<tr><th>model</th><th>architecture</th><th>init</th><th>LayerScale init</th><th>method</th><th>evaluated network</th><th>trainable</th><th>trainable parameters</th><th>weights</th><th>note</th><th>params hash</th></tr>
{% for m in models %}
<tr><td><b>{{ m.name }}</b>{% for b in m.badges %}<span class="badge" title="{{ b.title }}">{{ b.text }}</span>{% endfor %}</td>
{% if m.info %}
<td>{{ m.info.arch }}</td><td>{{ m.info.init }}</td><td class="num">{{ m.info.init_values if m.info.init_values is not none else "–" }}</td>
<td>{{ m.info.method }}</td><td>{{ m.info.evaluated_network or "– (untrained)" }}</td><td>{{ m.info.trainable }}</td>
<td class="num">{{ "{:,}".format(m.info.trainable_params) }} of {{ "{:,}".format(m.info.total_params) }} ({{ "%.1f"|format(100 * m.info.trainable_share) }}%)</td>
<td>{{ m.info.weights_source }}</td>
<td>{% if m.info.stand_in %}<span class="standin">{{ m.info.stand_in_label or "stand-in" }}</span>{% endif %}</td>
<td><code>{{ m.info.params_hash }}</code></td>
{% else %}
<td colspan="10">{{ notrun(m.reason) }}</td>
{% endif %}
</tr>
{% endfor %}
</table>
</section>

<section id="health">
<h2>Embedding health, collapse and drift</h2>
<p>Similarity used by the neighbours, the retrieval grids and the health numbers below:
<b>{{ similarity or "unknown (no metrics/health file)" }}</b>. FAISS (above <code>neighbours.exact_max_n</code>
images) works in float32: its rows are centred and normalised in float64 first.</p>
<p class="muted">Raw cosine: cosine of the embeddings as the model outputs them, median [1st, 99th percentile] over
sampled image pairs (float64). When every pair is within float32 rounding of 1, float32 cosine rankings would be
noise: the embeddings are flagged degenerate. RankMe: effective rank of the raw embeddings (Garrido et al. 2023).
Collapse: the training's own verdict (teacher entropy, KL, std). Drift: median cosine between each image's embedding
now and under the initial weights, with its 95% interval.</p>
<div class="scroll"><table>
<tr><th>model</th><th>method</th><th>images</th><th>dim</th><th>raw cosine</th><th>used similarity</th><th>RankMe</th><th>embeddings</th><th>training collapse</th><th>drift from initial weights</th></tr>
{% for h in health %}
<tr><td><b>{{ h.name }}</b>{% for b in h.badges %}<span class="badge" title="{{ b.title }}">{{ b.text }}</span>{% endfor %}</td><td>{{ h.method }}</td>
{% if h.similarity %}
<td class="num">{{ h.n }}</td><td class="num">{{ h.dim }}</td><td class="num">{{ h.raw }}</td><td class="num">{{ h.used }}</td><td class="num">{{ h.rankme }}</td>
<td>{% if h.degenerate %}<span class="badge">degenerate</span> {{ h.reason }}{% else %}<span class="ok">healthy</span>{% endif %}</td>
{% else %}<td colspan="6">{{ notrun("no metrics/health file for " ~ h.name) }}</td>{% endif %}
<td>{% if h.collapse %}{% if h.collapse[0] != "healthy" %}<span class="badge">{{ h.collapse[0] }}</span>{% else %}<span class="ok">healthy</span>{% endif %} {{ h.collapse[1] }}{% else %}– (untrained){% endif %}</td>
<td>{{ h.drift or "– (untrained)" }}</td></tr>
{% endfor %}
</table></div>
</section>

<section id="collection">
<h2>The collection</h2>
{% if collection.ok %}
<table>
<tr><th>input rows</th><td class="num">{{ collection.n_rows }}</td></tr>
<tr><th>ok images</th><td class="num">{{ collection.n_ok }}</td></tr>
<tr><th>skipped rows</th><td class="num">{{ collection.n_skipped }}</td></tr>
<tr><th>ok images with a caption</th><td class="num">{{ collection.n_caption }}</td></tr>
<tr><th>ok images with keywords</th><td class="num">{{ collection.n_keywords }}</td></tr>
{% for col, n in collection.label_classes %}<tr><th>classes of label <code>{{ col }}</code></th><td class="num">{{ n }}</td></tr>{% endfor %}
{% if groups %}
<tr><th>near-duplicate groups (2+ images)</th><td class="num">{{ groups.n_near_duplicate_groups }}</td></tr>
<tr><th>images in near-duplicate groups</th><td class="num">{{ groups.n_images_in_near_duplicate_groups }}</td></tr>
<tr><th>groups kept on one side of every train/test split</th><td class="num">{{ groups.n_groups }}</td></tr>
{% endif %}
</table>
{% if groups %}<p class="muted">Groups: {% if groups.source == "group_column" %}the collection's column <code>{{ groups.column }}</code>{% else %}{{ groups.hash }} perceptual hashes within Hamming distance {{ groups.max_distance }}{% endif %}, over {{ groups.n_images }} images.</p>
{% else %}{{ notrun("near-duplicate groups: " ~ groups_reason) }}{% endif %}
<h3>Skipped rows by reason</h3>
<p class="muted">Rows per manifest status (<code>status</code> column of <code>data/interim/manifest.parquet</code>;
only <code>ok</code> rows are used): {% for st, n in collection.by_status %}<code>{{ st }}</code> {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}.
What each status means and what to do about it: <code>docs/ingest.md</code> in the dinoflow repository.</p>
{% if collection.skipped %}
<table><tr><th>reason</th><th>rows</th><th>examples (input row, id: detail)</th></tr>
{% for s in collection.skipped %}
<tr><td><code>{{ s.status }}</code></td><td class="num">{{ s.count }}</td>
<td>{% for e in s.examples %}<div>row {{ e.row }}, {{ e.id }}: {{ e.detail }}</div>{% endfor %}</td></tr>
{% endfor %}</table>
{% else %}<p>No row was skipped.</p>{% endif %}
{% if collection.notes %}<h3>Conversions applied</h3>
<table><tr><th>note</th><th>rows</th></tr>{% for n, c in collection.notes %}<tr><td>{{ n }}</td><td class="num">{{ c }}</td></tr>{% endfor %}</table>{% endif %}
{% else %}{{ notrun(collection.reason) }}{% endif %}
{% if text_counts %}<h3>Text embeddings</h3>
<table><tr><th>quantity</th><th>value</th></tr>{% for k, v in text_counts %}<tr><td>{{ k }}</td><td class="num">{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{{ text_quality }}
</section>

<section id="training">
<h2>Training</h2>
<h3>Training curves per method</h3>
{% if method_curves.img %}<img src="{{ method_curves.img }}" alt="loss and its components per trained model">
{% else %}{{ notrun(method_curves.reason) }}{% endif %}
{% for t in training %}
<h3>{{ t.model }}{% if t.method %} ({{ t.method }}){% endif %}</h3>
{% if t.img %}<img src="{{ t.img }}" alt="training curves of {{ t.model }}">
{% if t.final %}<table><tr><th>metric</th><th>last value</th></tr>{% for k, v in t.final %}<tr><td>{{ k }}</td><td class="num">{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% else %}{{ notrun(t.reason) }}{% endif %}
{% endfor %}
{% if not training %}<p class="muted">No model of the list trains.</p>{% endif %}
{% if untrained %}<p class="muted">Not trained (weights used as initialised or loaded): {{ untrained|join(", ") }}.</p>{% endif %}
<h3>Fine-tunes: head and backbone</h3>
{% if finetune.img %}<img src="{{ finetune.img }}" alt="fine-tune curves">{% else %}{{ notrun(finetune.reason) }}{% endif %}
<h3>Learning-rate search</h3>
{% if lr_search.ok %}
{% if lr_search.best %}<p>best: {% for k, v in lr_search.best %}<code>{{ k }} = {{ v }}</code> {% endfor %}</p>{% endif %}
{% if lr_search.note %}<p class="few">{{ lr_search.note }}</p>{% endif %}
{% for img in lr_search.imgs %}<img src="{{ img.src }}" alt="{{ img.alt }}">{% endfor %}
{% if lr_search.columns %}<table><tr>{% for c in lr_search.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in lr_search.rows %}<tr>{% for v in row %}<td class="num">{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% else %}{{ notrun(lr_search.reason) }}{% endif %}
</section>

<section id="comparison">
<h2>Which model is best: every model on every metric</h2>
{% if compare.ok %}
<p class="muted">Value [95% interval] per model ({{ compare.resampling }}). The best model of a metric is named only
where its interval of difference to every other model excludes 0; otherwise the data cannot separate them.
Red badges: training collapsed or embeddings degenerate (see <a href="#health">health</a>).</p>
<div class="scroll"><table>
<tr><th>model</th><th>method</th>{% for n in compare.metrics %}<th title="{{ compare.direction[n] }}">{{ n }}</th>{% endfor %}</tr>
{% for row in compare.rows %}<tr><th>{{ row.name }}{% for b in row.badges %}<span class="badge" title="{{ b.title }}">{{ b.text }}</span>{% endfor %}</th><td>{{ row.method }}</td>
{% for c in row.cells %}<td class="num{% if c.best %} best{% endif %}"{% if c.note %} title="{{ c.note }}"{% endif %}>{{ c.text }}{% if c.note %}<br><span class="muted">{{ c.note }}</span>{% endif %}{{ few(c.few) }}</td>{% endfor %}</tr>
{% endfor %}
<tr><th>best</th><td></td>{% for b in compare.best %}<td{% if b.separated %} class="best"{% endif %}>{{ b.text }}</td>{% endfor %}</tr>
</table></div>
<h3>Paired differences</h3>
<p class="muted">a − b on the same images, [95% interval]; bold where the interval excludes 0. Pairs with the
baselines (random, pretrained) first.</p>
<div class="scroll"><table id="pairs">
<tr><th>a − b</th>{% for n in compare.metrics %}<th>{{ n }}</th>{% endfor %}</tr>
{% for p in compare.pairs %}<tr><th>{{ p.a }} − {{ p.b }}</th>{% for c in p.cells %}<td class="num{% if c.separable %} sep{% endif %}">{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}
</table></div>
<h3>Verdicts</h3>
<ul>{% for n, v in compare.verdicts %}<li><code>{{ n }}</code>: {{ v }}</li>{% endfor %}</ul>
{% else %}{{ notrun(compare.reason) }}{% endif %}
<h3>Details: every alignment and probe number</h3>
<p class="muted">Point estimates as the stages wrote them. Spearman: rank correlation between image and text cosine
similarity over image pairs, with its 95% confidence interval where it was estimated from sampled pairs (exact
values have none). Mantel p: permutation p-value.</p>
{% if comparison.rows %}
<div class="scroll"><table><tr><th>metric</th>{% for m in comparison.models %}<th>{{ m.name }}{% if m.stand_in %}<br><span class="standin" title="{{ m.stand_in_label }}">stand-in</span>{% endif %}</th>{% endfor %}</tr>
{% for row in comparison.rows %}<tr><th>{{ row.label }}</th>{% for cell in row.cells %}<td class="num">{{ cell.text }}</td>{% endfor %}</tr>{% endfor %}
</table></div>
{% else %}{{ notrun(comparison.reason) }}{% endif %}
</section>

<section id="alignment">
<h2>Image–text alignment</h2>
{% for a in alignment %}<h3>{{ a.field }}</h3><img src="{{ a.img }}" alt="Spearman for {{ a.field }}">{% endfor %}
{% for reason in alignment_not_run %}{{ notrun(reason) }}{% endfor %}
</section>

<section id="probes">
<h2>Probes</h2>
{% if probes.ok %}
{% for p in probes.labels %}
<h3>label <code>{{ p.label }}</code></h3>
<table><tr><th>model</th>{% for c in p.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in p.rows %}<tr><td>{{ row.model }}</td>{% for cell in row.cells %}<td class="num{% if cell.best %} best{% endif %}">{{ cell.text }}{{ few(cell.few) }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% if p.untested %}<p class="few">{{ p.untested }}</p>{% endif %}
{% if p.confusion %}<p>Confusion matrix of <b>{{ p.best_model }}</b> ({{ p.best_by }}):</p>
<img src="{{ p.confusion }}" alt="confusion matrix of {{ p.best_model }} on {{ p.label }}">
{% elif p.confusion_reason %}{{ notrun(p.confusion_reason) }}{% endif %}
{% endfor %}
{% endif %}
{% for reason in probes.not_run %}{{ notrun(reason) }}{% endfor %}
</section>

<section id="grids">
<h2>Retrieval grids</h2>
{% if grids.figures %}
<p class="muted">One row per model: the query (red frame), then its nearest neighbours by the used similarity
(s = {{ similarity or "cosine" }}) with their scores (4 significant digits; 1 − s near 1) and captions.</p>
{% for g in grids.figures %}<h3>query <code>{{ g.id }}</code></h3><p class="caption">{{ g.caption }}</p>
<img src="{{ g.img }}" alt="neighbours of {{ g.id }}">{% endfor %}
{% else %}{{ notrun(grids.reason) }}{% endif %}
</section>

<section id="attention">
<h2>Attention maps</h2>
{% if attention.figures %}
<p class="muted">ViT rows: last-layer CLS-to-patch attention of each head and their mean, upsampled and overlaid.
CNN rows have no attention: they show the L2 norm of the last feature map (saliency), labelled as such.</p>
{% for g in attention.figures %}<h3>image <code>{{ g.id }}</code></h3><p class="caption">{{ g.caption }}</p>
<img src="{{ g.img }}" alt="attention maps of {{ g.id }}">{% endfor %}
{% else %}{{ notrun(attention.reason) }}{% endif %}
</section>

{% if not_run %}
<section id="notrun">
<h2>Not run</h2>
<table><tr><th>part</th><th>reason</th></tr>{% for part, reason in not_run %}<tr><td>{{ part }}</td><td>{{ reason }}</td></tr>{% endfor %}</table>
</section>
{% endif %}
</main>
</body>
</html>
"""

"""`python -m dinoflow.report.summary [reports/metrics.json]`: the README's results tables, in Markdown.

Reads only what `dinoflow report` wrote to reports/metrics.json (values are copied, never recomputed), so a README
table regenerated with this command claims exactly what the report shows: per model the training facts, the
embedding health and collapse verdict, the drift from the initial weights, and each headline metric as
"value [95% interval]"; per metric the best model where the report names one (its lead over every other model has
an interval of difference that excludes 0), otherwise "cannot separate".
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.utils import read_json


def _interval(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a" + (f" ({entry['reason']})" if entry and entry.get("reason") else "")
    if entry.get("ci95") is None:  # no resample gave a finite value (compare.percentile_interval)
        return f"{entry['value']:.3f}"
    lo, hi = entry["ci95"]
    return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def models_table(models: Mapping[str, Any]) -> list[str]:
    """Rows: model, method, init, trainable share, evaluated network, RankMe, degenerate, collapse verdict,
    drift (median per-image cosine to the initial embeddings [95% interval])."""
    rows = ["| model | method | init | trainable | evaluated | RankMe | degenerate | collapse verdict | drift (median cos to initial) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        t = m.get("training") or {}
        h = m.get("health") or {}
        d = m.get("drift")
        share = t.get("trainable_share")
        label = f"{name} (stand-in)" if t.get("stand_in") else name
        rows.append("| " + " | ".join([
            label, str(t.get("method")), str(t.get("init")),
            "-" if share is None else f"{share:.0%} of {t.get('total_params', 0) / 1e6:.2f} M",
            str(t.get("evaluated_network") or "-"),
            "-" if h.get("rankme") is None else f"{h['rankme']:.1f}",
            "-" if not h else ("yes: " + str(h.get("reason")) if h.get("degenerate") else "no"),
            str(m.get("collapse_verdict") or "-"),
            "-" if not d else f"{d['median_cosine']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]",
        ]) + " |")
    return rows


def metrics_table(data: Mapping[str, Any], metric_names: Sequence[str] | None = None) -> list[str]:
    """Rows: metric, then one "value [95% CI]" cell per model, then the best model or "cannot separate"."""
    summary = data.get("metrics")
    if not summary:
        raise DinoflowError("reports/metrics.json has no compared metrics (run `dinoflow compare` and `dinoflow report`)")
    models = list(data["models"])
    names = list(metric_names or summary)
    rows = ["| metric | " + " | ".join(models) + " | best |", "|---" * (len(models) + 2) + "|"]
    for name in names:
        cells = [_interval(data["models"][m]["metrics"].get(name)) for m in models]
        best = summary[name]["best"]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {best if best else 'cannot separate'} |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    path = Path((argv or sys.argv[1:] or [paths.REPORT_METRICS])[0])
    if not path.exists():
        raise SystemExit(f"{path}: not found (run `make demo` or `dinoflow report` first)")
    data = read_json(path)
    res = data.get("resampling") or {}
    print("\n".join(models_table(data["models"])))
    print()
    print("\n".join(metrics_table(data)))
    print()
    print(f"Intervals: 95%, {res.get('method')} ({res.get('n_resamples')} resamples, seed {res.get('seed')}).")


if __name__ == "__main__":
    main()

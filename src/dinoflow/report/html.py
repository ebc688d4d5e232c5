"""`dinoflow report`: reports/index.html (one self-contained page) and reports/metrics.json.

Everything shown is read from the stage outputs (manifest, dvclive logs, metrics JSON, figures); a missing
optional input becomes a "not run: <reason>" note instead of an error. The files of the evidence contracts are
read strictly: metrics/compare.json (contract 4: values with 95% intervals, paired differences, the best model
only where the data separate it), metrics/groups.json (contract 1), metrics/health/<model>.json (contract 3) and
the contract-2 keys of models/<name>/info.json (how each model was trained, collapse verdict, drift); a present
file that lacks a key its contract requires is a DinoflowError naming the file and the key.
The page has no script and makes no
request: CSS is inline, images are base64 `data:` URIs, and a Content-Security-Policy forbids anything else.
All text is escaped by Jinja2's autoescaping, including everything that comes from the collection.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from dinoflow import paths
from dinoflow.config import model_config, model_names
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.sample_size import small_sample_note
from dinoflow.report import figures as F
from dinoflow.report.grids import GRID_QUERIES, caption_of, read_model_info
from dinoflow.report.text_quality import text_quality_block
from dinoflow.utils import get_logger, read_json, write_json

log = get_logger(__name__)

REPORT_FIGURES_DIR = paths.REPORT_FIGURES_DIR  # figures drawn by this stage (also inlined in the page)
TEXT_METRICS = paths.TEXT_METRICS  # written by `dinoflow embed-text`
ATTENTION_QUERIES = f"{paths.ATTENTION_DIR}/queries.json"

# Alignment numbers shown in the comparison table (every number goes to reports/metrics.json).
ALIGN_KEYS = {"spearman": "Spearman [95% CI]", "mantel_p": "Mantel p", "mean_query_spearman": "mean per-query Spearman",
              "mutual_knn": "mutual kNN", "n_items": "images with this text"}
PROBE_SCORES = ("top1", "top5")


# ------------------------------------------------------------------------------------------------ formatting
def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def file_data_uri(path: str | Path) -> str:
    path = Path(path)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
            ".svg": "image/svg+xml"}.get(path.suffix.lower())
    if mime is None:
        raise DinoflowError(f"{path}: cannot inline a {path.suffix or 'suffix-less'} file as an image")
    return data_uri(path.read_bytes(), mime)


def figure_uri(fig, save_as: str | Path | None = None) -> str:
    """Inline a figure (and keep a copy on disk for `snakemake --report` / `dvc plots`)."""
    png = F.figure_to_png(fig)
    if save_as is not None:
        Path(save_as).parent.mkdir(parents=True, exist_ok=True)
        Path(save_as).write_bytes(png)
    return data_uri(png)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any, digits: int = 3) -> str:
    """Numbers as the page shows them: integers as is, p-values and small numbers in 3 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not is_number(v):
        return str(v)
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 1000):
        return str(int(v))
    if math.isnan(v):
        return "nan"
    if v != 0 and abs(v) < 10 ** -(digits - 1):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Numeric leaves of nested dicts as {"a.b.c": value} (lists, strings and booleans left out)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif is_number(obj) and not (isinstance(obj, float) and math.isnan(obj)):
        out[prefix] = obj
    return out


def _read_object(path: Path) -> dict[str, Any]:
    """A metrics JSON file that must hold an object."""
    import json

    try:
        data = read_json(path)
    except json.JSONDecodeError as exc:
        raise DinoflowError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from exc
    if not isinstance(data, Mapping):
        raise DinoflowError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "x"


# ------------------------------------------------------------------------------------- contract files (strict)
CONTRACT_INFO = "contract 2: written by `dinoflow train`"
CONTRACT_HEALTH = "contract 3: written by `dinoflow neighbours`"
CONTRACT_COMPARE = "contract 4: written by the compare stage"
CONTRACT_GROUPS = "contract 1: written by the groups stage"
INFO_KEYS = ("init_values", "evaluated_network", "trainable_params", "total_params", "trainable_share", "collapse",
             "drift")
COLLAPSE_KEYS = ("verdict", "reason", "teacher_entropy", "log_k", "student_teacher_kl", "teacher_std", "rankme",
                 "embed_dim")
DRIFT_KEYS = ("median_cosine", "ci95", "n_images", "reference")
HEALTH_KEYS = ("model", "n", "dim", "cosine_raw", "cosine_used", "rankme", "degenerate", "reason", "similarity")
COSINE_KEYS = ("median", "p01", "p99", "std")
GROUPS_KEYS = ("source", "column", "hash", "max_distance", "n_images", "n_groups", "n_near_duplicate_groups",
               "n_images_in_near_duplicate_groups")
RESAMPLING_KEYS = ("method", "n_resamples", "seed", "level")
METRIC_KEYS = ("higher_is_better", "per_model", "pairs", "best", "verdict", "n_groups", "small_sample")
PER_MODEL_KEYS = ("value", "ci95", "n_items", "reason")
PAIR_KEYS = ("a", "b", "diff", "ci95", "separable")
BASELINES = ("random", "pretrained")  # every model is compared against these first
COLLAPSE_LABELS = {"healthy": "healthy", "uniform_collapse": "uniform collapse", "one_hot_collapse": "one-hot collapse",
                   "dimensional_collapse": "dimensional collapse"}


def require(obj: Any, keys: Sequence[str], path: str | Path, where: str, contract: str) -> Mapping[str, Any]:
    """`obj` as a mapping holding every key of `keys`; else a DinoflowError naming the file, the place in it
    (`where`, e.g. "metrics.knn_top1/group.per_model.random") and the contract."""
    place = where or "the top level"
    if not isinstance(obj, Mapping):
        raise DinoflowError(f"{path}: {place} must be a JSON object, found {type(obj).__name__} ({contract})")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DinoflowError(f"{path}: {place} lacks key(s) {', '.join(missing)} ({contract}; re-run that stage)")
    return obj


def read_info(model: str) -> dict[str, Any] | None:
    """models/<model>/info.json with the contract-2 keys checked (collapse and drift: null or complete);
    None when the file does not exist (the model is not trained yet)."""
    info = read_model_info(model)
    if info is None:
        return None
    path = paths.model_info(model)
    require(info, INFO_KEYS, path, "", CONTRACT_INFO)
    if info["collapse"] is not None:
        require(info["collapse"], COLLAPSE_KEYS, path, "collapse", CONTRACT_INFO)
        if info["collapse"]["verdict"] not in COLLAPSE_LABELS:
            raise DinoflowError(f"{path}: collapse.verdict {info['collapse']['verdict']!r} is not one of "
                                f"{', '.join(COLLAPSE_LABELS)} ({CONTRACT_INFO})")
    if info["drift"] is not None:
        require(info["drift"], DRIFT_KEYS, path, "drift", CONTRACT_INFO)
    return info


def read_health(models: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{model: metrics/health/<model>.json (contract 3, checked)} and "not run" reasons for missing files."""
    out, reasons = {}, []
    for m in models:
        path = Path(paths.health_metrics(m))
        if not path.exists():
            reasons.append(f"embedding health of {m}: {path} not found (run `dinoflow neighbours --model {m}`)")
            continue
        data = require(_read_object(path), HEALTH_KEYS, path, "", CONTRACT_HEALTH)
        for key in ("cosine_raw", "cosine_used"):
            require(data[key], COSINE_KEYS, path, key, CONTRACT_HEALTH)
        out[m] = dict(data)
    return out, reasons


def read_groups() -> tuple[dict[str, Any] | None, str | None]:
    """(metrics/groups.json checked against contract 1, None) or (None, why it is not there)."""
    path = Path(paths.GROUPS_SUMMARY)
    if not path.exists():
        return None, f"{path} not found (run the groups stage)"
    return dict(require(_read_object(path), GROUPS_KEYS, path, "", CONTRACT_GROUPS)), None


def read_compare(models: Sequence[str]) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics/compare.json checked against contract 4, None) or (None, why it is not there). Every model of
    params `models` must have an entry per metric; pairs and `best` may only name those models."""
    path = Path(paths.COMPARE_METRICS)
    if not path.exists():
        return None, f"{path} not found (run the compare stage)"
    data = require(_read_object(path), ("resampling", "metrics"), path, "", CONTRACT_COMPARE)
    require(data["resampling"], RESAMPLING_KEYS, path, "resampling", CONTRACT_COMPARE)
    if not isinstance(data["metrics"], Mapping):
        raise DinoflowError(f"{path}: metrics must be a JSON object ({CONTRACT_COMPARE})")
    known = set(models)
    for name, metric in data["metrics"].items():
        where = f"metrics.{name}"
        require(metric, METRIC_KEYS, path, where, CONTRACT_COMPARE)
        require(metric["per_model"], models, path, f"{where}.per_model", CONTRACT_COMPARE)
        for m in models:
            require(metric["per_model"][m], PER_MODEL_KEYS, path, f"{where}.per_model.{m}", CONTRACT_COMPARE)
        if not isinstance(metric["pairs"], list):
            raise DinoflowError(f"{path}: {where}.pairs must be a list ({CONTRACT_COMPARE})")
        for m in models:
            v = metric["per_model"][m]["value"]
            if v is not None and not is_number(v):
                raise DinoflowError(f"{path}: {where}.per_model.{m}.value must be a number or null, found {v!r} "
                                    f"({CONTRACT_COMPARE})")
        have = [m for m in models if metric["per_model"][m]["value"] is not None]
        paired = set()
        for i, pair in enumerate(metric["pairs"]):
            require(pair, PAIR_KEYS, path, f"{where}.pairs[{i}]", CONTRACT_COMPARE)
            if not {pair["a"], pair["b"]} <= known:
                raise DinoflowError(f"{path}: {where}.pairs[{i}] names a model not in params `models` "
                                    f"({pair['a']!r}, {pair['b']!r}): re-run the compare stage")
            if not is_number(pair["diff"]):
                raise DinoflowError(f"{path}: {where}.pairs[{i}].diff must be a number, found {pair['diff']!r} "
                                    f"({CONTRACT_COMPARE})")
            paired.add(frozenset((pair["a"], pair["b"])))
        for ia, a in enumerate(have):  # every two models with a value are paired (the summary reads their pair)
            for b in have[ia + 1:]:
                if frozenset((a, b)) not in paired:
                    raise DinoflowError(f"{path}: {where}.pairs lacks the pair of {a!r} and {b!r} "
                                        f"({CONTRACT_COMPARE}; re-run that stage)")
        if metric["best"] is not None and metric["best"] not in known:
            raise DinoflowError(f"{path}: {where}.best {metric['best']!r} is not a model of params `models`")
    return dict(data), None


def interval_text(value: Any, ci: Any) -> str:
    """"0.412 [0.401, 0.423]"; "0.412" without an interval; "–" without a value."""
    if not is_number(value):
        return "–"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(c) for c in ci):
        return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"
    return fmt(value)


# A trained model whose median per-image cosine to its initial embeddings is at least this barely moved: its
# numbers are its initialisation's (e.g. too few steps, a too small lr, an EMA teacher that has not followed).
UNMOVED_DRIFT = 0.999


def model_badges(info: Mapping[str, Any] | None, health: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Red badges of a model wherever it is named in a table: collapsed training, degenerate embeddings, a trained
    model that barely moved from its initial weights (drift >= `UNMOVED_DRIFT`)."""
    badges = []
    collapse = (info or {}).get("collapse")
    if collapse and collapse["verdict"] != "healthy":
        badges.append({"text": COLLAPSE_LABELS[collapse["verdict"]], "title": str(collapse["reason"])})
    drift = (info or {}).get("drift")
    if drift and is_number(drift.get("median_cosine")) and drift["median_cosine"] >= UNMOVED_DRIFT:
        badges.append({"text": "barely moved",
                       "title": f"median per-image cosine to its initial embeddings {drift['median_cosine']:.4f} "
                                f"(>= {UNMOVED_DRIFT}): its numbers are those of its initial weights"})
    if health and health["degenerate"]:
        badges.append({"text": "degenerate embeddings", "title": str(health["reason"])})
    return badges


def pair_order(pairs: Sequence[tuple[str, str]], models: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs against the baselines (`random`, then `pretrained`) first, then the rest, in params order."""
    def key(pair: tuple[str, str]) -> tuple:
        base = min((BASELINES.index(x) for x in pair if x in BASELINES), default=len(BASELINES))
        return (base, models.index(pair[0]), models.index(pair[1]))

    return sorted(dict.fromkeys(pairs), key=key)


def compare_section(compare: Mapping[str, Any], models: Sequence[str], infos: Mapping[str, Any],
                    health: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison tables from compare.json: one row per model (value [95% CI] per metric, collapse and
    health badges), a "best" row (the model compare.json names, else "cannot separate") and the paired
    differences (a - b [95% CI]), pairs with the baselines first."""
    metrics = compare["metrics"]
    names = list(metrics)
    rows = []
    for m in models:
        cells = []
        for name in names:
            e = metrics[name]["per_model"][m]
            cells.append({"text": interval_text(e["value"], e["ci95"]), "best": metrics[name]["best"] == m,
                          "note": e["reason"] or "", "n": e["n_items"],
                          "few": metrics[name]["small_sample"] if e["value"] is not None else None})
        rows.append({"name": m, "method": model_method(infos.get(m)), "badges": model_badges(infos.get(m), health.get(m)),
                     "cells": cells})
    best = [{"text": metrics[n]["best"] or "cannot separate", "separated": metrics[n]["best"] is not None}
            for n in names]
    by_pair: dict[tuple[str, str], dict[str, Mapping]] = {}
    for name in names:
        for pair in metrics[name]["pairs"]:
            by_pair.setdefault((pair["a"], pair["b"]), {})[name] = pair
    pair_rows = []
    for a, b in pair_order(list(by_pair), list(models)):
        cells = []
        for name in names:
            pr = by_pair[(a, b)].get(name)
            cells.append({"text": interval_text(pr["diff"], pr["ci95"]) if pr else "–",
                          "separable": bool(pr and pr["separable"])})
        pair_rows.append({"a": a, "b": b, "cells": cells})
    r = compare["resampling"]
    return {"ok": True, "metrics": names,
            "direction": {n: "higher is better" if metrics[n]["higher_is_better"] else "lower is better"
                          for n in names},
            "rows": rows, "best": best, "pairs": pair_rows,
            "verdicts": [(n, metrics[n]["verdict"]) for n in names],
            "resampling": f"{r['method']}, {r['n_resamples']} resamples, seed {r['seed']}, "
                          f"{100 * r['level']:g}% intervals"}


# The metrics the summary at the top of the page answers with (top-5 and the rest stay in the comparison table).
HEADLINE_METRICS = ("linear_top1", "knn_top1", "spearman", "mutual_knn")


def _lead(metric: Mapping[str, Any], leader: str, other: str) -> tuple[float, list[float], bool]:
    """(leader − other, its 95% interval, whether that interval excludes 0 in the leader's favour) from the
    compare.json pair of the two models (read, never recomputed)."""
    pair = next(p for p in metric["pairs"] if {p["a"], p["b"]} == {leader, other})
    diff, ci = pair["diff"], list(pair["ci95"] or [])
    if pair["a"] != leader:
        diff, ci = -diff, [-c for c in reversed(ci)]
    sign = 1.0 if metric["higher_is_better"] else -1.0
    ahead = bool(pair["separable"] and ci and min(sign * c for c in ci) > 0)
    return diff, ci, ahead


def metric_summary(name: str, metric: Mapping[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """One line of the summary: the best model where compare.json names one (with its lead over the runner-up),
    else the models the data cannot separate (with the leader's difference to the closest of them and its
    interval) and the models all of them are separably ahead of, plus the metric's small-sample note. Only compare.json's values, pairs and `best` are used."""
    per = metric["per_model"]
    sign = 1.0 if metric["higher_is_better"] else -1.0
    have = sorted((m for m in models if per[m]["value"] is not None), key=lambda m: -sign * per[m]["value"])
    undefined = [m for m in models if per[m]["value"] is None]
    line: dict[str, Any] = {"metric": name, "best": metric["best"], "few": metric["small_sample"],
                            "direction": "higher is better" if metric["higher_is_better"] else "lower is better"}
    if len(have) < 2:
        line["text"] = metric["verdict"]
        return line
    if metric["best"] is not None:
        best = metric["best"]
        runner = next(m for m in have if m != best)
        diff, ci, _ = _lead(metric, best, runner)
        line["text"] = f"{best} is best; its lead over {runner}, {interval_text(diff, ci)}, excludes 0"
    else:
        leader = have[0]
        tied = [m for m in have[1:] if not _lead(metric, leader, m)[2]]
        if not tied:  # cannot happen with compare.json's own rule; its words then
            line["text"] = metric["verdict"]
            return line
        diff, ci, _ = _lead(metric, leader, tied[0])
        if not ci:
            why = "without an interval (no resample gave a finite difference)"
        elif min(ci) <= 0 <= max(ci):
            why = "an interval that does not exclude 0"
        else:  # a percentile interval need not contain the point difference: it lies against the leader
            why = (f"an interval {'below' if max(ci) < 0 else 'above'} 0 although {leader} has the better point "
                   "value (the point values and the resamples disagree)")
        line["text"] = (f"the data cannot separate {', '.join([leader] + tied)}: {leader} − {tied[0]} = "
                        f"{interval_text(diff, ci)}, {why}")
        # what the data do say: the models every one of the leading group is separably ahead of
        behind = [m for m in have if m != leader and m not in tied
                  and all(_lead(metric, g, m)[2] for g in [leader] + tied)]
        if behind:
            line["text"] += f"; each of them is separably ahead of {', '.join(behind)}"
    if undefined:
        line["text"] += f" ({', '.join(undefined)}: undefined)"
    return line


def summary_section(compare: Mapping[str, Any] | None, compare_reason: str | None, models: Sequence[str],
                    infos: Mapping[str, Any], health: Mapping[str, Any]) -> dict[str, Any]:
    """The block at the top of the page: the answer per headline metric (`HEADLINE_METRICS`) as compare.json
    decided it, how each model was trained and which network is evaluated, and every model flagged collapsed
    (training) or degenerate (embeddings)."""
    verdicts = [] if compare is None else [
        metric_summary(name, metric, models) for name, metric in compare["metrics"].items()
        if name.split("/")[0] in HEADLINE_METRICS]
    rows, flags = [], []
    for m in models:
        info = infos.get(m)
        if info is None:
            rows.append({"name": m, "text": f"not trained yet ({paths.model_info(m)} not found)", "stand_in": ""})
        else:
            how = ("untrained" if info["method"] == "none" else f"trained with {info['method']}")
            rows.append({"name": m, "stand_in": info["stand_in_label"] if info["stand_in"] else "",
                         "text": f"{how}, init {info['init']} ({info['arch']}), trainable {info['trainable']}, "
                                 f"evaluated network: {info['evaluated_network'] or 'the backbone as initialised'}"})
        flags += [{"model": m, **b} for b in model_badges(info, health.get(m))]
    return {"verdicts": verdicts, "reason": compare_reason, "models": rows, "flags": flags,
            "resampling": None if compare is None else compare["resampling"]["method"]}


def health_rows(models: Sequence[str], infos: Mapping[str, Any], health: Mapping[str, Any]) -> list[dict]:
    """Per model: embedding health (contract 3), collapse verdict and drift (contract 2), as page rows."""
    rows = []
    for m in models:
        h, info = health.get(m), infos.get(m) or {}
        row: dict[str, Any] = {"name": m, "method": model_method(infos.get(m)), "badges": model_badges(infos.get(m), h)}
        if h:
            raw, used = h["cosine_raw"], h["cosine_used"]
            row.update(similarity=h["similarity"], n=h["n"], dim=h["dim"],
                       raw=f"{cosine_text(raw['median'])} [{cosine_text(raw['p01'])}, {cosine_text(raw['p99'])}]",
                       used=f"{fmt(used['median'])} [{fmt(used['p01'])}, {fmt(used['p99'])}]",
                       rankme=fmt(h["rankme"]), degenerate=h["degenerate"], reason=h["reason"])
        collapse = info.get("collapse")
        row["collapse"] = (COLLAPSE_LABELS[collapse["verdict"]], collapse["reason"]) if collapse else None
        drift = info.get("drift")
        row["drift"] = (f"{interval_text(drift['median_cosine'], drift['ci95'])} over {drift['n_images']} images "
                        f"vs {drift['reference']}") if drift else None
        rows.append(row)
    return rows


def cosine_text(c: Any) -> str:
    """A raw cosine: 4 decimals, or "1 − 5.2e-10" when it is within 1e-3 of 1 (so near-identical embeddings
    show how near)."""
    if not is_number(c):
        return "–"
    return f"1 − {1 - c:.2g}" if c > 0.999 else f"{c:.4f}"


# ------------------------------------------------------------------------------------------------ collection
def collection_section(manifest_path: str | Path, label_columns: Sequence[str]) -> dict[str, Any]:
    path = Path(manifest_path)
    if not path.exists():
        return {"ok": False, "reason": f"{path} not found (run `dinoflow ingest`)"}
    df = pd.read_parquet(path)
    if "status" not in df.columns:
        raise DinoflowError(f"{path}: manifest lacks the 'status' column")
    ok = df[df["status"] == "ok"]
    skipped = []
    for status, part in df[df["status"] != "ok"].groupby("status", sort=True):
        examples = [{"row": r.get("row", "?"), "id": r.get("id", "?"), "detail": r.get("detail", "")}
                    for r in part.head(3).to_dict("records")]
        skipped.append({"status": status, "count": int(len(part)), "examples": examples})
    skipped.sort(key=lambda s: -s["count"])

    def has_text(v) -> bool:
        return isinstance(v, str) and bool(v.strip())

    n_caption = int(ok["caption"].map(has_text).sum()) if "caption" in ok else 0
    n_keywords = int(ok["keywords"].map(lambda v: v is not None and not isinstance(v, float) and len(v) > 0).sum()) \
        if "keywords" in ok else 0
    label_classes = [(c, int(ok[c].dropna().nunique())) for c in label_columns if c in ok.columns]
    notes = []
    if "note" in ok.columns:
        counts: dict[str, int] = {}
        for note in ok["note"].dropna():
            for part in str(note).replace(";", ",").split(","):
                if part.strip():
                    counts[part.strip()] = counts.get(part.strip(), 0) + 1
        notes = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    by_status = [("ok", int(len(ok)))] + [(s["status"], s["count"]) for s in skipped]
    return {"ok": True, "n_rows": int(len(df)), "n_ok": int(len(ok)), "n_skipped": int(len(df) - len(ok)),
            "by_status": by_status,
            "n_caption": n_caption, "n_keywords": n_keywords, "label_classes": label_classes, "skipped": skipped,
            "notes": notes, "captions": {str(r["id"]): caption_of(r) for r in ok.to_dict("records")}}


# ------------------------------------------------------------------------------------------------- training
def trains(params: dict[str, Any], model: str) -> bool:
    return model_config(params, model).get("method", "none") != "none"


def is_finetune(params: dict[str, Any], model: str) -> bool:
    m = model_config(params, model)
    return m.get("method", "none") != "none" and m.get("init") != "random"


def training_section(params: dict[str, Any], fig_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    """Curves of every model that trains; returns (page entries, {model: curves}) for the fine-tune figure."""
    entries, all_curves = [], {}
    for m in model_names(params):
        if not trains(params, m):
            continue
        log_dir = Path(paths.train_log_dir(m))
        curves = F.read_dvclive_curves(log_dir)
        if not curves:
            entries.append({"model": m, "reason": f"no dvclive curves under {log_dir}/plots/metrics "
                                                  f"(run `dinoflow train --model {m}`)"})
            continue
        all_curves[m] = curves
        fig = F.training_curves_figure(m, curves, title=F.model_row_title(m, read_model_info(m)).replace("\n", " "))
        final = []
        summary = log_dir / "metrics.json"
        if summary.exists():
            final = [(k, fmt(v, 4)) for k, v in sorted(flatten(read_json(summary)).items())]
        entries.append({"model": m, "method": model_config(params, m)["method"], "img": figure_uri(fig, fig_dir / f"training_{_slug(m)}.png"), "final": final})
    return entries, all_curves


def model_method(info: Mapping[str, Any] | None) -> str:
    """The SSL method of a model as its info.json records it (`none` for untrained ones); "–" without info.json."""
    return str(info["method"]) if info else "–"


def method_curves_section(params: dict[str, Any], curves: Mapping[str, Mapping], fig_dir: Path) -> dict[str, Any]:
    """One figure with a small panel per trained model (title "model · method"): its loss and loss components, so
    the methods' training can be compared at a glance; written to <fig_dir>/training_by_method.png and inlined."""
    have = {m: curves[m] for m in model_names(params) if m in curves}
    if not have:
        return {"reason": "no trained model has dvclive curves under metrics/train/"}
    titles = {m: f"{m} · {model_config(params, m)['method']}" for m in have}
    fig = F.method_curves_figure(have, titles)
    return {"img": figure_uri(fig, fig_dir / "training_by_method.png"), "models": list(have)}


def finetune_section(params: dict[str, Any], curves: Mapping[str, Mapping]) -> dict[str, Any]:
    """The fine-tunes' head and backbone curves (losses of the two phases, gradient norms, learning rates) on one
    figure, one line per fine-tune, written to paths.FINETUNE_CURVES_PLOT and inlined."""
    fts = [m for m in model_names(params) if is_finetune(params, m)]
    if not fts:
        return {"reason": "no model of the list fine-tunes existing weights"}
    have = {m: curves[m] for m in fts if m in curves}
    series = sorted({n for c in have.values() for n in c if "head" in n.lower() or "backbone" in n.lower()})
    if not series:
        return {"reason": f"no head/backbone curves logged for {', '.join(fts)} under metrics/train/"}
    fig = F.finetune_curves_figure(have, series)
    return {"img": figure_uri(fig, paths.FINETUNE_CURVES_PLOT)}


def lr_search_section(params: dict[str, Any], fig_dir: Path, max_rows: int = 50) -> dict[str, Any]:
    users = [m for m in model_names(params) if trains(params, m) and not is_finetune(params, m)]
    if not users:
        return {"ok": False, "reason": "no model of the list trains from scratch, so no learning-rate search ran"}
    trials_path = Path(paths.LR_SEARCH_TRIALS)
    if not trials_path.exists():
        return {"ok": False, "reason": f"{trials_path} not found (run `dinoflow lr-search`)"}
    trials = pd.read_csv(trials_path)
    imgs = []
    if Path(paths.LR_SEARCH_PLOT).exists():
        imgs.append({"src": file_data_uri(paths.LR_SEARCH_PLOT), "alt": "learning-rate search curves per trial"})
    lr_col = next((c for c in trials.columns if c.lower() in ("params_lr", "lr", "learning_rate")), None) or \
        next((c for c in trials.columns if "lr" in c.lower()), None)
    value_col = next((c for c in trials.columns if c.lower() in ("value", "loss", "final_loss")), None)
    if lr_col and value_col:
        imgs.append({"src": figure_uri(F.lr_search_figure(trials, lr_col, value_col), fig_dir / "lr_search_trials.png"),
                     "alt": "loss against learning rate per trial"})
    rows = [[fmt(v, 4) if is_number(v) else ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
             for v in rec] for rec in trials.head(max_rows).itertuples(index=False)]
    best, note = [], None
    if Path(paths.LR_SEARCH_BEST).exists():
        saved = read_json(paths.LR_SEARCH_BEST)
        best = [(k, fmt(v, 4)) for k, v in sorted(flatten(saved).items())]
        note = saved.get("note")  # trials the criterion cannot tell apart (absent in files before the note)
    return {"ok": True, "imgs": imgs, "columns": [str(c) for c in trials.columns], "rows": rows, "best": best,
            "note": note}


# ------------------------------------------------------------------------------------------------ alignment
def align_fields(data: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({text field: its metrics}, {text field: why it was skipped}) from a metrics/align/<model>.json
    (`evaluate.align` writes the fields under `fields`)."""
    src = data.get("fields") if isinstance(data.get("fields"), Mapping) else data
    fields, skipped = {}, {}
    for k, v in src.items():
        if isinstance(v, Mapping) and is_number(v.get("spearman")):
            fields[str(k)] = dict(v)
        elif isinstance(v, Mapping) and v.get("skipped"):
            skipped[str(k)] = str(v["skipped"])
    return fields, skipped


def read_align(models: Sequence[str]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    out, reasons = {}, []
    for m in models:
        p = Path(paths.align_metrics(m))
        if not p.exists():
            reasons.append(f"alignment of {m}: {p} not found (run `dinoflow align --model {m}`)")
            continue
        fields, skipped = align_fields(_read_object(p))
        reasons += [f"alignment of {m} on {f}: {why}" for f, why in skipped.items()]
        if not fields and not skipped:
            reasons.append(f"alignment of {m}: {p} holds no text field")
        if fields:
            out[m] = fields
    return out, reasons


def alignment_charts(align: Mapping[str, Mapping[str, dict]], fig_dir: Path) -> list[dict[str, str]]:
    fields = list(dict.fromkeys(f for per in align.values() for f in per))
    charts = []
    for field in fields:
        rows = [{"model": m, **per[field]} for m, per in align.items() if field in per]
        fig = F.alignment_bar_figure(field, rows)
        charts.append({"field": field, "img": figure_uri(fig, fig_dir / f"alignment_{_slug(field)}.png")})
    return charts


# --------------------------------------------------------------------------------------------------- probes
def probe_labels(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{label column: {"classes", "n_test", "chance_top1", "knn": {"top1", "top5", "confusion"}, "linear": ...}}
    from a metrics/probes/<model>.json (`evaluate.probes` writes them under `columns`)."""
    src = data.get("columns") if isinstance(data.get("columns"), Mapping) else data
    return {str(label): dict(entry) for label, entry in src.items()
            if isinstance(entry, Mapping) and any(isinstance(entry.get(c), Mapping) for c in ("knn", "linear"))}


def _confusion(entry: Mapping[str, Any], clf: str) -> tuple[list, list[str]] | None:
    matrix = (entry.get(clf) or {}).get("confusion")
    classes = entry.get("classes")
    if matrix is None or classes is None:
        return None
    return matrix, [str(c) for c in classes]


def read_probes(params: dict[str, Any], models: Sequence[str]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    if not params["collection"].get("label_columns"):
        return {}, ["probes: the collection has no label column (collection.label_columns is empty)"]
    out, reasons = {}, []
    for m in models:
        p = Path(paths.probe_metrics(m))
        if not p.exists():
            reasons.append(f"probes of {m}: {p} not found (run `dinoflow probes --model {m}`)")
            continue
        data = _read_object(p)
        labels = probe_labels(data)
        if not labels:
            why = data.get("reason") or data.get("skipped")
            reasons.append(f"probes of {m}: {p} holds no probe result" + (f" ({why})" if why else ""))
            continue
        out[m] = labels
    return out, reasons


def probes_section(probes: Mapping[str, Mapping[str, dict]], fig_dir: Path,
                   compare: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Per label: the probe scores of every model (point estimates; their intervals are in the comparison) and
    the confusion matrix of the model compare.json names best on linear (else kNN) top-1, or, where the data
    cannot separate the models, of the highest point estimate, labelled as such."""
    labels = list(dict.fromkeys(l for per in probes.values() for l in per))
    sections = []
    for label in labels:
        models = [m for m in probes if label in probes[m]]
        columns = [(clf, s) for clf in ("knn", "linear") for s in PROBE_SCORES
                   if any(is_number((probes[m][label].get(clf) or {}).get(s)) for m in models)]
        values = {m: [(probes[m][label].get(clf) or {}).get(s) for clf, s in columns] for m in models}
        rows = [{"model": m, "cells": [{"text": fmt(v), "best": False} for v in values[m]]} for m in models]
        # The best model: highest top-1 of the linear probe, else of kNN (ties: first in params order).
        rank_col = next((j for j, c in enumerate(columns) if c == ("linear", "top1")), None)
        if rank_col is None:
            rank_col = next((j for j, c in enumerate(columns) if c[1] == "top1"), None)
        for row in rows:  # context for reading the scores: majority-class accuracy and test size
            e = probes[row["model"]][label]
            few = small_sample_note(e["n_test"], e.get("n_test_groups")) if is_number(e.get("n_test")) else None
            row["cells"] += [{"text": fmt(e.get("chance_top1")), "best": False},
                             {"text": fmt(e.get("n_test")), "best": False, "few": few}]
        entry: dict[str, Any] = {"label": label, "columns": [f"{clf} {s[:3]}-{s[3:]}" for clf, s in columns]
                                 + ["chance top-1", "test images"], "rows": rows}
        untested = sorted({str(c) for m in models
                           for c in probes[m][label].get("classes_without_test_images") or []})
        if untested:
            entry["untested"] = (f"class(es) {', '.join(untested)} of {label} have no test image: each lies in a single "
                                 f"near-duplicate group ({paths.GROUPS}), which stays in train, so these scores say "
                                 "nothing about them")
        if rank_col is not None and any(is_number(values[m][rank_col]) for m in models):
            clf_name = columns[rank_col][0]
            named = ((compare or {}).get("metrics") or {}).get(f"{clf_name}_top1/{label}")
            if named and named["best"] in models:
                best = named["best"]
                entry["best_by"] = f"best {clf_name} top-1 ({named['verdict']})"
            else:
                best = max((m for m in models if is_number(values[m][rank_col])), key=lambda m: values[m][rank_col])
                why = ("the data cannot separate the models" if named else
                       f"{paths.COMPARE_METRICS} has no {clf_name}_top1/{label}: not tested")
                entry["best_by"] = (f"highest {clf_name} top-1 point estimate {fmt(values[best][rank_col])}, "
                                    f"not the best: {why}")
            entry["best_model"] = best
            clf = columns[rank_col][0]
            cm = _confusion(probes[best][label], clf)
            if cm is None:
                entry["confusion_reason"] = f"no {clf} confusion matrix in {paths.probe_metrics(best)} for {label}"
            else:
                matrix, classes = cm
                title = f"{best}, {label} ({clf} probe, test split)"
                fig = F.confusion_matrix_figure(matrix, classes, title)
                entry["confusion"] = figure_uri(fig, fig_dir / f"confusion_{_slug(label)}.png")
        sections.append(entry)
    return sections


# ----------------------------------------------------------------------------------------------- comparison
def _spearman_text(d: Mapping[str, Any]) -> str:
    """"0.412 [0.401, 0.423]" for a sampled estimate, "0.412 (exact)" for the exact value (no interval)."""
    if not is_number(d.get("spearman")):
        return "–"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if d.get("method") != "exact" and is_number(lo) and is_number(hi):
        return f"{fmt(d['spearman'])} [{fmt(lo)}, {fmt(hi)}]"
    return f"{fmt(d['spearman'])} ({d.get('method') or 'exact'})"


def comparison_rows(models: Sequence[str], align: Mapping[str, Mapping[str, dict]],
                    probes: Mapping[str, Mapping[str, dict]]) -> list[dict[str, Any]]:
    """Rows of the details table (point estimates as the stages wrote them): one per (text field, metric) and
    (label, probe, top-k)."""
    rows: list[dict[str, Any]] = []

    def add(label: str, key: str, values: list[Any], texts: list[str]) -> None:
        # no "best" here: point estimates alone do not single out a model (compare.json does, with intervals)
        rows.append({"label": label, "cells": [{"text": t, "best": False} for t in texts]})

    fields = list(dict.fromkeys(f for per in align.values() for f in per))
    for field in fields:
        per = [align.get(m, {}).get(field) or {} for m in models]
        for key in ALIGN_KEYS:
            values = [d.get(key) for d in per]
            if not any(is_number(v) for v in values):
                continue
            texts = [fmt(v) for v in values]
            label = ALIGN_KEYS[key]
            if key == "spearman":
                texts = [_spearman_text(d) for d in per]
            elif key == "mean_query_spearman":
                texts = [fmt(d.get(key)) + (f" ± {fmt(d['query_spearman_sem'])}"
                                            if is_number(d.get("query_spearman_sem")) else "") for d in per]
                label += " (± SEM)"
            elif key == "mutual_knn":
                ks = {d.get("mutual_knn_k") for d in per if d}
                label += f"@{ks.pop()}" if len(ks) == 1 and None not in ks else ""
            add(f"{field}: {label}", key, values, texts)
    labels = list(dict.fromkeys(l for per in probes.values() for l in per))
    for label in labels:
        for clf in ("knn", "linear"):
            for s in PROBE_SCORES:
                values = [(probes.get(m, {}).get(label, {}).get(clf) or {}).get(s) for m in models]
                if any(is_number(v) for v in values):
                    add(f"{label}: {clf} {s[:3]}-{s[3:]}", s, values, [fmt(v) for v in values])
    return rows


def detail_metrics(models: Sequence[str], align: Mapping[str, Mapping[str, dict]],
                   probes: Mapping[str, Mapping[str, dict]]) -> dict[str, dict[str, Any]]:
    """Per model, every numeric alignment and probe value (`align.<field>.<key>`, `probes.<label>.<probe>.<key>`),
    exactly as read."""
    out = {}
    for m in models:
        flat = {}
        flat.update(flatten(align.get(m, {}), "align"))
        flat.update(flatten(probes.get(m, {}), "probes"))  # confusion matrices and class lists are lists: left out
        out[m] = dict(sorted(flat.items()))
    return out


def report_metrics(models: Sequence[str], infos: Mapping[str, Any], health: Mapping[str, Any],
                   compare: Mapping[str, Any] | None, details: Mapping[str, dict]) -> dict[str, Any]:
    """reports/metrics.json: per model its training facts, embedding health, collapse verdict, drift, every
    headline metric with its 95% interval and its paired differences (oriented model - other); per metric the
    best model (null: the data cannot separate them) and the verdict. Values are copied, never recomputed."""
    per_model: dict[str, Any] = {}
    for m in models:
        info = infos.get(m)
        collapse = (info or {}).get("collapse")
        entry: dict[str, Any] = {
            "training": None if info is None else {k: info.get(k) for k in (
                "arch", "init", "init_values", "method", "trainable", "evaluated_network", "trainable_params",
                "total_params", "trainable_share", "stand_in", "stand_in_label")},
            "health": health.get(m),
            "collapse_verdict": collapse["verdict"] if collapse else None,
            "collapse": collapse,
            "drift": (info or {}).get("drift"),
            "metrics": {}, "differences": {}, "details": details.get(m, {})}
        if compare is not None:
            for name, metric in compare["metrics"].items():
                e = metric["per_model"][m]
                entry["metrics"][name] = {k: e[k] for k in PER_MODEL_KEYS}
                diffs = []
                for pair in metric["pairs"]:
                    if m not in (pair["a"], pair["b"]):
                        continue
                    sign = 1 if pair["a"] == m else -1
                    # null when no resample gave a finite difference (compare.percentile_interval)
                    ci = None if pair["ci95"] is None else sorted(sign * c for c in pair["ci95"])
                    diffs.append({"other": pair["b"] if sign == 1 else pair["a"], "diff": sign * pair["diff"],
                                  "ci95": ci, "separable": pair["separable"]})
                entry["differences"][name] = diffs
        per_model[m] = entry
    summary = None if compare is None else {
        name: {"best": metric["best"], "verdict": metric["verdict"], "higher_is_better": metric["higher_is_better"],
               "small_sample": metric["small_sample"]}
        for name, metric in compare["metrics"].items()}
    return {"resampling": None if compare is None else compare["resampling"], "metrics": summary,
            "models": per_model}


# ------------------------------------------------------------------------------------------ grids, attention
def figures_section(queries_json: str | Path, captions: Mapping[str, str], stage: str) -> dict[str, Any]:
    path = Path(queries_json)
    if not path.exists():
        return {"figures": [], "reason": f"{path} not found (run `dinoflow {stage}`)"}
    data = read_json(path)
    items = []
    for qid, name in zip(data.get("query_ids", []), data.get("files", [])):
        fig_path = path.parent / name
        if not fig_path.exists():
            raise DinoflowError(f"{path}: lists {name} but {fig_path} does not exist (re-run `dinoflow {stage}`)")
        items.append({"id": qid, "caption": captions.get(str(qid), ""), "img": file_data_uri(fig_path)})
    if not items:
        return {"figures": [], "reason": f"{path} lists no query (is the collection empty?)"}
    return {"figures": items}


# ----------------------------------------------------------------------------------------------------- page
def build(params: dict[str, Any], fig_dir: str | Path = REPORT_FIGURES_DIR) -> tuple[dict[str, Any], dict]:
    """The template context and the flat metrics, from the files in the workflow root (cwd)."""
    fig_dir = Path(fig_dir)
    models = model_names(params)
    not_run: list[tuple[str, str]] = []

    model_rows, infos = [], {}
    health, health_reasons = read_health(models)
    not_run += [("embedding health", r) for r in health_reasons]
    for m in models:
        info = infos[m] = read_info(m)
        model_rows.append({"name": m, "info": info, "badges": model_badges(info, health.get(m)),
                           "reason": None if info else
                           f"{paths.model_info(m)} not found (run `dinoflow train --model {m}`)"})

    collection = collection_section(paths.MANIFEST, params["collection"].get("label_columns") or [])
    if not collection["ok"]:
        not_run.append(("collection", collection["reason"]))
    captions = collection.get("captions", {})
    groups, groups_reason = read_groups()
    if groups_reason:
        not_run.append(("near-duplicate groups", groups_reason))
    compare, compare_reason = read_compare(models)
    if compare_reason:
        not_run.append(("model comparison", compare_reason))
    similarities = sorted({h["similarity"] for h in health.values()})

    text_counts = []
    if Path(TEXT_METRICS).exists():
        text = read_json(TEXT_METRICS)
        if text.get("text_model"):
            text_counts.append(("text model", f"{text['text_model']} ({text.get('text_model_source', '?')})"))
        text_counts += [(k, fmt(v)) for k, v in sorted(flatten(text.get("fields", text)).items())]

    training, curves = training_section(params, fig_dir)
    not_run += [(f"training of {t['model']}", t["reason"]) for t in training if "reason" in t]
    finetune = finetune_section(params, curves)
    method_curves = method_curves_section(params, curves, fig_dir)
    lr_search = lr_search_section(params, fig_dir)
    if not lr_search["ok"]:
        not_run.append(("learning-rate search", lr_search["reason"]))

    align, align_reasons = read_align(models)
    probes, probe_reasons = read_probes(params, models)
    not_run += [("alignment", r) for r in align_reasons] + [("probes", r) for r in probe_reasons]
    details = detail_metrics(models, align, probes)
    rows = comparison_rows(models, align, probes)
    grids = figures_section(GRID_QUERIES, captions, "grids")
    attention = figures_section(ATTENTION_QUERIES, captions, "attention")
    for part, sec in (("retrieval grids", grids), ("attention maps", attention)):
        if not sec["figures"]:
            not_run.append((part, sec["reason"]))

    context = {
        "title": (params.get("report") or {}).get("title") or "dinoflow report",
        "collection_name": params["collection"].get("name", ""),
        "models": model_rows,
        "any_stand_in": any(r["info"] and r["info"].get("stand_in") for r in model_rows),
        "collection": collection,
        "groups": groups,
        "groups_reason": groups_reason,
        "similarity": " / ".join(similarities) if similarities else None,
        "health": health_rows(models, infos, health),
        "health_not_run": health_reasons,
        "summary": summary_section(compare, compare_reason, models, infos, health),
        "compare": compare_section(compare, models, infos, health) if compare else {"ok": False,
                                                                                    "reason": compare_reason},
        "text_counts": text_counts,
        "text_quality": text_quality_block(TEXT_METRICS),
        "training": training,
        "finetune": finetune,
        "method_curves": method_curves,
        "lr_search": lr_search,
        "untrained": [m for m in models if not trains(params, m)],
        "comparison": {"models": [{"name": r["name"], "stand_in": bool(r["info"] and r["info"].get("stand_in")),
                                   "stand_in_label": (r["info"] or {}).get("stand_in_label", "")} for r in model_rows],
                       "rows": rows,
                       "reason": "no alignment or probe metrics found (run `dinoflow align` / `dinoflow probes`)"},
        "alignment": alignment_charts(align, fig_dir),
        "alignment_not_run": align_reasons,
        "probes": {"ok": bool(probes), "labels": probes_section(probes, fig_dir, compare), "not_run": probe_reasons},
        "grids": grids,
        "attention": attention,
        "not_run": not_run,
    }
    return context, report_metrics(models, infos, health, compare, details)


def render(context: Mapping[str, Any]) -> str:
    import jinja2

    from dinoflow.report.template import TEMPLATE

    # Optional keys (e.g. an entry's `img` when it was not run) are simply absent, hence the default Undefined.
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(**context)


def main(params: dict[str, Any]) -> None:
    context, metrics = build(params)
    html = render(context)
    out = Path(paths.REPORT_HTML)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    write_json(paths.REPORT_METRICS, metrics)
    for part, reason in context["not_run"]:
        log.warning("report: %s not run: %s", part, reason)
    log.info("wrote %s (%.1f MB, self-contained) and %s", out, len(html.encode()) / 1e6, paths.REPORT_METRICS)

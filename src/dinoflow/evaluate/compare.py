"""`dinoflow compare`: every metric of every model with a 95% interval over images, and every pair of models
compared on the same resamples.

What is resampled (percentile bootstrap, `compare.n_resamples` resamples, seed `seed`, level 0.95):
- the unit is the image, or, with `compare.resample_unit: group` (default), the near-duplicate group of
  `paths.GROUPS` drawn whole (a cluster bootstrap: skin-tone siblings or resized copies are not independent
  evidence, so resampling them one by one would make intervals too narrow). With groups of one, both are the
  same. A resample draws as many units as there are, with replacement;
- probes (`knn_top1/<col>`, `knn_top5/<col>`, `linear_top1/<col>`, `linear_top5/<col>`): the test images of
  the label column (the split and the fitted probes stay fixed: the interval is over which test images were
  drawn, not over refitting). The statistic is the mean of the per-image tie-aware correctness of
  `paths.probe_items(M)`;
- `mutual_knn/<field>`: the query images of `paths.align_items(M)` (neighbour lists stay those of the whole
  collection); the statistic is the mean per-image tie-aware overlap;
- `spearman/<field>`: the images that have the text. Each resample draws images, then `compare.n_pairs` pairs of
  two different resampled images (pairs of an image with its own copy are left out); the statistic is the
  Spearman correlation between image and text cosine similarity (`align.field_features`) over those pairs. The
  point value is the all-pairs (or sampled) Spearman of `dinoflow align`.
Every model is evaluated on the same resamples (and, for Spearman, the same pairs), so the difference between two
models has its own paired interval: "separable" when that interval excludes 0. A model is "best" only when its
interval of difference excludes 0 against every other model; otherwise the verdict names the models the data
cannot separate. A metric that is undefined for a model (degenerate field, too few images) has value null and
its reason, and takes no part in pairs. Each metric also records `n_groups` (groups resampled whole; null when
images are the unit) and `small_sample`: a note when its values rest on fewer images or groups than
`dinoflow.evaluate.sample_size` asks for (also logged as a warning), else null.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Callable

import numpy as np
import pandas as pd

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.align import TEXT_FIELDS, field_features, field_rows
from dinoflow.evaluate.probes import ITEM_COLUMNS
from dinoflow.evaluate.sample_size import small_sample_note
from dinoflow.evaluate.vectors import read_vectors
from dinoflow.utils import get_logger, read_json, write_json

log = get_logger(__name__)

LEVEL = 0.95
CHUNK = 100          # resamples generated at once (memory: CHUNK x items)
DENSE_MAX_N = 8192   # Spearman pairs are gathered from a dense float32 similarity matrix up to this many images


# ------------------------------------------------------------------------------------------------ resampling


class Resampler:
    """Seeded bootstrap draws over items, or over groups of items drawn whole.

    groups: (N,) group label per item, or None (every item its own unit). `counts(b)`: (b, N) int multiplicity of
    each item in b resamples; `draws(rng)`: item indices of one resample (a multiset, any order).
    """

    def __init__(self, n_items: int, groups: np.ndarray | None = None):
        self.n = n_items
        if groups is None:
            self.code = np.arange(n_items)
        else:
            self.code = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].reshape(-1)
        self.n_units = int(self.code.max()) + 1 if n_items else 0

    def counts(self, b: int, rng: np.random.Generator) -> np.ndarray:
        units = rng.integers(0, self.n_units, size=(b, self.n_units))
        per_unit = np.zeros((b, self.n_units), dtype=np.int64)
        np.add.at(per_unit, (np.arange(b)[:, None], units), 1)
        return per_unit[:, self.code]

    def draws(self, rng: np.random.Generator) -> np.ndarray:
        per_unit = np.bincount(rng.integers(0, self.n_units, size=self.n_units), minlength=self.n_units)
        return np.repeat(np.arange(self.n), per_unit[self.code])


def metric_rng(seed: int, metric: str) -> np.random.Generator:
    """A generator per (seed, metric name): adding a model or a metric does not change other metrics' resamples."""
    return np.random.default_rng([int(seed), zlib.crc32(metric.encode())])


def bootstrap_means(values: np.ndarray, resampler: Resampler, n_resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, M) weighted means of values (M, N) (one row per model) over the same resamples."""
    out = np.empty((n_resamples, values.shape[0]))
    for s in range(0, n_resamples, CHUNK):
        w = resampler.counts(min(CHUNK, n_resamples - s), rng).astype(np.float64)
        out[s:s + w.shape[0]] = (w @ values.T) / w.sum(axis=1, keepdims=True)
    return out


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """[lo, hi] percentile interval of the finite bootstrap statistics (None when there are none)."""
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


# ------------------------------------------------------------------------------------------------ verdicts


def summarise_metric(models: list[str], values: dict[str, float | None], stats: dict[str, np.ndarray],
                     n_items: dict[str, int], reasons: dict[str, str | None],
                     higher_is_better: bool = True, n_groups: int | None = None) -> dict[str, Any]:
    """The contract-4 entry of one metric from point values and bootstrap statistics on shared resamples.

    values / stats / n_items / reasons: per model (stats: (n_resamples,) per model with a value, all on the
    same resamples). Pairs: every pair a before b in `models`, diff = a - b. n_groups: the near-duplicate groups
    resampled whole (None: images are the unit). `n_groups` and `small_sample` (`sample_size.small_sample_note`
    of the items behind the values, None when there are enough or no value) are copied into the entry.
    """
    per_model = {}
    for m in models:
        v = values.get(m)
        ok = v is not None and np.isfinite(v)
        per_model[m] = {"value": float(v) if ok else None,
                        "ci95": percentile_interval(stats[m]) if ok and m in stats else None,
                        "n_items": int(n_items.get(m, 0)),
                        "reason": None if ok else (reasons.get(m) or "no value")}
        ci = per_model[m]["ci95"]
        if ci is not None and ci[0] == ci[1]:
            # e.g. every one of 11 test images classified correctly: no resample can differ, and a zero-width
            # interval would read as certainty. Say why instead (the exact 95% lower bound for 11 of 11 is 0.72).
            per_model[m]["reason"] = (f"zero-width interval: every resample of the {per_model[m]['n_items']} items "
                                      "gives the same value, so resampling cannot show its uncertainty "
                                      "(too few or too uniform items)")
    have = [m for m in models if per_model[m]["value"] is not None]
    pairs = []
    for ia, a in enumerate(have):
        for b in have[ia + 1:]:
            ci = percentile_interval(stats[a] - stats[b])
            pairs.append({"a": a, "b": b, "diff": per_model[a]["value"] - per_model[b]["value"], "ci95": ci,
                          "separable": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))})
    n_behind = max((per_model[m]["n_items"] for m in have), default=None)
    entry: dict[str, Any] = {"higher_is_better": higher_is_better, "per_model": per_model, "pairs": pairs,
                             "best": None, "n_groups": None if n_groups is None else int(n_groups),
                             "small_sample": None if n_behind is None else small_sample_note(n_behind, n_groups)}
    if not have:
        why = sorted({r["reason"] for r in per_model.values() if r["reason"]})
        entry["verdict"] = "undefined for every model: " + "; ".join(why)
        return entry
    sign = 1.0 if higher_is_better else -1.0
    leader = max(have, key=lambda m: (sign * per_model[m]["value"], -have.index(m)))
    if len(have) == 1:
        entry["verdict"] = f"only {leader} has a value: nothing to compare"
        return entry
    lead_ci = {}
    for p in pairs:
        if leader in (p["a"], p["b"]) and p["ci95"] is not None:
            lo, hi = p["ci95"] if p["a"] == leader else (-p["ci95"][1], -p["ci95"][0])
            other = p["b"] if p["a"] == leader else p["a"]
            lead_ci[other] = (sign * lo, sign * hi) if sign > 0 else (sign * hi, sign * lo)
    others = [m for m in have if m != leader]
    unseparated = [m for m in others if not (m in lead_ci and lead_ci[m][0] > 0)]
    missing = [m for m in models if m not in have]
    tail = f" ({', '.join(missing)}: undefined)" if missing else ""
    if not unseparated:
        runner = max(others, key=lambda m: (sign * per_model[m]["value"], -have.index(m)))
        lo, hi = lead_ci[runner]
        entry["best"] = leader
        entry["verdict"] = (f"{leader} best; lead over {runner} excludes 0 "
                            f"({sign * (per_model[leader]['value'] - per_model[runner]['value']):+.4f} "
                            f"[{lo:+.4f}, {hi:+.4f}]){tail}")
    else:
        entry["verdict"] = f"the data cannot separate {', '.join([leader] + unseparated)}{tail}"
    return entry


def _log_entry(metric: str, entry: dict[str, Any]) -> None:
    """The verdict of a metric, and a warning naming the metric and its counts when it rests on few images."""
    log.info("%s: %s", metric, entry["verdict"])
    if entry["small_sample"]:
        log.warning("%s: %s", metric, entry["small_sample"])


# ------------------------------------------------------------------------------------------------ metrics


def _groups_of(ids: np.ndarray, unit: str) -> np.ndarray | None:
    if unit == "image":
        return None
    from dinoflow.evaluate.probes import read_groups

    return read_groups(ids)


def _read_items(path: str, key: str) -> pd.DataFrame:
    if not os.path.exists(path):
        raise DinoflowError(f"{path}: per-image results not found (rerun the stage that writes it)")
    df = pd.read_parquet(path)
    df[key] = df[key].astype(str)
    df["id"] = df["id"].astype(str)
    return df


def _shared_ids(per_model: dict[str, np.ndarray], what: str) -> np.ndarray:
    """The item ids every model with results has (they must be the same set)."""
    sets = {m: np.sort(v) for m, v in per_model.items()}
    first = next(iter(sets.values()))
    for m, ids in sets.items():
        if not np.array_equal(ids, first):
            raise DinoflowError(f"{what}: models evaluated different images ({m}: {ids.size} vs {first.size}); "
                                "rerun probes / align for every model with the same params")
    return first


def item_metrics(models: list[str], frames: dict[str, pd.DataFrame], key: str, value_columns: dict[str, str],
                 json_values: Callable[[str, str, str], tuple[float | None, str | None]], cfg: dict[str, Any],
                 seed: int) -> dict[str, dict[str, Any]]:
    """Metrics that are means of per-item values: {metric name: entry}.

    frames: model -> per-item table with columns key (label column / field), id and the value columns;
    value_columns: metric prefix -> table column; json_values(model, prefix, key value) -> (value, reason) from
    the stage's JSON (the value must equal the mean of the items; a null value comes with its reason).
    """
    out: dict[str, dict[str, Any]] = {}
    keys = sorted(set().union(*[set(f[key]) for f in frames.values()])) if frames else []
    for k in keys:
        for prefix, col in value_columns.items():
            metric = f"{prefix}/{k}"
            values, reasons, n_items, tables = {}, {}, {}, {}
            for m in models:
                value, reason = json_values(m, prefix, k)
                rows = frames[m][frames[m][key] == k] if m in frames else None
                if value is None or rows is None or rows.empty:
                    values[m], reasons[m] = None, reason or "no per-image results"
                    continue
                tables[m] = rows.set_index("id")[col]
                values[m], n_items[m] = float(tables[m].mean()), int(len(tables[m]))
                if abs(values[m] - value) > 1e-9:
                    raise DinoflowError(f"{metric}: {m}'s per-image results give {values[m]:.6f} but its metrics "
                                        f"JSON says {value:.6f} (stale outputs? rerun the stage)")
                values[m] = value
            stats: dict[str, np.ndarray] = {}
            n_groups = None
            if tables:
                ids = _shared_ids({m: t.index.to_numpy() for m, t in tables.items()}, metric)
                mat = np.stack([tables[m].reindex(ids).to_numpy(dtype=np.float64) for m in tables])
                resampler = Resampler(ids.size, _groups_of(ids, cfg["resample_unit"]))
                n_groups = resampler.n_units if cfg["resample_unit"] == "group" else None
                boot = bootstrap_means(mat, resampler, int(cfg["n_resamples"]), metric_rng(seed, metric))
                stats = {m: boot[:, i] for i, m in enumerate(tables)}
            out[metric] = summarise_metric(models, values, stats, n_items, reasons, n_groups=n_groups)
            _log_entry(metric, out[metric])
    return out


def sample_resample_pairs(draws: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n_pairs pairs (i, j) of item indices: two uniformly drawn members of the resample `draws` that are not the
    same underlying item (an image paired with its own copy says nothing about similarity)."""
    if np.unique(draws).size < 2:
        raise DinoflowError("compare: a resample holds fewer than two distinct images")
    i_out, j_out, have = [], [], 0
    while have < n_pairs:
        need = n_pairs - have
        u = draws[rng.integers(0, draws.size, size=2 * need + 16)]
        v = draws[rng.integers(0, draws.size, size=u.size)]
        keep = u != v
        i_out.append(u[keep][:need])
        j_out.append(v[keep][:need])
        have += int(min(keep.sum(), need))
    return np.concatenate(i_out), np.concatenate(j_out)


def _pair_sims(x: np.ndarray, i: np.ndarray, j: np.ndarray, dense: np.ndarray | None) -> np.ndarray:
    if dense is not None:
        return dense[i, j]
    out = np.empty(i.shape, dtype=np.float64)
    fi, fj, fo = i.reshape(-1), j.reshape(-1), out.reshape(-1)
    for s in range(0, fi.size, 1 << 16):
        fo[s:s + (1 << 16)] = np.einsum("ij,ij->i", x[fi[s:s + (1 << 16)]], x[fj[s:s + (1 << 16)]])
    return out


def rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank, as `scipy.stats.rankdata(a, axis=1)`) of each row.

    An unstable sort plus one pass over runs of equal values: several times faster than rankdata's stable sort.
    """
    r, p = a.shape
    order = np.argsort(a, axis=1)
    s = np.take_along_axis(a, order, axis=1)
    new = np.ones((r, p), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]           # a run never crosses rows: each row starts a new one
    run = np.cumsum(new.ravel()) - 1
    pos = np.tile(np.arange(1, p + 1, dtype=np.float64), r)
    mean_rank = np.bincount(run, weights=pos) / np.bincount(run)
    ranks = np.empty((r, p))
    np.put_along_axis(ranks, order, mean_rank[run].reshape(r, p), axis=1)
    return ranks


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of a with the same row of b ((R, P) each; average ranks for ties;
    NaN for a row where either side is constant)."""
    ra, rb = rank_rows(a), rank_rows(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return np.divide((ra * rb).sum(axis=1), den, out=np.full(a.shape[0], np.nan), where=den > 0)


def spearman_bootstrap(img: dict[str, np.ndarray], txt: np.ndarray, resampler: Resampler, n_resamples: int,
                       n_pairs: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(n_resamples,) Spearman statistics per model, all models on the same resampled images and pairs.

    img: model -> (N, D) image embeddings of the field's items; txt: (N, Dt) their text embeddings.
    """
    i = np.empty((n_resamples, n_pairs), dtype=np.int32)
    j = np.empty((n_resamples, n_pairs), dtype=np.int32)
    for r in range(n_resamples):
        i[r], j[r] = sample_resample_pairs(resampler.draws(rng), n_pairs, rng)
    fa_t = None
    out: dict[str, np.ndarray] = {}
    for m, x in img.items():
        fa, fb = field_features(x, txt)
        if fa_t is None:
            dense_t = (fb @ fb.T).astype(np.float32) if fb.shape[0] <= DENSE_MAX_N else None
            fa_t = _pair_sims(fb, i, j, dense_t)
            del dense_t
        dense = (fa @ fa.T).astype(np.float32) if fa.shape[0] <= DENSE_MAX_N else None
        out[m] = rowwise_spearman(_pair_sims(fa, i, j, dense), fa_t)
    return out


def spearman_metrics(models: list[str], align: dict[str, dict[str, Any]], cfg: dict[str, Any],
                     seed: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for field in TEXT_FIELDS:
        metric = f"spearman/{field}"
        values, reasons, n_items, img = {}, {}, {}, {}
        rows = have = None
        for m in models:
            entry = align[m]["fields"].get(field) or {}
            values[m], reasons[m] = entry.get("spearman"), entry.get("reason")
            if values[m] is None:
                continue
            ids, x = read_vectors(paths.embeddings(m), "cls")
            if rows is None:
                first_ids = ids
                txt_ids, txt, rows = field_rows(ids, field)
                have = rows >= 0
                item_ids = ids[rows[have]].astype(str)
            elif not np.array_equal(ids, first_ids):
                raise DinoflowError(f"{paths.embeddings(m)}: images differ from the other models' embeddings "
                                    "(rerun embed for every model)")
            img[m] = x[rows[have]]
            n_items[m] = int(have.sum())
            if n_items[m] != entry.get("n_items"):
                raise DinoflowError(f"{metric}: {m} has {n_items[m]} images with a {field} here but "
                                    f"{entry.get('n_items')} in {paths.align_metrics(m)} (stale outputs?)")
        stats: dict[str, np.ndarray] = {}
        n_groups = None
        if img:
            resampler = Resampler(int(have.sum()), _groups_of(item_ids, cfg["resample_unit"]))
            n_groups = resampler.n_units if cfg["resample_unit"] == "group" else None
            stats = spearman_bootstrap(img, txt[have], resampler, int(cfg["n_resamples"]), int(cfg["n_pairs"]),
                                       metric_rng(seed, metric))
        out[metric] = summarise_metric(models, values, stats, n_items, reasons, n_groups=n_groups)
        _log_entry(metric, out[metric])
    return out


# ------------------------------------------------------------------------------------------------ the stage


def main(params: dict[str, Any], **_: Any) -> dict[str, Any]:
    cfg = params["compare"]
    seed = int(params["seed"])
    models = model_names(params)
    for path in [paths.probe_metrics(m) for m in models] + [paths.align_metrics(m) for m in models]:
        if not os.path.exists(path):
            raise DinoflowError(f"{path}: not found (run probes and align for every model first)")
    probes = {m: read_json(paths.probe_metrics(m)) for m in models}
    align = {m: read_json(paths.align_metrics(m)) for m in models}
    metrics: dict[str, dict[str, Any]] = {}

    def probe_value(m: str, prefix: str, column: str) -> tuple[float | None, str | None]:
        entry = probes[m]["columns"].get(column)
        if entry is None:
            return None, f"no probe results for label column {column!r}"
        clf, k = prefix.split("_")
        return entry[clf][k], entry[clf][f"{k}_reason"]

    metrics.update(item_metrics(models, {m: _read_items(paths.probe_items(m), "column") for m in models},
                                "column", {c: c for c in ITEM_COLUMNS}, probe_value, cfg, seed))
    metrics.update(spearman_metrics(models, align, cfg, seed))

    def knn_value(m: str, prefix: str, field: str) -> tuple[float | None, str | None]:
        entry = align[m]["fields"].get(field) or {}
        return entry.get("mutual_knn"), entry.get("reason")

    mutual = item_metrics(models, {m: _read_items(paths.align_items(m), "field") for m in models}, "field",
                          {"mutual_knn": "mutual_knn"}, knn_value, cfg, seed)
    for field in TEXT_FIELDS:  # a field degenerate for every model has no items at all: still say why
        metric = f"mutual_knn/{field}"
        if metric not in mutual:
            reasons = {m: (align[m]["fields"].get(field) or {}).get("reason") for m in models}
            mutual[metric] = summarise_metric(models, {m: None for m in models}, {}, {}, reasons)
    metrics.update(mutual)
    unit = cfg["resample_unit"]
    method = ("bootstrap over images" if unit == "image" else
              f"bootstrap over images, near-duplicate groups ({paths.GROUPS}) resampled whole")
    result = {"resampling": {"method": method,
                             "unit": unit, "n_resamples": int(cfg["n_resamples"]), "seed": seed, "level": LEVEL,
                             "spearman_pairs_per_resample": int(cfg["n_pairs"])},
              "metrics": dict(sorted(metrics.items()))}
    write_json(paths.COMPARE_METRICS, result)
    log.info("compare: %d metrics x %d models -> %s", len(metrics), len(models), paths.COMPARE_METRICS)
    return result

